# Two commands on a fresh Debian 12 machine, as root: `make demo` and `make test`.
# Each installs what it needs first, idempotently.
SHELL := /bin/bash
# Debian's own Python: bcc (python3-bpfcc) lives in its dist-packages.
SYSTEM_PYTHON := /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup host venv tools demo test unit bench clean-lab

setup: host venv

host:
	@bash scripts/setup-host.sh

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(SYSTEM_PYTHON) -m venv --system-site-packages $(VENV)
	@$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	@$(BIN)/python -c 'import bcc' || { echo "setup: bcc does not import in $(VENV)" >&2; exit 1; }
	@touch $@

venv: $(STAMP)

# Test-only tools Debian lacks (helm).
tools:
	@bash scripts/install-tools.sh

demo: setup
	$(BIN)/nodeagent demo

test: setup tools
	$(BIN)/pytest -ra

# The full benchmark (about 10 minutes); results land in benchmarks/results/<stamp>/.
bench: setup
	$(BIN)/python -m benchmarks.run

# Unprivileged tests only: no namespaces, cgroups or BPF.
unit: venv
	$(BIN)/pytest -ra -m 'not privileged'

clean-lab: venv
	$(BIN)/nodeagent lab down
