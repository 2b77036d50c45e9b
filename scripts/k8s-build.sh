#!/usr/bin/env bash
# Builds the pinned Kubernetes components for the test cluster from the Go module proxy
# (scripts/k8s/go.mod pins k8s.io/kubernetes and every staging module), into .tools/k8s/bin.
# Idempotent: a stamp naming the pin skips the build when the binaries are already there.
# Niced: the machine's two cores are shared.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${K8S_TOOLS:-$root/.tools/k8s}/bin
mod=$root/scripts/k8s
commands=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)
pin=$(sha256sum "$mod/go.mod" "$mod/go.sum" "$0" | sha256sum | cut -c1-16)
stamp=$out/.built-$pin
if [ -f "$stamp" ]; then
    exit 0
fi
command -v go >/dev/null || { echo "k8s-build: go is not on PATH" >&2; exit 1; }
mkdir -p "$out"
rm -f "$out"/.built-*
pkgs=()
for c in "${commands[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
start=$(date +%s)
echo "k8s-build: building ${commands[*]} (first time on this machine: tens of minutes)" >&2
# -trimpath and -s -w: smaller binaries, less to link; CGO off as in upstream's release builds.
(cd "$mod" && CGO_ENABLED=0 GOFLAGS=-mod=mod nice -n 15 \
    go build -trimpath -ldflags='-s -w' -o "$out/" "${pkgs[@]}")
for c in "${commands[@]}"; do test -x "$out/$c"; done
echo "k8s-build: done in $(( $(date +%s) - start )) s" >&2
touch "$stamp"
