"""Upload compiled pipelines to Kubeflow Pipelines (KFP >= 2.0) and start runs there, with kfp.Client.

`upload_pipeline` uploads a new pipeline, or a new version when a pipeline of that name exists;
`submit_run` finds a pipeline (and its newest version, unless one is named) by name, gets or creates
the experiment and starts a run with the given arguments.

Credentials come from the environment (`KFPAuth.from_env`), through what kfp.Client 2.17 supports:
- `KFP_EXISTING_TOKEN`: a bearer token (kfp.Client(existing_token=...)), e.g. from
  `kubectl create token <service-account> -n <namespace> --audience pipelines.kubeflow.org`;
- `KF_PIPELINES_SA_TOKEN_PATH` (kfp's own variable): a file holding a token, re-read on every request
  (kfp's ServiceAccountTokenVolumeCredentials; the projected service-account token inside a pod);
- `KFP_COOKIES`: a Cookie header (kfp.Client(cookies=...)), e.g. the session cookie of a Kubeflow
  login behind Dex / oauth2-proxy.
No token or cookie value is ever logged or put into an error message.

Before kfp.Client is built we ask the API's healthz endpoint once, with short timeouts and no retry:
kfp.Client's constructor asks it too, but retries a refusal (401, ...) for ~25 s, waits forever on a
host that does not answer, and follows a redirect to a login page, where a CLI user wants a clear
error at once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import kfp
import kfp_server_api
import urllib3
from kfp.client import KF_PIPELINES_SA_TOKEN_ENV
from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

from synthvlm.errors import SynthVLMError

log = logging.getLogger(__name__)

TOKEN_ENV = "KFP_EXISTING_TOKEN"  # our name, after kfp.Client's `existing_token`
TOKEN_PATH_ENV = KF_PIPELINES_SA_TOKEN_ENV  # "KF_PIPELINES_SA_TOKEN_PATH", read by kfp itself
COOKIES_ENV = "KFP_COOKIES"  # our name, after kfp.Client's `cookies`
UI_ENDPOINT_ENV = "KF_PIPELINES_UI_ENDPOINT"  # kfp.Client's own: where the UI is, if not at the host

TIMEOUT_S = 10.0  # our choice: connect and read timeout of the reachability check (healthz is instant)
# No retries (a CLI user reruns; urllib3 would log a warning per retry); redirect=False: a 302 to a
# login page comes back as an answer we can explain instead of being followed.
_HEALTHZ_RETRY = urllib3.Retry(total=0, redirect=False)


class KFPError(SynthVLMError):
    """A Kubeflow Pipelines request failed; the message names the host and what to do."""


class KFPUnreachableError(KFPError):
    """No answer from the host (connection refused, DNS, timeout, TLS)."""


class KFPAuthError(KFPError):
    """The host wants credentials (401/403, or a redirect to a login page)."""


class KFPNotFoundError(KFPError):
    """No pipeline (or version) of that name."""


@dataclass(frozen=True)
class KFPAuth:
    """How to authenticate; at most one of the three is used (token, then token file, then cookies)."""

    token: str | None = field(default=None, repr=False)
    token_path: str | None = None
    cookies: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> KFPAuth:
        env = os.environ if environ is None else environ
        return cls(
            token=env.get(TOKEN_ENV) or None,
            token_path=env.get(TOKEN_PATH_ENV) or None,
            cookies=env.get(COOKIES_ENV) or None,
        )

    def describe(self) -> str:
        """What is sent, without any secret."""
        if self.token:
            return f"a bearer token (${TOKEN_ENV})"
        if self.token_path:
            return f"the token in {self.token_path} (${TOKEN_PATH_ENV})"
        if self.cookies:
            return f"cookies (${COOKIES_ENV})"
        return "no credentials"

    def client_kwargs(self) -> dict[str, Any]:
        if self.token:
            return {"existing_token": self.token}
        if self.token_path:
            return {"credentials": ServiceAccountTokenVolumeCredentials(self.token_path)}
        if self.cookies:
            return {"cookies": self.cookies}
        return {}

    def cookie_header(self) -> str | None:
        return self.cookies if not (self.token or self.token_path) else None

    def configure(self, config: kfp_server_api.Configuration) -> None:
        """Set up a bare API configuration the way kfp.Client does for these credentials."""
        if self.token:
            config.api_key["authorization"] = self.token
            config.api_key_prefix["authorization"] = "Bearer"
        elif self.token_path:
            config.api_key["authorization"] = "placeholder"  # replaced by the hook on every request
            config.api_key_prefix["authorization"] = "Bearer"
            config.refresh_api_key_hook = ServiceAccountTokenVolumeCredentials(
                self.token_path
            ).refresh_api_key_hook


# ---------------------------------------------------------------- public API


def upload_pipeline(
    host: str,
    package_path: str,
    name: str,
    namespace: str | None = None,
    version: str | None = None,
    *,
    description: str | None = None,
    auth: KFPAuth | None = None,
    timeout_s: float = TIMEOUT_S,
) -> dict[str, Any]:
    """Upload a compiled pipeline as `name`, or as a new version of the pipeline of that name.

    `version` names the new version (default: UTC timestamp + content hash); a new pipeline's first
    version is named after the pipeline by the API server. Returns the ids, names and the UI link.
    """
    if not Path(package_path).is_file():
        raise KFPError(f"pipeline package {package_path} not found; compile it first (synthvlm compile)")
    session = _Session.open(host, namespace, auth, timeout_s)
    existing = session.find_pipeline(name, namespace, include_shared=False)
    if existing is None:
        with session.translate(f"uploading pipeline {name!r}"):
            pipeline = _quiet(
                session.client.upload_pipeline,
                package_path,
                pipeline_name=name,
                description=description,
                namespace=namespace,
            )
        pipeline_version = session.latest_version(pipeline.pipeline_id, name)
        log.info("uploaded new pipeline %r to %s", name, session.host)
        if version:
            log.warning(
                "version name %r not used: the API server names a new pipeline's first version", version
            )
    else:
        version_name = version or default_version_name(package_path)
        with session.translate(f"uploading version {version_name!r} of pipeline {name!r}"):
            pipeline_version = _quiet(
                session.client.upload_pipeline_version,
                package_path,
                pipeline_version_name=version_name,
                pipeline_id=existing.pipeline_id,
                description=description,
            )
        log.info("uploaded version %r of pipeline %r to %s", version_name, name, session.host)
    pipeline_id, version_id = pipeline_version.pipeline_id, pipeline_version.pipeline_version_id
    return {
        "pipeline_id": pipeline_id,
        "pipeline_name": name,
        "version_id": version_id,
        "version_name": pipeline_version.display_name or pipeline_version.name,
        "new_pipeline": existing is None,
        "url": f"{session.ui_base}/#/pipelines/details/{pipeline_id}/version/{version_id}",
    }


def submit_run(
    host: str,
    pipeline_name: str,
    arguments: dict[str, Any],
    experiment: str = "synthvlm",
    namespace: str | None = None,
    run_name: str | None = None,
    version: str | None = None,
    *,
    service_account: str | None = None,
    auth: KFPAuth | None = None,
    timeout_s: float = TIMEOUT_S,
) -> dict[str, Any]:
    """Start a run of an uploaded pipeline (its newest version unless `version` names one).

    `arguments` are the pipeline parameters, passed through as they are (the caller validates them).
    `service_account`: the Kubernetes service account the run's pods use (None or "": the namespace's
    default, which has no bucket rights in our manifests).
    The experiment is created if it does not exist. Returns the run id and its UI link.
    """
    session = _Session.open(host, namespace, auth, timeout_s)
    if session.multi_user and not namespace:
        raise KFPError(
            f"Kubeflow Pipelines at {session.host} is multi-user: runs live in a namespace; pass "
            "--namespace (your Kubeflow profile namespace)"
        )
    pipeline = session.find_pipeline(pipeline_name, namespace, include_shared=True)
    if pipeline is None:
        where = f" in namespace {namespace!r}" if namespace else ""
        raise KFPNotFoundError(
            f"no pipeline named {pipeline_name!r} at {session.host}{where}; upload it first: "
            f"synthvlm upload --host {session.host} --pipeline {pipeline_name}"
        )
    if version is None:
        pipeline_version = session.latest_version(pipeline.pipeline_id, pipeline_name)
    else:
        pipeline_version = session.find_version(pipeline.pipeline_id, pipeline_name, version)
    with session.translate(f"getting or creating experiment {experiment!r}"):
        experiment_info = _quiet(session.client.create_experiment, experiment, namespace=namespace)
    name = run_name or f"{pipeline_name} {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S}"
    with session.translate(f"starting a run of pipeline {pipeline_name!r}"):
        run = _quiet(
            session.client.run_pipeline,
            experiment_id=experiment_info.experiment_id,
            job_name=name,
            params=dict(arguments),
            pipeline_id=pipeline.pipeline_id,
            version_id=pipeline_version.pipeline_version_id,
            service_account=service_account or None,
        )
    log.info("started run %r (%s) at %s", name, run.run_id, session.host)
    return {
        "run_id": run.run_id,
        "run_name": name,
        "experiment_id": experiment_info.experiment_id,
        "pipeline_id": pipeline.pipeline_id,
        "version_id": pipeline_version.pipeline_version_id,
        "version_name": pipeline_version.display_name or pipeline_version.name,
        "url": f"{session.ui_base}/#/runs/details/{run.run_id}",
    }


def default_version_name(package_path: str, now: dt.datetime | None = None) -> str:
    """UTC timestamp + the first 8 hex digits of the package's SHA-256: sorts by time, tells content apart."""
    digest = hashlib.sha256(Path(package_path).read_bytes()).hexdigest()[:8]
    return f"{(now or dt.datetime.now(dt.UTC)):%Y%m%d-%H%M%S}-{digest}"


