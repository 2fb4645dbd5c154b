"""A usable HOME, caches and user name under any UID (OpenShift's restricted policy, `docker run --user`).

The images set HOME, USER/LOGNAME and every cache variable to group-0 writable places (images/Dockerfile).
This is the fallback when a pod overrides them, or runs elsewhere: under an arbitrary UID with no passwd
entry HOME may be `/` or unset and `getpass.getuser()` (torch inductor's default cache dir calls it)
raises, so the first model download or compile fails far from the cause. `ensure_any_uid()` (called by
every component through kfp_support.setup_logging) points HOME at a private temp folder when HOME is not
a writable folder, moves any cache variable whose folder cannot be written under the new HOME's cache,
and sets USER and LOGNAME when no user name is in the environment and the UID has no passwd entry.
"""

from __future__ import annotations

import os
import pwd
import tempfile
from collections.abc import MutableMapping

# Cache variables and their folder under $XDG_CACHE_HOME when they must move. Unset ones are left
# alone: the libraries derive them from HOME / XDG_CACHE_HOME, which are made usable first.
CACHE_VARS = {
    "HF_HOME": "huggingface",
    "TORCH_HOME": "torch",
    "TRITON_CACHE_DIR": "triton",
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
    "MPLCONFIGDIR": "matplotlib",
}
USER_VARS = ("LOGNAME", "USER", "LNAME", "USERNAME")  # what getpass.getuser() reads, in its order


def writable_dir(path: str | None) -> bool:
    """`path` is (or can be made) a folder this process can create files in."""
    if not path or not os.path.isabs(path):
        return False
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def _private_home() -> str:
    home = os.path.join(tempfile.gettempdir(), f"synthvlm-home-{os.getuid()}")
    return home if writable_dir(home) else tempfile.mkdtemp(prefix="synthvlm-home-")


def ensure_any_uid(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Fix HOME, the cache variables and the user name in `environ` (os.environ); say what changed."""
    env = os.environ if environ is None else environ
    changes: list[str] = []

    def put(name: str, value: str, why: str) -> None:
        env[name] = value
        writable_dir(value)  # made now, so that every later reader finds it
        changes.append(f"{name}={value} ({why})")

    uid = os.getuid()
    try:
        entry: pwd.struct_passwd | None = pwd.getpwuid(uid)
    except KeyError:
        entry = None
    if not any(env.get(name) for name in USER_VARS) and entry is None:
        for name in ("USER", "LOGNAME"):
            put(name, f"uid{uid}", f"uid {uid} has no passwd entry")
    home = env.get("HOME")
    if not writable_dir(home):
        if not home and entry is not None and writable_dir(entry.pw_dir):
            put("HOME", entry.pw_dir, "HOME was unset")
        else:
            put(
                "HOME",
                _private_home(),
                f"HOME {home!r} is not a writable folder" if home else "HOME was unset",
            )
    cache = env.get("XDG_CACHE_HOME")
    if cache and not writable_dir(cache):
        cache = os.path.join(env["HOME"], ".cache")
        put("XDG_CACHE_HOME", cache, "its folder is not writable")
    cache = cache or os.path.join(env["HOME"], ".cache")
    for name, folder in CACHE_VARS.items():
        if env.get(name) and not writable_dir(env[name]):
            put(name, os.path.join(cache, folder), "its folder is not writable")
    return changes
