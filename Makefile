# mtproxy-formula: one entry point for setup, demo, tests and benchmarks.
# Every target installs what it needs (root, Debian 12).

SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV := .venv
VPY := $(VENV)/bin/python
IMAGES := haproxy mtprotoproxy keepalived
PYTEST_ARGS ?=
# Test modules run two at a time, each in test hosts of its own.
PYTEST_WORKERS ?= 2
BENCH_ARGS ?=

.PHONY: help host-setup venv images setup lint test demo demo-down bench clean

help:
	@echo "make demo       deploy a 2-replica cell into a local test host and print how to connect"
	@echo "make demo-down  tear the demo cell down"
	@echo "make test       lint and run the whole test suite (installs what it needs)"
	@echo "make bench      run the benchmarks (about 15 min), write bench/results.md and bench/results.png"
	@echo "make clean      remove .venv, built images and any test host left behind"

host-setup:
	@scripts/host-setup.sh

# The venv is rebuilt only when requirements.txt changes.
venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt | host-setup
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -qq --upgrade pip
	$(VENV)/bin/pip install -qq -r requirements.txt
	touch $@

# Each image is cached by the hash of its recipe (images/build.sh); they build
# side by side. bare-bookworm is no image: the bare Debian 12 root (with a local
# apt repository) that test_bootstrap_bare_rootfs boots as a salt-ssh target.
images: | host-setup
	@pids=; for image in $(IMAGES); do images/build.sh $$image & pids="$$pids $$!"; done; \
	images/build.sh bare-bookworm build/rootfs & pids="$$pids $$!"; \
	status=0; for pid in $$pids; do wait $$pid || status=1; done; exit $$status

setup: host-setup venv images

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/yamllint -s pillar.example kitchen.yml mtproxy/parameters test/kitchen/pillar
	$(VENV)/bin/salt-lint $$(find mtproxy -name "*.sls")
	shellcheck -S warning images/build.sh scripts/*.sh test/kitchen/*.sh $$(find mtproxy -name "*.sh")

test: setup lint
	$(VPY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)
	$(PYTHON) test/testhost.py check-clean

demo: setup
	$(VPY) scripts/demo.py up

demo-down:
	$(PYTHON) scripts/demo.py down

# BENCH_ARGS: e.g. --quick, --only failover, --formula-ref HEAD (see bench/run.py).
bench: setup
	$(VPY) bench/run.py $(BENCH_ARGS)

clean:
	-$(PYTHON) test/testhost.py sweep
	rm -rf $(VENV) build
