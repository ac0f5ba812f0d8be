# pgrelief developer entry points. `make demo` and `make test` are the README's two set-up commands.
PYTHON ?= python3
CACHE_DIR ?= $(HOME)/.cache/pgrelief

.PHONY: install demo test lint typecheck kube-testenv kube-tools wheelhouse bench crd

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
