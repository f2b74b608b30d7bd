# snapjax developer commands. Every target creates .venv from the repo's own files if missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-slow notebooks bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[all]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) benchmarks/copy_task.py --quick

test: $(STAMP)
	$(PY) -m pytest -q -n 2

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

notebooks: $(STAMP)
	SNAPJAX_FAST=1 $(PY) -m pytest -q -p no:cacheprovider --nbmake notebooks/

bench: $(STAMP)
	$(PY) benchmarks/step_cost.py --quick

clean:
	rm -rf $(VENV) benchmarks/out
