# bayes-kfoc: `make demo` runs the digits study, `make test` runs ruff, mypy and pytest.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed
# CI sets PYTEST_ARGS to choose a subset, e.g. PYTEST_ARGS="-m 'not slow'".
PYTEST_ARGS ?=

.PHONY: venv install demo fidelity test lint typecheck pytest bench clean

venv: $(STAMP)

# torch first, pinned to the local CPU wheel, then the project with a constraint that keeps it,
# with the study's extra (eval), the tools (dev) and other libraries' models (zoo: transformers,
# peft). pip prints what it fetches and installs (a
# few minutes on a fresh machine); the library alone is `pip install .` (torch, pyro, tqdm).
$(STAMP): pyproject.toml constraints.txt
	@echo "== creating $(VENV) and installing torch, pyro, the study's and the tests' packages"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --progress-bar on --upgrade pip
	$(PIP) install --progress-bar on torch==2.13.0
	$(PIP) install --progress-bar on -c constraints.txt -e ".[dev,eval,zoo]"
	touch $(STAMP)

install: venv

# The calibration study (about 1 min on 2 idle CPU cores after the install): reports/digits/{report.md,results.json,figures/}.
demo: venv
	$(PY) -m evaluation study --dataset digits --model mlp --methods map,temp,diag,kfac,kfoc --seeds 3 --out reports/digits

fidelity: venv
	$(PY) -m evaluation.benchmarks.fisher_fidelity

lint: venv
	$(VENV)/bin/ruff check bayes_kfoc evaluation datasets tests
	$(VENV)/bin/ruff format --check bayes_kfoc evaluation datasets tests

typecheck: venv
	$(VENV)/bin/mypy bayes_kfoc

pytest: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache reports
