#!/usr/bin/env bash
# Build and push the synthvlm images (cpu, diffusion, train, eval) from images/Dockerfile.
#
#   REGISTRY=europe-docker.pkg.dev/my-project/synthvlm TAG=0.1.0 images/build.sh [options] [family ...]
#   options: --dry-run (print the docker commands), --no-push (build only), --no-build (push only)
#
# REGISTRY and TAG default to what synthvlm/images.py uses (SYNTHVLM_IMAGE_REGISTRY / SYNTHVLM_IMAGE_TAG,
# else ghcr.io/synthvlm and the package version), so the tags pushed here are the references that
# `synthvlm compile` writes into the pipelines; compile with the same --image-registry/--image-tag.
# PLATFORM (default linux/amd64: GKE GPU nodes) and extra DOCKER_BUILD_ARGS may be set too.
# WHEELHOUSE=1 installs from images/wheelhouse/ alone (fill it with images/wheelhouse.sh; no package index
# is used), PYTHON_IMAGE replaces the base image (e.g. synthvlm-base:bookworm from images/base_image.sh
# where Docker Hub is out of reach), DOCKER names the client (default: docker).
# Needs BuildKit (docker buildx, or a client that talks BuildKit to the daemon, such as Debian's docker.io)
# for the Dockerfile's RUN --mount. images/Makefile wraps this.
set -euo pipefail
export DOCKER_BUILDKIT=1

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dry_run=0
build=1
push=1
families=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    --no-push) push=0 ;;
    --no-build) build=0 ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "build.sh: unknown option $arg" >&2; exit 2 ;;
    *) families+=("$arg") ;;
  esac
done

python="${PYTHON:-python3}"
[[ -x "$repo_root/.venv/bin/python" && -z "${PYTHON:-}" ]] && python="$repo_root/.venv/bin/python"
# One source of truth for the references (validates family names, registry and tag).
images_text="$(
  SYNTHVLM_IMAGE_REGISTRY="${REGISTRY:-${SYNTHVLM_IMAGE_REGISTRY:-}}" \
  SYNTHVLM_IMAGE_TAG="${TAG:-${SYNTHVLM_IMAGE_TAG:-}}" \
  PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}" \
  "$python" -m synthvlm.images "${families[@]}"
)"
mapfile -t images <<<"$images_text"

run() {
  if ((dry_run)); then
    local line
    line="$(printf '%q ' "$@")"
    printf '%s\n' "${line% }"
  else
    "$@"
  fi
}

docker="${DOCKER:-docker}"
extra=()
if [[ -n "${WHEELHOUSE:-}" && "${WHEELHOUSE}" != 0 ]]; then
  compgen -G "$repo_root/images/wheelhouse/*.whl" >/dev/null \
    || { echo "build.sh: images/wheelhouse/ has no wheels: run images/wheelhouse.sh first" >&2; exit 2; }
  extra+=(--build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels)
fi
[[ -n "${PYTHON_IMAGE:-}" ]] && extra+=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE")

for image in "${images[@]}"; do
  family="${image##*/synthvlm-}" # <registry>/synthvlm-<family>:<tag>
  family="${family%%:*}"
  if ((build)); then
    # shellcheck disable=SC2086  # DOCKER_BUILD_ARGS is a list of words on purpose
    run "$docker" build --platform "${PLATFORM:-linux/amd64}" -f "$repo_root/images/Dockerfile" \
      --target "$family" -t "$image" ${extra[@]+"${extra[@]}"} ${DOCKER_BUILD_ARGS:-} "$repo_root"
  fi
  if ((push)); then
    run "$docker" push "$image"
  fi
done
