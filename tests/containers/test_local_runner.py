"""SYNTHVLM_LOCAL_RUNNER picks kfp.local's runner for `synthvlm run --local` (no Docker needed here)."""

from __future__ import annotations

import pytest
from kfp import local

from synthvlm.errors import SynthVLMError
from synthvlm.kfp_support import _local_runner


def test_default_is_the_subprocess_runner(monkeypatch):
    monkeypatch.delenv("SYNTHVLM_LOCAL_RUNNER", raising=False)
    assert isinstance(_local_runner("/data/run/kfp-local"), local.SubprocessRunner)


def test_docker_runner_without_network_as_the_given_user_with_the_data_root_mounted(monkeypatch):
    monkeypatch.setenv("SYNTHVLM_LOCAL_RUNNER", "docker")
    monkeypatch.setenv("SYNTHVLM_DOCKER_USER", "1000890000:0")
    runner = _local_runner("/data/run/kfp-local")
    assert isinstance(runner, local.DockerRunner)
    args = runner.container_run_args
    assert (args["network_mode"], args["user"]) == ("none", "1000890000:0")
    [mount] = args["mounts"]
    assert (mount["Source"], mount["Target"], mount["Type"]) == ("/data/run", "/data/run", "bind")


def test_unknown_runner_is_an_error(monkeypatch):
    monkeypatch.setenv("SYNTHVLM_LOCAL_RUNNER", "podman")
    with pytest.raises(SynthVLMError, match="podman"):
        _local_runner("/x/kfp-local")
