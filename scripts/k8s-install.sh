#!/usr/bin/env bash
# Everything the test cluster needs, idempotently: Debian's etcd, containerd, runc, CNI plugins
# and debootstrap (no service is started: policy-rc.d or not, the tests start their own), and
# the pinned Kubernetes components built from the Go module proxy (scripts/k8s-build.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(etcd-server containerd runc containernetworking-plugins debootstrap)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    # No daemon may start on install: the test cluster runs its own, on its own addresses.
    blocker=/usr/sbin/policy-rc.d
    if [ ! -e "$blocker" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$blocker" && chmod +x "$blocker"
        trap 'rm -f "$blocker"' EXIT
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Debian's units would start them at the next boot: the test cluster is the only user.
    for unit in etcd containerd; do systemctl disable "$unit" >/dev/null 2>&1 || true; done
fi
bash scripts/k8s-build.sh
