# tuneline: the two commands.
#   make run    create .venv, install, run the pipeline (dvc repro), print the metrics
#   make test   create .venv if missing, install, run the tests (make test-unit: the unit tier alone)
VENV := .venv
PYTHON := $(VENV)/bin/python
# Stage commands in dvc.yaml call `python`: it must be the venv's.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: run test test-unit install benchmark docs

$(VENV)/.installed: pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

run: install
	dvc repro
	dvc metrics show

# Two workers: most integration tests wait on one process at a time (a stage, a server), so two run side by side,
# longest files first (tests/conftest.py).
test: install
	$(PYTHON) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test-unit: install
	$(PYTHON) -m pytest -q -m "not integration"

# The benchmarks write benchmarks/results/*.json, which `make docs` quotes (the 7B merge takes ~10 min, ~35 GB).
benchmark: install
	$(PYTHON) benchmarks/pipeline_budget.py
	$(PYTHON) benchmarks/train_throughput.py
	$(PYTHON) benchmarks/merge_7b.py

# Rewrite every figure README.md and docs/ quote from metrics/*.json, lineage.json and benchmarks/results/.
docs: install
	$(PYTHON) docs/figures.py
