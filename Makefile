# Two commands do all set-up on a fresh machine: `make demo` and `make test` (README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch: an unpinned torch would pull a multi-GB CUDA build on these machines.
TORCH_CPU ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test lint demo clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_CPU)"
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

demo: install
	bash deploy/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
