# tuneline: the two commands.
#   make run    create .venv, install, run the pipeline (dvc repro), print the metrics
#   make test   create .venv if missing, install, run the tests
VENV := .venv
PYTHON := $(VENV)/bin/python
# Stage commands in dvc.yaml call `python`: it must be the venv's.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: run test install benchmark

$(VENV)/.installed: pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

run: install
	dvc repro
	dvc metrics show

test: install
	$(PYTHON) -m pytest -q

benchmark: install
	$(PYTHON) benchmarks/pipeline_budget.py
