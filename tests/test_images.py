import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import synthvlm
from synthvlm import images
from synthvlm.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_image_settings(monkeypatch):
    monkeypatch.delenv("SYNTHVLM_IMAGE_REGISTRY", raising=False)
    monkeypatch.delenv("SYNTHVLM_IMAGE_TAG", raising=False)
    images.set_image_overrides(None, None)
    yield
    images.set_image_overrides(None, None)


def test_defaults_use_project_registry_and_package_version():
    assert images.image_for("cpu") == f"ghcr.io/synthvlm/synthvlm-cpu:{synthvlm.__version__}"
    assert images.image_for("diffusion") == f"ghcr.io/synthvlm/synthvlm-diffusion:{synthvlm.__version__}"
    assert images.image_for("train") == f"ghcr.io/synthvlm/synthvlm-train:{synthvlm.__version__}"
    assert images.image_for("eval") == f"ghcr.io/synthvlm/synthvlm-eval:{synthvlm.__version__}"


def test_environment_overrides_registry_and_tag(monkeypatch):
    monkeypatch.setenv("SYNTHVLM_IMAGE_REGISTRY", "europe-docker.pkg.dev/proj/repo/")
    monkeypatch.setenv("SYNTHVLM_IMAGE_TAG", "abc123")
    assert images.image_for("train") == "europe-docker.pkg.dev/proj/repo/synthvlm-train:abc123"


def test_set_image_overrides_beats_environment_and_none_falls_back(monkeypatch):
    monkeypatch.setenv("SYNTHVLM_IMAGE_REGISTRY", "env.example/r")
    monkeypatch.setenv("SYNTHVLM_IMAGE_TAG", "envtag")
    images.set_image_overrides("cli.example/r", None)
    assert images.image_for("cpu") == "cli.example/r/synthvlm-cpu:envtag"
    images.set_image_overrides(None, "clitag")
    assert images.image_for("cpu") == "env.example/r/synthvlm-cpu:clitag"
    images.set_image_overrides(None, None)
    assert images.image_for("cpu") == "env.example/r/synthvlm-cpu:envtag"


def test_unknown_family_names_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"unknown image family 'gpu'.*cpu, diffusion, train, eval"):
        images.image_for("gpu")


@pytest.mark.parametrize("tag", ["0.1.0+local", "has space", "-leading-dash"])
def test_invalid_tag_is_rejected(tag):
    images.set_image_overrides(None, tag)
    with pytest.raises(ConfigError, match="not a valid Docker tag"):
        images.image_for("cpu")


def test_module_main_prints_all_references(monkeypatch):
    monkeypatch.setenv("SYNTHVLM_IMAGE_REGISTRY", "reg.example/x")
    monkeypatch.setenv("SYNTHVLM_IMAGE_TAG", "t1")
    out = subprocess.run(
        [sys.executable, "-m", "synthvlm.images"], check=True, capture_output=True, text=True
    ).stdout
    assert out.split() == [f"reg.example/x/synthvlm-{family}:t1" for family in images.FAMILIES]


# --- images/: Dockerfile targets and build script agree with this module ----------------------

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "images" / "Dockerfile"


def dockerfile_instructions(keyword: str) -> list[list[str]]:
    """Arguments of every `keyword` instruction (continuation lines joined, flags dropped)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [
        [word for word in line.split()[1:] if not word.startswith("--")]
        for line in text.splitlines()
        if line.split()[:1] == [keyword]
    ]


def test_dockerfile_has_a_target_per_family():
    stages = {
        args[-1] for args in dockerfile_instructions("FROM") if len(args) == 3 and args[1].lower() == "as"
    }
    assert set(images.FAMILIES) <= stages


def test_eval_image_is_the_train_image_plus_pinned_lmms_eval():
    """The evaluate step's image: everything the train image has, and lmms-eval at one pinned version."""
    assert ["train", "AS", "eval"] in dockerfile_instructions("FROM")
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    eval_stage = text[text.index("FROM train AS eval") :]
    [install] = [line for line in eval_stage.splitlines() if line.startswith("RUN ") and "lmms-eval" in line]
    assert re.search(r"\blmms-eval==\d+(\.\d+)+\b", install), install
    # lmms-eval's llava_hf backend imports decord without declaring it
    assert re.search(r"\bdecord==\d+(\.\d+)+\b", install), install
    assert "pip check" in install
    # Everything lmms-eval pulls in beyond constraints.txt is pinned too (images/constraints-eval.txt), and
    # the two files are merged with the eval pins winning: a rebuild gets the same image.
    assert "-c /reqs/constraints-eval-merged.txt" in install
    assert "merge_constraints.py constraints.txt constraints-eval.txt > constraints-eval-merged.txt" in text
    assert "images/constraints-eval.txt" in [s for args in dockerfile_instructions("COPY") for s in args[:-1]]
    assert "!images/constraints-eval.txt" in (REPO / "images" / "Dockerfile.dockerignore").read_text()


