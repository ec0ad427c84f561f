# clinic-voice: every set-up step lives here, so a fresh Debian 12 machine (root) needs only
#   make run    and    make test
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages the service and its tests need (checked one by one, installed when missing).
APT_PACKAGES := redis-server sip-tester espeak-ng libespeak-ng1 sox baresip debootstrap tshark \
                docker-compose wrk ca-certificates curl python3-venv python3-dev gcc
PYTEST_ARGS ?=

.PHONY: help install apt venv run test lint unit integration e2e bench bench-quick asterisk asterisk-stop asterisk-rootfs clean

help:
	@echo "make run      start the service (installs what it needs first)"
	@echo "make test     lint, type-check and run every test tier"
	@echo "make bench    run the speed measurements (BENCHMARKS.md)"
	@echo "make asterisk / make asterisk-stop   the local Asterisk 22 rig for softphones"

install: apt venv

apt:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to install:$$missing" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# after apt: python3-venv must be there first, also under make -j
$(VENV)/.stamp: pyproject.toml | apt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: $(VENV)/.stamp

run: install
	$(VENV)/bin/clinic-voice serve

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: install lint
	$(VENV)/bin/clinic-voice flow check
	$(PY) -m pytest $(PYTEST_ARGS)

unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: install
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

e2e: install asterisk-rootfs
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

# Each script prints a table and ends with one JSON line; BENCHMARKS.md records the figures.
# The SIP benches capture on the loopback interface (tshark), so run them as root.
BENCH_ARGS ?=
bench: install
	$(PY) bench/api.py $(BENCH_ARGS)
	$(PY) bench/api_cpu.py $(BENCH_ARGS)
	$(PY) bench/api_latency.py $(BENCH_ARGS)
	$(PY) bench/flashcall.py $(BENCH_ARGS)
	$(PY) bench/ivr.py $(BENCH_ARGS)
	$(MAKE) --no-print-directory asterisk-rootfs
	$(PY) bench/asterisk_compare.py $(BENCH_ARGS)

bench-quick:
	$(MAKE) --no-print-directory bench BENCH_ARGS=--quick

asterisk-rootfs: install
	$(PY) -m tests.e2e.rig rootfs

asterisk: install
	$(PY) -m tests.e2e.rig up

asterisk-stop:
	@if [ -x $(PY) ]; then $(PY) -m tests.e2e.rig down; else echo "no .venv here: nothing was started"; fi

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
