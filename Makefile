# The two commands a newcomer runs: `make demo` and `make test`.
# Both create .venv if it is missing and (re)install only when setup.py changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all venv lint bench clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(PY) scripts/bench_moe_layer.py --quick

test: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-all: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m ""

lint: venv
	$(VENV)/bin/ruff check moe_gen scripts tests

bench: venv
	$(PY) scripts/bench_moe_layer.py

clean:
	rm -rf $(VENV) build *.egg-info
