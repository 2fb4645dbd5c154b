#!/usr/bin/env bash
# Make sure `kubectl` (and the kustomize built into it) is installed, for rendering manifests/ and for
# tests/manifests. Installs from apt only when kubectl is missing; idempotent; silent on success.
#
# Debian bookworm has no `kubectl` package; its `kubernetes-client` (kubectl 1.20, kustomize v2)
# is too old for manifests/ (kustomize v5: kubectl >= 1.27). An apt source that has `kubectl`
# (pkgs.k8s.io or Google Cloud's) is used when configured. Otherwise this warns, and the
# manifest render tests are skipped with that reason.
set -euo pipefail

MIN_KUSTOMIZE_MAJOR=5

install_from_apt() {
  local sudo=() package=kubernetes-client log
  [[ $EUID -eq 0 ]] || sudo=(sudo)
  log="$(mktemp)"
  trap 'rm -f "$log"' RETURN
  if ! "${sudo[@]}" apt-get update -qq >"$log" 2>&1; then
    cat "$log" >&2
    return 1
  fi
  if apt-cache policy kubectl 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    package=kubectl
  fi
  # `env` inside sudo: sudo drops the caller's environment.
  if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "$package" >"$log" 2>&1; then
    cat "$log" >&2
    return 1
  fi
}

if ! command -v kubectl >/dev/null 2>&1; then
  install_from_apt
fi

# "Kustomize Version: v5.5.0" (kubectl >= 1.24 prints it; older ones do not).
kustomize_version="$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: v//p' || true)"
if [[ -z "$kustomize_version" || "${kustomize_version%%.*}" -lt $MIN_KUSTOMIZE_MAJOR ]]; then
  echo "install_kubectl.sh: $(command -v kubectl) has kustomize ${kustomize_version:-of unknown version (kubectl < 1.24)};" \
    "manifests/ needs kustomize v$MIN_KUSTOMIZE_MAJOR (kubectl >= 1.27). Add the pkgs.k8s.io apt" \
    "repository and rerun, or install kubectl another way." >&2
fi
