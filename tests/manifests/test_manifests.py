"""manifests/: render with `kubectl kustomize`, validate every object against the Kubernetes schemas."""

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
# Oldest Kubernetes minor we support (GKE's oldest in service) and the newest bundled schemas.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
MIN_KUSTOMIZE = (5, 0)  # components, `labels` and `patches` with kustomize v5 semantics (kubectl >= 1.27)
NAMESPACE = "synthvlm"
OPTIONAL_COMPONENTS = (
    "../../components/model-cache",
    "../../components/data-volume",
    "../../components/llm-secret-template",
)
# Shapes of real credentials that must never appear in a checked-in manifest.
REAL_KEY = re.compile(r"sk-[A-Za-z0-9_-]{16,}|[A-Za-z0-9+/=_-]{32,}")


def kustomize_skip_reason() -> str | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return "kubectl is not installed (scripts/install_kubectl.sh installs it)"
    result = subprocess.run(
        [kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60
    )
    version = json.loads(result.stdout).get("kustomizeVersion", "") if result.returncode == 0 else ""
    match = re.match(r"v(\d+)\.(\d+)", version)
    if match is None or (int(match[1]), int(match[2])) < MIN_KUSTOMIZE:
        return (
            f"kubectl's built-in kustomize is {version or 'unknown (kubectl < 1.24)'}; manifests/ need "
            "kustomize v5 (kubectl >= 1.27). Debian bookworm only packages kubectl 1.20 (kubernetes-client)."
        )
    return None


SKIP_REASON = kustomize_skip_reason()
needs_kustomize = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


def kustomize(directory: Path) -> list[dict]:
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """The base, the GKE overlay, and the GKE overlay with every optional component added the way
    manifests/README.md says (a `components:` list in overlays/gke/kustomization.yaml)."""
    with_components = tmp_path_factory.mktemp("manifests") / "manifests"
    shutil.copytree(MANIFESTS, with_components)
    overlay = with_components / "overlays" / "gke" / "kustomization.yaml"
    kustomization = yaml.safe_load(overlay.read_text())
    kustomization["components"] = list(OPTIONAL_COMPONENTS)
    overlay.write_text(yaml.safe_dump(kustomization))
    return {
        "base": kustomize(MANIFESTS / "base"),
        "gke": kustomize(MANIFESTS / "overlays" / "gke"),
        "gke+components": kustomize(overlay.parent),
        "standalone-kfp": kustomize(MANIFESTS / "overlays" / "standalone-kfp"),
    }


def find(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def schema_errors(objects: list[dict], version: str) -> list[str]:
    errors = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
            errors.append(f"{obj['kind']}/{obj['metadata'].get('name')}: {exc}")
    return errors


def secret_values(secret: dict) -> list[str]:
    values = list((secret.get("stringData") or {}).values())
    return values + [base64.b64decode(v).decode() for v in (secret.get("data") or {}).values()]


def resource_files() -> list[Path]:
    """Every file some kustomization lists under `resources` (directories are other kustomizations)."""
    files = []
    for kustomization in sorted(MANIFESTS.rglob("kustomization.yaml")):
        for entry in yaml.safe_load(kustomization.read_text()).get("resources", []):
            path = (kustomization.parent / entry).resolve()
            assert path.exists(), f"{kustomization}: missing resource {entry}"
            if path.is_file():
                files.append(path)
    return files


# --- without kustomize: the files themselves ---------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_resource_file_is_valid_kubernetes(version):
    files = resource_files()
    assert len(files) >= 7  # namespace, SA, RBAC, priority classes, quota, secret template, PVC
    objects = [obj for path in files for obj in yaml.safe_load_all(path.read_text()) if obj]
    assert schema_errors(objects, version) == []


def test_secret_templates_hold_only_placeholders():
    secrets = [
        obj
        for path in MANIFESTS.rglob("*.yaml")
        for obj in yaml.safe_load_all(path.read_text())
        if obj and obj.get("kind") == "Secret"
    ]
    assert [s["metadata"]["name"] for s in secrets] == ["synthvlm-llm"]
    (secret,) = secrets
    assert set(secret["stringData"]) == {"OPENAI_API_KEY"}
    for value in secret_values(secret):
        assert value == "REPLACE_ME", f"secret template holds {value!r}, not the placeholder"
        assert not REAL_KEY.search(value)


# --- rendered -----------------------------------------------------------------------------------


@needs_kustomize
@pytest.mark.parametrize("variant", ["base", "gke", "gke+components", "standalone-kfp"])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_rendered_object_is_valid_kubernetes(rendered, variant, version):
    assert schema_errors(rendered[variant], version) == []


@needs_kustomize
@pytest.mark.parametrize("variant", ["base", "gke", "gke+components"])
def test_everything_namespaced_lands_in_the_synthvlm_namespace(rendered, variant):
    objects = rendered[variant]
    cluster_scoped = {"Namespace", "PriorityClass", "ClusterRole", "ClusterRoleBinding"}
    assert [ns["metadata"]["name"] for ns in find(objects, "Namespace")] == [NAMESPACE]
    for obj in objects:
        expected = None if obj["kind"] in cluster_scoped else NAMESPACE
        assert obj["metadata"].get("namespace") == expected, f"{obj['kind']}/{obj['metadata']['name']}"
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "synthvlm"


@needs_kustomize
def test_standalone_kfp_overlay_moves_everything_to_kubeflow(rendered):
    objects = rendered["standalone-kfp"]
    assert [ns["metadata"]["name"] for ns in find(objects, "Namespace")] == ["kubeflow"]
    for obj in objects:
        if obj["kind"] not in {"Namespace", "PriorityClass", "ClusterRole", "ClusterRoleBinding"}:
            assert obj["metadata"]["namespace"] == "kubeflow", f"{obj['kind']}/{obj['metadata']['name']}"
    bindings = find(objects, "RoleBinding") + find(objects, "ClusterRoleBinding")
    assert len(bindings) == 2
    # The grants must follow the service account, or the runner in `kubeflow` gets none of them.
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "synthvlm-runner", "namespace": "kubeflow"}
        ]


