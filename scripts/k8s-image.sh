#!/usr/bin/env bash
# The base of the test node's agent image: a Debian 12 root filesystem made by debootstrap
# (deploy/Dockerfile's packages) with a venv holding the project's
# dependencies from PyPI, as one tar in .tools/k8s/image/. No image registry is reachable, so
# the tests (tests/k8s/image.py) add the project's source as a second layer and import both
# into the node's containerd. Idempotent and cached: rebuilt when the packages or the
# project's dependencies change.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${K8S_TOOLS:-$PWD/.tools/k8s}/image
# deploy/Dockerfile's packages, so the two images never differ in what Debian gives them.
packages=$(python3 -c 'import re, sys
text = open("deploy/Dockerfile").read()
found = re.search(r"apt-get install -y --no-install-recommends\s*\\\n(.*?)\\\n\s*&&", text, re.S)
sys.exit("k8s-image: no apt-get install line in deploy/Dockerfile") if not found else print(",".join(found.group(1).split()))')
deps=$(python3 -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
pin=$(printf '%s\n%s\n' "$packages" "$deps" | sha256sum | cut -c1-16)
out=$dir/base-$pin.tar
[ -f "$out" ] && exit 0
command -v debootstrap >/dev/null || { echo "k8s-image: debootstrap is missing (make k8s-tools)" >&2; exit 1; }
mkdir -p "$dir"
rootfs=$(mktemp -d "$dir/rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
start=$(date +%s)
echo "k8s-image: debootstrap of the agent image's base (the first time: a few minutes)" >&2
nice -n 15 debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" http://deb.debian.org/debian \
    >"$dir/debootstrap.log" 2>&1 || { tail -20 "$dir/debootstrap.log" >&2; exit 1; }
# The wheels come through this host's pip (its index, proxy and certificates; same Python 3.11
# as the image's), then install in the image from that folder alone.
wheels="$rootfs/tmp/wheels"
# shellcheck disable=SC2086 # one argument per requirement
"${PIP:-.venv/bin/pip}" download -q --disable-pip-version-check --only-binary=:all: --python-version 3.11 \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$wheels" $deps
# shellcheck disable=SC2086
nice -n 15 chroot "$rootfs" /bin/sh -c "python3 -m venv --system-site-packages /opt/venv \
    && /opt/venv/bin/pip install -q --no-cache-dir --disable-pip-version-check --no-index \
       --find-links /tmp/wheels $(printf "'%s' " $deps) \
    && /opt/venv/bin/python -c 'import bcc, uvloop, cryptography'"
rm -rf "$wheels"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar --numeric-owner -C "$rootfs" -cf "$out.part" .
mv "$out.part" "$out"
rm -f "$dir"/base-*.tar.part
find "$dir" -maxdepth 1 -name 'base-*.tar' ! -name "base-$pin.tar" -delete
echo "k8s-image: base image in $(( $(date +%s) - start )) s: $out" >&2
