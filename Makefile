# pgrelief developer entry points. `make demo` and `make test` are the README's two set-up commands.
PYTHON ?= python3
CACHE_DIR ?= $(HOME)/.cache/pgrelief

.PHONY: install demo test lint typecheck kube-testenv kube-tools wheelhouse bench crd \
	e2e-cluster e2e-cluster-stop e2e

install:
	$(PYTHON) -m pip install --quiet -e '.[dev]'

demo: install
	$(PYTHON) -m pgrelief._dev.demo

kube-tools:
	bash scripts/install-kube-tools.sh "$(CACHE_DIR)/bin"

# The wheels tests/test_image.py installs offline (runtime dependencies and build backend).
wheelhouse:
	bash scripts/wheelhouse.sh "$(CACHE_DIR)/wheelhouse"

kube-testenv:
	bash tests/kube-testenv/build.sh "$(CACHE_DIR)"

# A real single-node cluster (root): started and left running, its kubeconfig path printed.
e2e-cluster:
	PGRELIEF_CACHE_DIR="$(CACHE_DIR)" $(PYTHON) tests/e2e-cluster/cluster.py start

# Undoes e2e-cluster (or a failed run) and checks the machine is as it was before the start.
e2e-cluster-stop:
	PGRELIEF_CACHE_DIR="$(CACHE_DIR)" $(PYTHON) tests/e2e-cluster/cluster.py stop

# The end-to-end tests, on a cluster of their own (or the one e2e-cluster left running).
e2e: install kube-tools
	PGRELIEF_CACHE_DIR="$(CACHE_DIR)" $(PYTHON) -m pytest -q -m e2e tests/e2e

lint:
	$(PYTHON) -m ruff check operator tests bench
	$(PYTHON) -m ruff format --check operator tests bench

typecheck:
	$(PYTHON) -m mypy
	$(PYTHON) -c "from importlinter.cli import lint_imports_command; lint_imports_command()"

test: install lint typecheck
	$(PYTHON) -m pytest -q

# The CRD is generated from the policy model; the chart ships byte-identical copies of crds/
# (tests/test_chart_files.py fails when they drift).
crd:
	$(PYTHON) -m pgrelief crd > crds/connectionpolicies.pgrelief.dev.yaml
	cp crds/*.yaml charts/pgrelief/crds/

bench: install
	$(PYTHON) bench/diagnose_bench.py