@needs_kustomize
def test_gke_service_account_has_workload_identity_annotation(rendered):
    (account,) = [
        sa for sa in find(rendered["gke"], "ServiceAccount") if sa["metadata"]["name"] == "synthvlm-runner"
    ]
    google_account = account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
    assert re.fullmatch(r"[^@\s]+@[^@\s]+\.iam\.gserviceaccount\.com", google_account)
    # The base stays cloud-neutral.
    (base_account,) = find(rendered["base"], "ServiceAccount")
    assert "iam.gke.io/gcp-service-account" not in (base_account["metadata"].get("annotations") or {})


@needs_kustomize
def test_runner_role_is_bound_to_the_runner_service_account(rendered):
    (binding,) = find(rendered["gke"], "RoleBinding")
    (role,) = find(rendered["gke"], "Role")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "synthvlm-runner", "namespace": NAMESPACE}
    ]
    granted = {
        (group, resource)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert (
        "argoproj.io",
        "workflowtaskresults",
    ) in granted  # the Argo executor cannot report outputs without it


def granted_verbs(role: dict) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


@needs_kustomize
def test_runner_may_create_and_follow_multi_node_training_jobs(rendered):
    """What synthvlm.train.trainjob (kubeflow SDK) and .kubeflow (PyTorchJob) call as the runner."""
    (role,) = find(rendered["gke"], "Role")
    verbs = granted_verbs(role)
    assert {"create", "get"} <= verbs[("trainer.kubeflow.org", "trainjobs")]
    assert "get" in verbs[("trainer.kubeflow.org", "trainingruntimes")]
    assert {"create", "get"} <= verbs[("kubeflow.org", "pytorchjobs")]
    assert "list" in verbs[("", "pods")]  # the SDK lists a TrainJob's pods for its steps
    # ClusterTrainingRuntimes are cluster-scoped: a ClusterRole bound to the runner account.
    (cluster_role,) = find(rendered["gke"], "ClusterRole")
    assert "get" in granted_verbs(cluster_role)[("trainer.kubeflow.org", "clustertrainingruntimes")]
    (binding,) = find(rendered["gke"], "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "synthvlm-runner", "namespace": NAMESPACE}
    ]


@needs_kustomize
@pytest.mark.parametrize("variant", ["base", "gke"])
def test_quota_limits_gpus(rendered, variant):
    (quota,) = find(rendered[variant], "ResourceQuota")
    gpus = quota["spec"]["hard"]["requests.nvidia.com/gpu"]
    assert str(gpus).isdigit() and int(gpus) > 0


@needs_kustomize
def test_gpu_priority_classes(rendered):
    classes = {pc["metadata"]["name"]: pc for pc in find(rendered["gke"], "PriorityClass")}
    assert set(classes) == {"synthvlm-gpu-batch", "synthvlm-gpu-train"}
    assert all(not pc.get("globalDefault") and 0 < pc["value"] < 1_000_000_000 for pc in classes.values())
    # Restartable shards never evict others; training may evict them.
    assert classes["synthvlm-gpu-batch"]["preemptionPolicy"] == "Never"
    assert classes["synthvlm-gpu-train"]["value"] > classes["synthvlm-gpu-batch"]["value"]


@needs_kustomize
def test_optional_pieces_stay_optional(rendered):
    # Applying the default overlay must never overwrite a real key created with `kubectl create secret`.
    for variant in ("base", "gke"):
        kinds = {obj["kind"] for obj in rendered[variant]}
        assert not kinds & {"Secret", "PersistentVolumeClaim"}, variant
    (secret,) = find(rendered["gke+components"], "Secret")
    assert secret["metadata"]["name"] == "synthvlm-llm"
    assert secret_values(secret) == ["REPLACE_ME"]
    claims = {
        claim["metadata"]["name"]: claim
        for claim in find(rendered["gke+components"], "PersistentVolumeClaim")
    }
    assert set(claims) == {"synthvlm-model-cache", "synthvlm-data"}
    assert all(claim["spec"]["accessModes"] == ["ReadWriteMany"] for claim in claims.values())
    # the Job that fills the model cache mounts it where the compiled pipelines set HF_HOME
    (job,) = find(rendered["gke+components"], "Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "synthvlm-model-cache"
    [container] = pod["containers"]
    assert {"name": "HF_HOME", "value": "/models/huggingface"} in container["env"]
    assert container["volumeMounts"][0]["mountPath"] == "/models"
