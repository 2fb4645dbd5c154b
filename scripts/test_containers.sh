#!/usr/bin/env bash
# make test-containers: build the four images offline and run the demo pipelines (synthvlm, stablellava,
# end-to-end) through kfp.local.DockerRunner, each task in its own image, no network, as uid 1000 and as
# an arbitrary uid with group 0 (tests/containers). Each step prints its duration.
#
# Needs a Docker engine: when none answers and this runs as root with dockerd installed (Debian:
# apt-get install docker.io debootstrap), it starts one and stops it (by its PID) at the end.
# Without Docker Hub: the base image is made with debootstrap (images/base_image.sh), the wheels come from
# images/wheelhouse/ (images/wheelhouse.sh, kept between runs), so the builds need no package index.
#   PYTHON_IMAGE=...            use this base image instead (e.g. python:3.11-slim-bookworm)
#   SYNTHVLM_IMAGE_REGISTRY/TAG the references built and run (default localhost/synthvlm, test)
#   SYNTHVLM_CONTAINER_USERS    users to run as (default "1000:0 1000890000:0")
#   PYTEST_ARGS                 extra pytest arguments (e.g. "-k synthvlm")
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
step_start=$SECONDS
step() {
  echo "test-containers: $1 done in $((SECONDS - step_start)) s (total $((SECONDS - start)) s)"
  step_start=$SECONDS
}

# Debian's client talks BuildKit to the daemon itself; a standalone client without buildx cannot build.
if [[ -z "${DOCKER:-}" ]]; then
  DOCKER=docker
  [[ -x /usr/bin/docker ]] && DOCKER=/usr/bin/docker
fi
export DOCKER
# Exit code 3: this machine cannot run the test (no engine, no overlay storage, no room, containers do not
# start), as opposed to 1: the test ran and failed. .ci/run reports 3 as "not run", plainly.
cannot() {
  echo "test-containers: CANNOT RUN HERE: $1" >&2
  exit 3
}
dockerd_pid=
stop_dockerd() {
  if [[ -n "$dockerd_pid" ]]; then
    echo "test-containers: stopping the dockerd it started (pid $dockerd_pid)"
    kill "$dockerd_pid" 2>/dev/null || true
    wait "$dockerd_pid" 2>/dev/null || true
  fi
}
trap stop_dockerd EXIT
if ! "$DOCKER" info >/dev/null 2>&1; then
  if [[ "$(id -u)" == 0 ]] && command -v dockerd >/dev/null; then
    log="${TMPDIR:-/tmp}/synthvlm-dockerd.log"
    dockerd >"$log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
    "$DOCKER" info >/dev/null 2>&1 || cannot "dockerd did not start (see $log)"
    step "starting dockerd (pid $dockerd_pid)"
  else
    cannot "no Docker engine answers and none can be started here (needs root and dockerd)"
  fi
fi

# The images share layers through overlay2; the vfs fallback copies every layer (tens of GB, hours).
driver="$("$DOCKER" info --format '{{.Driver}}' 2>/dev/null || true)"
[[ "$driver" == overlay* ]] || cannot "Docker's storage driver is '$driver', not overlay2"
docker_root="$("$DOCKER" info --format '{{.DockerRootDir}}' 2>/dev/null || echo /var/lib/docker)"
free_gb=$(( $(df -Pk "$(dirname "$docker_root")" | awk 'NR == 2 {print $4}') / 1024 / 1024 ))
(( free_gb >= 30 )) || cannot "${free_gb} GB free for Docker, 30 GB needed (four images, build cache, wheelhouse)"

export SYNTHVLM_IMAGE_REGISTRY="${SYNTHVLM_IMAGE_REGISTRY:-localhost/synthvlm}"
export SYNTHVLM_IMAGE_TAG="${SYNTHVLM_IMAGE_TAG:-test}"
python="${PYTHON:-.venv/bin/python}"

if [[ -z "${PYTHON_IMAGE:-}" ]]; then
  PYTHON_IMAGE=synthvlm-base:bookworm
  DOCKER="$DOCKER" bash images/base_image.sh "$PYTHON_IMAGE"
  step "base image $PYTHON_IMAGE"
fi
"$DOCKER" run --rm --network none "$PYTHON_IMAGE" python -c "pass" \
  || cannot "a container of $PYTHON_IMAGE does not start here"
PYTHON="$python" bash images/wheelhouse.sh >"${TMPDIR:-/tmp}/synthvlm-wheelhouse.log" 2>&1 \
  || { tail -30 "${TMPDIR:-/tmp}/synthvlm-wheelhouse.log" >&2; exit 1; }
tail -1 "${TMPDIR:-/tmp}/synthvlm-wheelhouse.log"
step "wheelhouse"
for family in cpu diffusion train eval; do
  PYTHON="$python" REGISTRY="$SYNTHVLM_IMAGE_REGISTRY" TAG="$SYNTHVLM_IMAGE_TAG" WHEELHOUSE=1 \
    PYTHON_IMAGE="$PYTHON_IMAGE" bash images/build.sh --no-push "$family"
  step "image $family"
done
"$DOCKER" images --filter "reference=$SYNTHVLM_IMAGE_REGISTRY/*:$SYNTHVLM_IMAGE_TAG"

# shellcheck disable=SC2086  # PYTEST_ARGS is a list of words on purpose
SYNTHVLM_CONTAINER_TESTS=1 "$python" -m pytest -q -p no:cacheprovider tests/containers ${PYTEST_ARGS:-}
step "pipelines in the images"
