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

.PHONY: install test test-fast lint typecheck demo clean test-web web-golden wasm wasm-check

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

test: lint typecheck test-web
	$(PY) -m pytest -q

# The everyday subset (about a minute and a half on a 2-core machine): everything but the tests marked slow.
test-fast: install
	$(PY) -m pytest -q -m "not slow"

# The browser codec (edge_client/web, docs/web/README.md): its WebAssembly is reassembled from
# kernels.wat with the wabt pinned in tools/package-lock.json and must equal the committed bytes;
# the Python encoder writes golden files of every bundled quantizer and the LLaVA-1.5 geometry
# (tests/web/make_golden.py, ~40 s); Node's test runner holds the JS codec to them.
WEB_TOOLS := edge_client/web/tools
WEB_GOLDEN := build/web-golden

$(WEB_TOOLS)/node_modules/.package-lock.json: $(WEB_TOOLS)/package-lock.json
	cd $(WEB_TOOLS) && npm ci --no-audit --no-fund --loglevel=error

wasm: $(WEB_TOOLS)/node_modules/.package-lock.json
	node $(WEB_TOOLS)/build_wasm.mjs

wasm-check: $(WEB_TOOLS)/node_modules/.package-lock.json
	node $(WEB_TOOLS)/build_wasm.mjs --check

$(WEB_GOLDEN)/index.json: tests/web/make_golden.py $(wildcard edge_client/*.py models/bundled/*/manifest.json) | install
	$(PY) -m tests.web.make_golden --bundled $(WEB_GOLDEN)

web-golden: $(WEB_GOLDEN)/index.json

test-web: install wasm-check web-golden
	node --test tests/web

demo: install
	bash deploy/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
