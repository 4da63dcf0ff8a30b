# Two commands a newcomer needs: `make run` and `make test`. Everything else is optional.
# The distribution's interpreter where it is recent enough and can make a venv: Debian's
# python3.11 is built with PGO and LTO, and runs the request path with about a third
# less CPU than a plain source build (docs/benchmarks.md). Else the first python3.
PYTHON ?= $(shell for p in /usr/bin/python3 python3; do \
	$$p -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& echo $$p && break; done)
VENV   ?= .venv
BIN    := $(VENV)/bin
# Debian packages the test suite starts for real (integration tests) and tools it uses.
APT_PACKAGES := python3-venv python3-dev gcc redis-server postgresql pgbouncer haproxy wrk prometheus systemd procps nodejs
# TypeScript-SDK MCP servers some tests run as backends (npm ci from package-lock.json).
NODE_DIR := tests/support/node

.DEFAULT_GOAL := help
.PHONY: help run test check lint typecheck unit apt venv native node bench bench-quick conformance clean

help:
	@echo "make run    start the proxy on its bundled default (demo MCP backend beside it)"
	@echo "make test   install everything needed (Debian packages, Python deps), run all checks"
	@echo "make check  lint + type-check + tests, without installing anything"
	@echo "make bench  the benchmark suite: direct vs Switchboard vs HAProxy (~10 min)"
	@echo "make bench-quick  the same workloads, small (~2 min)"
	@echo "make conformance  MCP conformance suite, directly vs through the proxy (npm, PyPI)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Re-install when the package metadata changes.
$(VENV)/.stamp-demo: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[demo,native]'
	@touch $@

$(VENV)/.stamp-test: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,native]'
	@touch $@ $(VENV)/.stamp-demo

# The request path compiled with mypyc (proxy/native.py), rebuilt whenever a source
# changes. Without a C compiler the proxy runs as Python, only slower.
NATIVE_SOURCES := $(wildcard proxy/*.py proxy/net/*.py proxy/protocol/*.py)
$(VENV)/.stamp-native: $(NATIVE_SOURCES) | $(VENV)/.stamp-demo
	$(BIN)/python -m proxy.native build || echo "the request path runs as Python (see above)"
	@touch $@

native: $(VENV)/.stamp-native

venv: $(VENV)/.stamp-test

run: $(VENV)/.stamp-demo $(VENV)/.stamp-native
	$(BIN)/switchboard run

apt:
	@./.ci/apt-install $(APT_PACKAGES)

lint: $(VENV)/.stamp-test
	$(BIN)/ruff check proxy tests bench conformance
	$(BIN)/ruff format --check proxy tests bench conformance

typecheck: $(VENV)/.stamp-test
	$(BIN)/mypy
	$(BIN)/mypy conformance/run.py

unit: $(VENV)/.stamp-test $(VENV)/.stamp-native
	$(BIN)/python -m pytest

check: lint typecheck unit

$(NODE_DIR)/node_modules/.package-lock.json: $(NODE_DIR)/package-lock.json
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error

node: $(NODE_DIR)/node_modules/.package-lock.json

test: apt venv node
	$(MAKE) --no-print-directory check

$(VENV)/.stamp-bench: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[bench,native]'
	@touch $@

bench: apt venv $(VENV)/.stamp-bench $(VENV)/.stamp-native
	$(BIN)/python -m bench.run --publish

bench-quick: apt venv $(VENV)/.stamp-bench $(VENV)/.stamp-native
	$(BIN)/python -m bench.run --quick

conformance: $(VENV)/.stamp-demo $(VENV)/.stamp-native node
	$(BIN)/python conformance/run.py

clean:
	find proxy -name '*.so' -delete
	rm -rf build $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
	rm -rf conformance/node_modules conformance/.venv conformance/results $(NODE_DIR)/node_modules
