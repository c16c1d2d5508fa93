# dcmrecvd — developer entry points. Run as root on Debian 12 for the system packages.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 11112
OUT ?= received
PYTEST_ARGS ?=
APT_PACKAGES := dcmtk openssl systemd libsystemd-dev pkg-config gcc python3-dev python3-venv

.PHONY: run test lint typecheck unit bench system-deps venv clean

# Debian packages the receiver, its tests and its benchmark need (installed only if missing).
system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

$(VENV)/.installed: pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[systemd,test]'
	touch $@

venv: $(VENV)/.installed

# Serve on port $(PORT) into ./$(OUT) with the shipped association profile.
run: venv
	mkdir -p $(OUT)
	$(VENV)/bin/dcmrecvd -v -xf etc/storescp.cfg Default -od $(OUT) $(PORT)

lint: venv
	$(VENV)/bin/ruff check dcmrecvd tests bench
	$(VENV)/bin/ruff format --check dcmrecvd

typecheck: venv
	$(VENV)/bin/mypy

unit: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

test: lint typecheck unit

bench: venv
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info received bench/out
