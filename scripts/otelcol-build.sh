#!/usr/bin/env bash
# Builds the OpenTelemetry Collector the tracing tests export to (scripts/otelcol/: the OTLP
# receiver and the debug exporter, collector v0.165.0) from the Go module proxy into
# .tools/otelcol/otelcol. Idempotent: a stamp naming the pin skips the build when it is done;
# Go's module and build caches make a rebuild in another clone a matter of linking. Niced: the
# machine's cores are shared.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=$root/.tools/otelcol
mod=$root/scripts/otelcol
pin=$(cat "$mod/go.mod" "$mod/go.sum" "$mod/main.go" | sha256sum | cut -c1-16)
stamp=$out/.built-$pin
[ -f "$stamp" ] && exit 0
command -v go >/dev/null || { echo "otelcol-build: go is not on PATH" >&2; exit 1; }
mkdir -p "$out"
rm -f "$out"/.built-*
start=$(date +%s)
echo "otelcol-build: building the OpenTelemetry Collector (the first time on a machine: a few minutes)" >&2
(cd "$mod" && CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" nice -n 15 \
    go build -trimpath -ldflags="-s -w" -o "$out/otelcol" .)
"$out/otelcol" --version >/dev/null
echo "otelcol-build: done in $(( $(date +%s) - start )) s" >&2
touch "$stamp"
