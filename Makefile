# snapjax developer commands. Every target creates .venv from the repo's own files if missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-slow notebooks bench clean docs typecheck test-wheel

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[all]"
	touch $(STAMP)

setup: $(STAMP)

# Benchmark outputs go to the untracked benchmarks/out/; the committed benchmarks/results/ are the
# published runs and are only rewritten on purpose (an explicit --out benchmarks/results...).
demo: $(STAMP)
	$(PY) benchmarks/copy_task.py --quick --out benchmarks/out

test: $(STAMP)
	$(PY) -m pytest -q -n 2

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

notebooks: $(STAMP)
	SNAPJAX_FAST=1 $(PY) -m pytest -q -p no:cacheprovider --nbmake notebooks/

bench: $(STAMP)
	$(PY) benchmarks/step_cost.py --quick --out benchmarks/out/step_cost_cpu_quick.json

# The documentation site (mkdocs.yml, docs/) into the untracked site/: offline, the tutorials
# executed in fast mode (outputs and plots on the pages), any warning is an error (--strict).
docs: $(STAMP)
	SNAPJAX_FAST=1 MPLBACKEND=Agg NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# mypy on snapjax/ with the configuration in pyproject.toml ([tool.mypy]).
typecheck: $(STAMP)
	$(PY) -m mypy

# Builds the wheel, installs it with its `notebooks` extra into a fresh venv and runs the
# notebooks there from a directory outside the repository (tests/test_wheel.py, marked slow).
test-wheel: $(STAMP)
	$(PY) -m pytest -q -m slow tests/test_wheel.py

clean:
	rm -rf $(VENV) benchmarks/out site
