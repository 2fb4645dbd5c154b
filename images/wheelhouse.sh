#!/usr/bin/env bash
# Fill images/wheelhouse/ with a wheel for every package the images install, so that images/build.sh
# can build them without a package index (air-gapped hosts, or no PyTorch index):
#
#   images/wheelhouse.sh                       # on a host with PyPI (or a mirror) and Python 3.11
#   WHEELHOUSE=1 images/build.sh --no-push     # then builds use --no-index --find-links the wheelhouse
#
# Under constraints.txt (+ images/constraints-eval.txt for the eval image): torch and torchvision (PyPI's,
# with the CUDA libraries: the PyTorch CPU index is not used here, so the cpu image gets them too), the
# package's dependencies from pyproject.toml, lmms-eval and decord (eval image), and setuptools (the build
# backend of `pip install /src`). `pip wheel` builds sdist-only packages into wheels once, here.
# Wheels already in the folder are reused, so a rerun costs only what changed. Needs Python 3.11 on
# linux x86_64 (the images' interpreter and platform): PYTHON picks the interpreter (default: .venv's).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${WHEELHOUSE_DIR:-$repo_root/images/wheelhouse}"
python="${PYTHON:-python3}"
[[ -x "$repo_root/.venv/bin/python" && -z "${PYTHON:-}" ]] && python="$repo_root/.venv/bin/python"
"$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), "wheelhouse.sh: needs Python 3.11"'
mkdir -p "$out"
reqs="$(mktemp)"

"$python" -c "import tomllib; \
print('\n'.join(tomllib.load(open('$repo_root/pyproject.toml', 'rb'))['project']['dependencies']))" >"$reqs"
merged="$(mktemp)"
trap 'rm -f "$reqs" "$merged"' EXIT
"$python" "$repo_root/images/merge_constraints.py" "$repo_root/constraints.txt" \
  "$repo_root/images/constraints-eval.txt" >"$merged"
# Two resolutions, as in the Dockerfile: cpu/gpu images under constraints.txt, then the eval image's
# additions under both files merged (merge_constraints.py). --find-links the folder itself: wheels
# already there are taken without downloading them again.
wheel() { "$python" -m pip wheel --wheel-dir "$out" --find-links "$out" "$@"; }
wheel -c "$repo_root/constraints.txt" torch torchvision -r "$reqs" 'setuptools>=68' wheel
wheel -c "$merged" torch torchvision -r "$reqs" lmms-eval==0.7.3 decord==0.6.0
echo "wheelhouse.sh: $(find "$out" -name '*.whl' | wc -l) wheels, $(du -sh "$out" | cut -f1) in $out"
