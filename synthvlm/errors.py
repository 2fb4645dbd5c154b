"""Errors that name where bad input is, so a user can fix the file rather than read a traceback."""

from __future__ import annotations


class SynthVLMError(Exception):
    """Base class for errors we raise on purpose (the CLI prints them without a traceback)."""

    exit_code = 2  # the CLI's exit status: bad input or configuration


class InputError(SynthVLMError):
    """Bad input data: names the file, the line (or record) and the field."""

    def __init__(
        self,
        file: str,
        message: str,
        *,
        line: int | None = None,
        field: str | None = None,
        unit: str = "line",
    ):
        # unit: "line" for text formats, "row" for Parquet, "record" for in-memory lists.
        self.file, self.line, self.field, self.reason = file, line, field, message
        where = file
        if line is not None:
            where += f", {unit} {line}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


class ConfigError(SynthVLMError):
    """A bad configuration value: names the field and what is allowed."""


class CredentialsError(SynthVLMError):
    """No Google Cloud credentials for a gs:// URI: says how to provide them."""

    def __init__(self, uri: str | None = None, detail: str = ""):
        self.uri, self.detail = uri, detail
        what = f"cannot access {uri}" if uri else "cannot access gs:// URIs"
        super().__init__(
            f"{what}: no Google Cloud credentials found. Provide them with GOOGLE_APPLICATION_CREDENTIALS="
            "<service-account key JSON>, `gcloud auth application-default login`, or on GKE with Workload "
            "Identity (a Kubernetes service account bound to a Google service account)"
            + (f" [google.auth: {detail}]" if detail else "")
        )


class S3CredentialsError(CredentialsError):
    """No usable AWS credentials for an s3:// URI: says how to provide them (and the endpoint in use)."""

    def __init__(self, uri: str, detail: str = "", *, refused: bool = False, endpoint: str | None = None):
        self.uri, self.detail, self.endpoint = uri, detail, endpoint
        what = "the credentials were refused" if refused else "no AWS credentials found"
        SynthVLMError.__init__(
            self,
            f"cannot access {uri}{f' at {endpoint}' if endpoint else ''}: {what}. Provide them with "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (on Kubeflow's MinIO: from the "
            "mlpipeline-minio-artifact Secret), AWS_PROFILE, or on EKS with IRSA / Pod Identity; set "
            "AWS_ENDPOINT_URL for an S3-compatible store" + (f" [botocore: {detail}]" if detail else ""),
        )


class TaskFailedError(SynthVLMError):
    """A task of a local pipeline run failed; carries the task's own error message when it was found."""

    def __init__(self, task: str | None, message: str, *, bad_input: bool):
        self.task, self.reason, self.bad_input = task, message, bad_input
        # Bad input exits 2 like a stage command; anything else (a crash, a kill) exits 1.
        self.exit_code = 2 if bad_input else 1
        super().__init__(f"task '{task}' failed: {message}" if task else message)
