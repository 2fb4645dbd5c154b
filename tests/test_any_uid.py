"""Any UID: an unwritable HOME and a UID without a passwd entry still give a user name and writable caches."""

from __future__ import annotations

import getpass
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from synthvlm import any_uid
from synthvlm.any_uid import CACHE_VARS, USER_VARS, ensure_any_uid

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_passwd_entry(monkeypatch):
    def getpwuid(uid: int):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", getpwuid)
    for name in USER_VARS:
        monkeypatch.delenv(name, raising=False)


def test_unwritable_home_and_no_passwd_entry(tmp_path, monkeypatch, no_passwd_entry):
    not_a_folder = tmp_path / "home-is-a-file"
    not_a_folder.write_text("")
    monkeypatch.setenv("HOME", str(not_a_folder))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(any_uid.tempfile, "tempdir", None)  # re-read TMPDIR
    # caches named under the unwritable HOME, as an image's ENV would for its own HOME
    for name, folder in CACHE_VARS.items():
        monkeypatch.setenv(name, str(not_a_folder / ".cache" / folder))
    monkeypatch.setenv("XDG_CACHE_HOME", str(not_a_folder / ".cache"))
    with pytest.raises((KeyError, OSError)):  # KeyError up to Python 3.12
        getpass.getuser()  # what torch inductor's default cache dir would hit

    changes = ensure_any_uid()

    assert getpass.getuser() == f"uid{os.getuid()}"
    home = Path(os.environ["HOME"])
    assert home.is_dir() and home.parent == tmp_path / "tmp"
    assert os.path.expanduser("~") == str(home)
    for name in (*CACHE_VARS, "XDG_CACHE_HOME"):
        folder = Path(os.environ[name])
        assert folder.is_relative_to(home), name
        (folder / "probe").write_text("ok")  # writable
    assert any(change.startswith("HOME=") for change in changes)
    assert ensure_any_uid() == []  # settled: a second call changes nothing


def test_usable_environment_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USER", "someone")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    before = dict(os.environ)
    assert ensure_any_uid() == []
    assert dict(os.environ) == before


def test_unset_home_without_passwd_entry(tmp_path, monkeypatch, no_passwd_entry):
    monkeypatch.delenv("HOME")
    monkeypatch.setattr(any_uid.tempfile, "tempdir", str(tmp_path))
    ensure_any_uid()
    assert Path(os.environ["HOME"]).parent == tmp_path
    assert os.environ["LOGNAME"] == os.environ["USER"] == f"uid{os.getuid()}"


def test_every_component_starts_with_it(tmp_path):
    """setup_logging (the first call of every component) applies the fallback in a fresh process."""
    file_home = tmp_path / "file"
    file_home.write_text("")
    code = (
        "import getpass, os; from synthvlm.kfp_support import setup_logging; setup_logging(); "
        "print(os.environ['HOME']); print(getpass.getuser())"
    )
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(file_home),
        "TMPDIR": str(tmp_path),
        "PYTHONPATH": str(REPO),
    }
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    home, user = proc.stdout.split()
    assert Path(home).parent == tmp_path and user  # (root has a passwd entry: its name)
    assert "any-UID fallback: HOME=" in proc.stderr
