# Two commands on a fresh Debian 12 machine, as root: `make demo` and `make test`.
# Each installs what it needs first, idempotently.
SHELL := /bin/bash
# Debian's own Python: bcc (python3-bpfcc) lives in its dist-packages.
SYSTEM_PYTHON := /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup host venv tools k8s-tools otelcol k8s-up k8s-down demo test unit bench clean-lab

setup: host venv

host:
	@bash scripts/setup-host.sh

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(SYSTEM_PYTHON) -m venv --system-site-packages $(VENV)
	@$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	@$(BIN)/python -c 'import bcc' || { echo "setup: bcc does not import in $(VENV)" >&2; exit 1; }
	@touch $@

venv: $(STAMP)

# Test-only tools Debian lacks (helm), and the console's test browser (chromium, playwright-core).
tools:
	@bash scripts/install-tools.sh
	@bash scripts/install-browser.sh

# The test cluster (tests/k8s): Debian's etcd, containerd, runc and CNI plugins, and
# kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kubectl built from the
# Go module proxy into .tools/k8s/ (once per machine: README, "The test cluster").
k8s-tools:
	@bash scripts/k8s-install.sh

# The OpenTelemetry Collector the tracing tests export to, built from the Go module proxy into
# .tools/otelcol/ (scripts/otelcol-build.sh; about a minute the first time on a machine).
otelcol:
	@bash scripts/otelcol-build.sh

# A test cluster by hand (the tests bring up their own): prints the admin kubeconfig.
k8s-up: venv k8s-tools
	@PYTHONPATH=tests $(BIN)/python -m k8s.cluster up

k8s-down: venv
	@PYTHONPATH=tests $(BIN)/python -m k8s.cluster down

demo: setup
	$(BIN)/nodeagent demo

test: setup tools k8s-tools otelcol
	$(BIN)/pytest -ra

# The full benchmark (about 30 minutes; sizes in benchmarks/README.md); results land in benchmarks/results/<stamp>/
bench: setup
	$(BIN)/python -m benchmarks.run

# Unprivileged tests only: no namespaces, cgroups or BPF.
unit: venv otelcol
	$(BIN)/pytest -ra -m 'not privileged'

clean-lab: venv
	$(BIN)/nodeagent lab down
