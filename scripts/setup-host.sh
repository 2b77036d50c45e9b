#!/usr/bin/env bash
# Installs what nodeagent needs on a Debian 12 host, idempotently:
# Debian packages, kernel headers where bcc looks for them, and bpffs.
# Run as root (make does). Prints nothing when everything is already there,
# except the one warning about mismatched kernel headers.
set -euo pipefail

packages=(
    python3 python3-venv python3-pip python3-bpfcc bpfcc-tools libbpf1 bpftool
    libnghttp2-14   # the proxy's HTTP/2 codec (through ctypes)
    iproute2 procps util-linux curl socat nghttp2-client
    wrk nginx-light haproxy   # benchmarks: load generator, a C web server, a C proxy
)
arch=$(dpkg --print-architecture)
kver=$(uname -r)

missing=()
for p in "${packages[@]}" "linux-headers-$arch"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    # nginx and haproxy come with services; the benchmarks start their own, so none may start here.
    guard=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && guard=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [ -n "$guard" ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

# bcc compiles against /lib/modules/$(uname -r)/build. Prefer the exact
# headers; when Debian has none for this kernel, link the closest installed
# ones. Our BPF C uses only stable UAPI types, so that works; say so once.
modules="/lib/modules/$kver"
if [ ! -e "$modules/build/include" ]; then
    if apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "linux-headers-$kver" >/dev/null || true
    fi
fi
if [ ! -e "$modules/build/include" ]; then
    # The newest installed headers are the closest to a newer running kernel.
    closest=$(ls -d /usr/src/linux-headers-*-"$arch" 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$closest" ]; then
        echo "setup: no kernel headers installed under /usr/src; bcc cannot compile" >&2
        exit 1
    fi
    hver=${closest#/usr/src/linux-headers-}
    source_dir=$(readlink -f "/lib/modules/$hver/source" 2>/dev/null || true)
    [ -d "$source_dir" ] || source_dir="$closest"
    mkdir -p "$modules"
    ln -sfn "$closest" "$modules/build"
    ln -sfn "$source_dir" "$modules/source"
    echo "WARNING: no kernel headers for the running kernel $kver; linked the closest installed ($hver) into $modules for bcc. nodeagent's BPF code uses only stable UAPI types." >&2
fi

# Pinned BPF objects live on bpffs; many hosts mount it, this one may not.
if ! mount -t bpf | grep -q ' /sys/fs/bpf '; then
    mount -t bpf bpf /sys/fs/bpf
fi