# ---------------------------------------------------------------- session: client + error translation


@dataclass
class _Session:
    host: str  # as the user gave it, minus a trailing slash and any user:password
    url: str  # what requests go to
    auth: KFPAuth
    multi_user: bool
    client: kfp.Client = field(repr=False)

    @classmethod
    def open(cls, host: str, namespace: str | None, auth: KFPAuth | None, timeout_s: float) -> _Session:
        url = _normalise_host(host)
        shown = _redact(url)
        auth = KFPAuth.from_env() if auth is None else auth
        health = _check_reachable(url, shown, auth, timeout_s)
        kwargs = auth.client_kwargs()
        if namespace:
            kwargs["namespace"] = namespace
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP v2.0.0-beta.2 and later"
            with _translating(shown, auth, "connecting"):
                client = _quiet(kfp.Client, host=url, **kwargs)
        return cls(shown, url, auth, bool(health.get("multi_user")), client)

    @property
    def ui_base(self) -> str:
        return os.environ.get(UI_ENDPOINT_ENV, "").rstrip("/") or self.host

    def translate(self, action: str) -> contextlib.AbstractContextManager[None]:
        return _translating(self.host, self.auth, action)

    def find_pipeline(
        self, name: str, namespace: str | None, include_shared: bool
    ) -> kfp_server_api.V2beta1Pipeline | None:
        # Not kfp.Client.get_pipeline_id: it ignores namespaces.
        namespaces = [namespace, None] if namespace and include_shared else [namespace]
        for ns in namespaces:
            with self.translate(f"looking up pipeline {name!r}"):
                found = self.client.list_pipelines(filter=_name_filter(name), namespace=ns, page_size=2)
            pipelines = found.pipelines or []
            if len(pipelines) > 1:
                raise KFPError(
                    f"{len(pipelines)} pipelines named {name!r} at {self.host}; names must be unique"
                )
            if pipelines:
                return pipelines[0]
        return None

    def latest_version(self, pipeline_id: str, pipeline_name: str) -> kfp_server_api.V2beta1PipelineVersion:
        with self.translate(f"listing versions of pipeline {pipeline_name!r}"):
            found = self.client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc")
        if not found.pipeline_versions:
            raise KFPNotFoundError(f"pipeline {pipeline_name!r} at {self.host} has no versions; upload one")
        return found.pipeline_versions[0]

    def find_version(
        self, pipeline_id: str, pipeline_name: str, version: str
    ) -> kfp_server_api.V2beta1PipelineVersion:
        with self.translate(f"looking up version {version!r} of pipeline {pipeline_name!r}"):
            found = self.client.list_pipeline_versions(pipeline_id, filter=_name_filter(version), page_size=1)
            if found.pipeline_versions:
                return found.pipeline_versions[0]
            newest = self.client.list_pipeline_versions(pipeline_id, page_size=5, sort_by="created_at desc")
        names = ", ".join(repr(v.display_name) for v in newest.pipeline_versions or []) or "none"
        raise KFPNotFoundError(
            f"pipeline {pipeline_name!r} at {self.host} has no version {version!r}; newest versions: {names}"
        )


