# Two commands do all set-up on a fresh machine: `make demo` and `make test` (README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch is installed first, on its own: an unpinned torch from PyPI is the multi-GB CUDA build on
# Linux. TORCH_INDEX picks the wheel index for it: empty (default) = your pip configuration (here a
# local cache that serves the CPU build); `make install TORCH_INDEX=https://download.pytorch.org/whl/cpu`
# = the CPU build anywhere.
TORCH_CPU ?= torch==2.13.0
TORCH_INDEX ?=
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-fast lint typecheck demo clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_CPU)"
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

test: lint typecheck
	$(PY) -m pytest -q

# The everyday subset (about a minute): everything but the tests marked slow.
test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	bash deploy/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
