#!/usr/bin/env bash
# Build the Dockerfile's PYTHON_IMAGE from Debian packages alone, for hosts that cannot pull
# python:3.11-slim-bookworm (no Docker Hub): debootstrap a minimal bookworm, add python3.11 and a venv at
# /opt/python whose python/pip come first on PATH (what the official image offers), import it as IMAGE.
#
#   images/base_image.sh [IMAGE]     (default synthvlm-base:bookworm; needs root, debootstrap, docker)
#   MIRROR=http://deb.debian.org/debian (default: the first Debian URI in the host's apt sources)
# Skips the build when IMAGE already exists (FORCE=1 rebuilds). Debian bookworm's python3 is 3.11, the
# interpreter constraints.txt was resolved with.
set -euo pipefail
image="${1:-synthvlm-base:bookworm}"
docker="${DOCKER:-docker}"
if [[ -z "${FORCE:-}" ]] && "$docker" image inspect "$image" >/dev/null 2>&1; then
  echo "base_image.sh: $image exists (FORCE=1 rebuilds)"
  exit 0
fi
mirror="${MIRROR:-}"
if [[ -z "$mirror" ]]; then
  mirror="$(grep -hoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list.d/*.sources \
    /etc/apt/sources.list 2>/dev/null | awk '{print $2; exit}' || true)"
  mirror="${mirror:-http://deb.debian.org/debian}"
fi
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase \
  --include=python3,python3-venv,python3-pip-whl,python3-setuptools-whl,ca-certificates \
  bookworm "$root" "$mirror"
chroot "$root" python3 -m venv /opt/python
chroot "$root" /opt/python/bin/python -m pip --version
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* "$root"/usr/share/man/* \
  "$root"/root/.cache
# Debian's sources as they are on the host, so `apt-get install` works in later build stages.
tar -C "$root" -c . | "$docker" import \
  --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  - "$image"
echo "base_image.sh: built $image"