def test_eval_constraints_pin_lmms_eval_and_add_only_new_packages():
    def pins(path: Path) -> dict[str, str]:
        lines = [line.strip() for line in path.read_text().splitlines()]
        entries = [line for line in lines if line and not line.startswith("#")]
        assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", e) for e in entries), path
        return {re.sub(r"[-_.]+", "-", e.split("==")[0]).lower(): e.split("==")[1] for e in entries}

    base = pins(REPO / "constraints.txt")
    extra = pins(REPO / "images" / "constraints-eval.txt")
    assert extra["lmms-eval"] == "0.7.3" and "decord" in extra
    # Both files may pin a package (the dev extras share some of lmms-eval's dependencies) with the same
    # version; the only difference allowed is the one images/merge_constraints.py documents.
    differing = {name for name in set(extra) & set(base) if extra[name] != base[name]}
    assert differing <= {"antlr4-python3-runtime"}, differing
    merge_doc = (REPO / "images" / "merge_constraints.py").read_text()
    assert all(name in merge_doc for name in differing)


def test_dockerfile_copies_existing_paths_and_every_package():
    copied = [source for args in dockerfile_instructions("COPY") for source in args[:-1]]
    missing = [source for source in copied if not (REPO / source).exists()]
    assert missing == [], f"images/Dockerfile copies paths that do not exist: {missing}"
    with open(REPO / "pyproject.toml", "rb") as f:
        packages = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {pattern.rstrip("*") for pattern in packages} <= set(copied)
    assert "constraints.txt" in copied
    # Dockerfile.dockerignore keeps everything else (.venv, runs) out of the build context.
    ignore_lines = (REPO / "images" / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore_lines
    assert [source for source in copied if f"!{source}" not in ignore_lines] == []


def test_build_script_dry_run_builds_and_pushes_every_family():
    env = {**os.environ, "REGISTRY": "reg.example/proj", "TAG": "t2"}
    out = subprocess.run(
        ["bash", str(REPO / "images" / "build.sh"), "--dry-run"],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    commands = [shlex.split(line) for line in out.splitlines()]
    assert len(commands) == 2 * len(images.FAMILIES)
    for family, (build, push) in zip(
        images.FAMILIES, zip(commands[::2], commands[1::2], strict=True), strict=True
    ):
        reference = f"reg.example/proj/synthvlm-{family}:t2"
        assert build[:2] == ["docker", "build"]
        assert build[build.index("--target") + 1] == family
        assert build[build.index("-t") + 1] == reference
        assert build[build.index("-f") + 1] == str(DOCKERFILE)
        assert push == ["docker", "push", reference]


def test_build_script_rejects_unknown_family_before_running_docker():
    result = subprocess.run(
        ["bash", str(REPO / "images" / "build.sh"), "--dry-run", "gpu"], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert result.stdout == ""
    assert "unknown image family 'gpu'" in result.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_images_makefile_passes_registry_and_tag_to_the_build_script():
    out = subprocess.run(
        ["make", "-s", "-C", str(REPO / "images"), "dry-run", "REGISTRY=reg.example/m", "TAG=t3"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    pushed = [line.split()[-1] for line in out.splitlines() if line.startswith("docker push ")]
    assert pushed == [f"reg.example/m/synthvlm-{family}:t3" for family in images.FAMILIES]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_images_builds_and_pushes_every_family_including_eval():
    """`make images` (the README's build step) goes through build.sh, so it builds every family."""
    out = subprocess.run(
        ["make", "-s", "-C", str(REPO), "images", "DRY_RUN=1", "REGISTRY=reg.example/m", "TAG=t4"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    commands = [shlex.split(line) for line in out.splitlines() if line.startswith("docker ")]
    built = [c[c.index("--target") + 1] for c in commands if c[:2] == ["docker", "build"]]
    pushed = [c[-1] for c in commands if c[:2] == ["docker", "push"]]
    assert built == list(images.FAMILIES) and "eval" in built
    assert pushed == [f"reg.example/m/synthvlm-{family}:t4" for family in images.FAMILIES]
