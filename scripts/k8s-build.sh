#!/usr/bin/env bash
# Builds the pinned Kubernetes components of the test cluster from the Go module proxy
# (scripts/k8s/go.mod pins k8s.io/kubernetes and every staging module) into .tools/k8s/bin.
# Idempotent: a stamp naming the pin and the flags skips the build when it is done; Go's build
# cache (~/.cache/go-build) makes a rebuild in another clone a matter of linking.
# Niced: the machine's cores are shared.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${K8S_TOOLS:-$root/.tools/k8s}/bin
mod=$root/scripts/k8s
commands=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)
version=$(sed -n 's/^require k8s.io\/kubernetes \(v[0-9.]*\)$/\1/p' "$mod/go.mod")
major=${version#v}; major=${major%%.*}
minor=${version#v*.}; minor=${minor%%.*}
# -trimpath and -s -w: smaller binaries, less to link; no cgo, as upstream's release builds;
# the version stamped as upstream's build does (the components compare versions).
stamp_pkgs=(k8s.io/component-base/version k8s.io/client-go/pkg/version)
ldflags="-s -w"
for p in "${stamp_pkgs[@]}"; do
    ldflags+=" -X $p.gitVersion=$version -X $p.gitMajor=$major -X $p.gitMinor=$minor"
    ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done
flags=(-trimpath "-ldflags=$ldflags")
pin=$( (cat "$mod/go.mod" "$mod/go.sum"; echo "${commands[*]} ${flags[*]}") | sha256sum | cut -c1-16)
stamp=$out/.built-$pin
[ -f "$stamp" ] && exit 0
command -v go >/dev/null || { echo "k8s-build: go is not on PATH" >&2; exit 1; }
mkdir -p "$out"
rm -f "$out"/.built-*
pkgs=()
for c in "${commands[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
start=$(date +%s)
echo "k8s-build: building ${commands[*]} (the first time on a machine: tens of minutes)" >&2
(cd "$mod" && CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" nice -n 15 \
    go build "${flags[@]}" -o "$out/" "${pkgs[@]}")
for c in "${commands[@]}"; do test -x "$out/$c"; done
echo "k8s-build: done in $(( $(date +%s) - start )) s" >&2
touch "$stamp"
