# dcmrecvd — developer entry points. Run as root on Debian 12 for the system packages.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 11112
OUT ?= received
PYTEST_ARGS ?=
# Debian packages: what running needs (and dcmtk, to try it), and what the tests add.
RUN_PACKAGES := python3-venv python3-dev gcc pkg-config libsystemd-dev dcmtk
TEST_PACKAGES := $(RUN_PACKAGES) openssl systemd systemd-container util-linux procps debhelper \
  dh-virtualenv dpkg-dev lintian debootstrap rpm rpmlint cpio man-db haproxy prometheus curl \
  xfsprogs btrfs-progs e2fsprogs rabbitmq-server orthanc orthanc-dicomweb libgdcm-tools \
  iproute2

.PHONY: run test check crash-test fleet-test lint typecheck unit bench soak fuzz system-deps test-deps venv clean

define apt_install_missing
	@missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
endef

system-deps:
	$(call apt_install_missing,$(RUN_PACKAGES))

test-deps:
	$(call apt_install_missing,$(TEST_PACKAGES))

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

lint: venv test-deps
	$(VENV)/bin/ruff check dcmrecvd tests bench
	$(VENV)/bin/ruff format --check dcmrecvd
	$(VENV)/bin/vulture dcmrecvd .ci/vulture_allow.py --min-confidence 60
	$(VENV)/bin/lint-imports

typecheck: venv
	$(VENV)/bin/mypy

unit: venv test-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

test: lint typecheck unit

# The developer loop (~30 s): lint, types and the in-process tests; needs only the venv.
# `make test` runs everything and is what CI runs.
check: venv
	$(VENV)/bin/ruff check dcmrecvd tests bench
	$(VENV)/bin/ruff format --check dcmrecvd
	$(VENV)/bin/vulture dcmrecvd .ci/vulture_allow.py --min-confidence 60
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -m inprocess $(PYTEST_ARGS)

bench: venv
	$(PY) bench/run.py

# Three receivers behind HAProxy, Orthanc and RabbitMQ behind them, in network namespaces: steady
# state, kill -9 mid-study, a partition, a rolling restart, a full disk (docs/FLEET.md). Also
# part of `make test`; run with -s to see the figures it prints.
fleet-test: venv test-deps
	$(PY) -m pytest -q -s -m fleet tests/test_fleet.py $(PYTEST_ARGS)

# 100,000 objects over 1,000 associations from 4 senders, the daemon's RSS sampled (a shorter
# one runs in `make test`).
soak: venv
	$(PY) bench/soak.py --objects 100000

# The durability proofs at length: 20 clones of a live disk per filesystem over 2,000 objects
# (`make test` takes 4 over 150), with the crash-state, kill -9 and I/O-error tests.
crash-test: venv test-deps
	DCMRECVD_POWER_CUTS=20 DCMRECVD_POWER_CUT_OBJECTS=2000 $(PY) -m pytest -q tests/test_power_cut.py \
	  tests/test_crash_states.py tests/test_kill_phases.py tests/test_io_errors.py

# 10,000 seeded mutations of A-ASSOCIATE-RQ and P-DATA streams against a real daemon, with
# oracles (alive, no slot leaked, nothing malformed stored, RSS bounded); `make test` runs 300.
# First 20,000 hypothesis examples against the upper-layer core alone (`make test` runs 300).
fuzz: venv test-deps
	DCMRECVD_CORE_FUZZ_EXAMPLES=20000 $(PY) -m pytest -q tests/test_upper_layer_fuzz.py
	$(PY) tests/fuzz.py --cases 10000 --seed 1

clean:
	rm -rf $(VENV) build dist *.egg-info received bench/out

# ---------------------------------------------------------------- packages
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' dcmrecvd/__init__.py)
DEB_TREE := build/deb/dcmrecvd-$(VERSION)
UNITS := dcmrecvd.service dcmrecvd.socket dcmrecvd@.service dcmrecvd@.socket

.PHONY: man deb rpm
man: venv
	$(PY) -m dcmrecvd.manpage packaging/man

# The source tree without local state, as the package builders want it.
define source_tree
	rm -rf $(1) && mkdir -p $(1)
	tar --exclude=./.venv --exclude=./build --exclude=./dist --exclude=./bench/out --exclude=./.git \
	  --exclude='*/__pycache__' --exclude=./.mypy_cache --exclude=./.ruff_cache --exclude=./.pytest_cache \
	  --exclude='*.egg-info' -cf - . | tar -xf - -C $(1)
endef

deb:
	$(call source_tree,$(DEB_TREE))
	cp -r packaging/debian $(DEB_TREE)/debian
	for u in $(UNITS); do cp systemd/$$u $(DEB_TREE)/debian/$$u; done
	cp systemd/dcmrecvd.sysusers $(DEB_TREE)/debian/dcmrecvd.sysusers
	cp systemd/dcmrecvd.tmpfiles $(DEB_TREE)/debian/dcmrecvd.tmpfiles
	cd $(DEB_TREE) && env -u VIRTUAL_ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b
	mkdir -p dist && cp build/deb/*.deb dist/
	@ls -l dist/*.deb

RPM_TOP := $(CURDIR)/build/rpm
rpm:
	rm -rf $(RPM_TOP) && mkdir -p $(RPM_TOP)/SOURCES $(RPM_TOP)/SPECS
	$(call source_tree,$(RPM_TOP)/dcmrecvd-$(VERSION))
	tar -C $(RPM_TOP) -czf $(RPM_TOP)/SOURCES/dcmrecvd-$(VERSION).tar.gz dcmrecvd-$(VERSION)
	env -u VIRTUAL_ENV HOME=$(RPM_TOP) PATH=/usr/sbin:/usr/bin:/sbin:/bin \
	  rpmbuild --load=packaging/rpm/macros.debian --define "_topdir $(RPM_TOP)" \
	  --define "version_override $(VERSION)" --nodeps -bb packaging/rpm/dcmrecvd.spec
	mkdir -p dist && cp $(RPM_TOP)/RPMS/*/*.rpm dist/
	@ls -l dist/*.rpm