def _check_reachable(url: str, shown: str, auth: KFPAuth, timeout_s: float) -> dict[str, Any]:
    """GET healthz once with short timeouts; return its JSON (`multi_user`, ...)."""
    config = kfp_server_api.Configuration(host=url)
    config.retries = _HEALTHZ_RETRY
    auth.configure(config)
    with (
        _translating(shown, auth, "checking the API (healthz)"),
        kfp_server_api.ApiClient(config, cookie=auth.cookie_header()) as api_client,
    ):
        response = kfp_server_api.HealthzServiceApi(api_client).healthz_service_get_healthz(
            _preload_content=False, _request_timeout=(timeout_s, timeout_s)
        )
    content_type = response.headers.get("Content-Type", "")
    try:
        health = json.loads(response.data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        health = None
    if not isinstance(health, dict):
        if "html" in content_type:
            raise KFPAuthError(
                f"{shown} answered with a web page, not the KFP API (a login page?); "
                f"sent {auth.describe()}. {_CREDENTIALS_HINT}"
            )
        raise KFPError(f"{shown} does not look like the Kubeflow Pipelines API (healthz is not JSON)")
    return health


_CREDENTIALS_HINT = (
    f"Set ${TOKEN_ENV} to a bearer token (e.g. `kubectl create token <service-account> -n <namespace> "
    f"--audience pipelines.kubeflow.org`), or ${TOKEN_PATH_ENV} to a file holding one, or ${COOKIES_ENV} "
    "to the session cookie of a Kubeflow login (e.g. 'oauth2_proxy_kubeflow=...')."
)


@contextlib.contextmanager
def _translating(host: str, auth: KFPAuth, action: str) -> Iterator[None]:
    """Turn kfp / kfp_server_api / urllib3 errors into KFPError subclasses with what to do."""
    try:
        yield
    except kfp_server_api.ApiException as exc:
        # `from None`: the ApiException's own text carries response headers (Set-Cookie, ...).
        raise _api_error(exc, host, auth, action) from None
    except urllib3.exceptions.HTTPError as exc:
        raise KFPUnreachableError(
            f"cannot reach Kubeflow Pipelines at {host} ({action}): {_connection_reason(exc)}. Check the URL "
            "and that the API answers from here, e.g. `kubectl port-forward -n kubeflow svc/ml-pipeline-ui "
            "8080:80` and --host http://localhost:8080"
        ) from None
    except OSError as exc:
        if not (auth.token_path and exc.filename == auth.token_path):
            raise
        raise KFPAuthError(
            f"cannot read the token file {auth.token_path} (${TOKEN_PATH_ENV}): {exc.strerror}"
        ) from None


def _api_error(exc: kfp_server_api.ApiException, host: str, auth: KFPAuth, action: str) -> KFPError:
    status = exc.status or 0
    detail = f"HTTP {status} {exc.reason or ''}".strip()
    message = _server_message(exc.body)
    if message:
        detail += f": {message}"
    if status == 0:  # kfp_server_api's way of reporting a TLS failure
        return KFPUnreachableError(f"cannot reach Kubeflow Pipelines at {host} ({action}): {exc.reason}")
    if status in (401, 403):
        access = ""
        if status == 403 and auth.describe() != "no credentials":
            access = " (if the credentials are right, the account may lack access to this namespace)"
        return KFPAuthError(
            f"Kubeflow Pipelines at {host} refused the request ({action}; {detail}); sent "
            f"{auth.describe()}{access}. {_CREDENTIALS_HINT}"
        )
    if 300 <= status < 400:
        location = _strip_query((exc.headers or {}).get("Location", "")) or "elsewhere"
        return KFPAuthError(
            f"{host} redirected to {location} ({action}): it wants a login; sent {auth.describe()}. "
            f"{_CREDENTIALS_HINT}"
        )
    if status == 409:
        return KFPError(f"Kubeflow Pipelines at {host}: {action} failed ({detail}); choose another name")
    if status == 404 and "healthz" in action:
        return KFPError(f"{host} has no KFP v2 API ({detail}); is this the Kubeflow Pipelines (>= 2.0) URL?")
    return KFPError(f"Kubeflow Pipelines at {host}: {action} failed ({detail})")


def _server_message(body: bytes | str | None) -> str:
    """The `message` of a grpc-gateway error body, else the start of the body."""
    if not body:
        return ""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and data.get("message"):
        text = str(data["message"])
    return " ".join(text.split())[:300]


def _connection_reason(exc: urllib3.exceptions.HTTPError) -> str:
    reason = getattr(exc, "reason", None) or exc  # MaxRetryError wraps the last failure
    # Order matters: NameResolutionError < NewConnectionError < ConnectTimeoutError in urllib3 2.
    if isinstance(reason, urllib3.exceptions.NameResolutionError):
        return "host name not found (DNS)"
    if isinstance(reason, urllib3.exceptions.NewConnectionError):
        # "HTTPConnection(host=..., port=...): Failed to establish a new connection: [Errno 111] ..."
        return "could not connect: " + str(reason).rsplit("new connection: ", 1)[-1]
    if isinstance(reason, urllib3.exceptions.ConnectTimeoutError):
        return "connection timed out"
    if isinstance(reason, urllib3.exceptions.ReadTimeoutError):
        return "no answer in time (read timeout)"
    if isinstance(reason, urllib3.exceptions.SSLError):
        return f"TLS error: {reason}"
    return str(reason)


# ---------------------------------------------------------------- small helpers


def _quiet(func, *args, **kwargs):
    """Call a kfp.Client method without its "Pipeline details: <link>" prints (we return the links)."""
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        result = func(*args, **kwargs)
    if printed.getvalue().strip():
        log.debug("kfp: %s", printed.getvalue().strip())
    return result


def _name_filter(name: str) -> str:
    # The filter kfp.Client.get_pipeline_id sends (filter.proto Predicate, EQUALS on display_name).
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def _normalise_host(host: str) -> str:
    if not host.startswith(("http://", "https://")):
        raise KFPError(
            f"--host {_redact(host)!r}: give a URL with http:// or https:// (e.g. http://localhost:8080)"
        )
    return host.rstrip("/")


def _redact(url: str) -> str:
    """The URL without a user:password part (never print credentials)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _strip_query(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query="", fragment=""))
