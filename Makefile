# cspine-node: the two set-up commands are `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# postgresql: the tests start their own server from /usr/lib/postgresql/<version>/bin
SYSTEM_TOOLS := storescu:dcmtk dciodvfy:dicom3tools /usr/sbin/Orthanc:orthanc openssl:openssl \
  /usr/lib/postgresql/*/bin/pg_ctl:postgresql chromium:chromium

.PHONY: run test lint bench reliability venv system-tools clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade -q pip
	# torch first, pinned: the unpinned name pulls several GB of CUDA wheels.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

system-tools:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system tools:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo -n"; fi; \
	  ( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null ) \
	    || { echo "cannot install the system tools the tests need:$$missing (apt-get install -y$$missing)"; exit 1; }; \
	fi

run: $(STAMP)
	$(VENV)/bin/cspine serve

# lint first: a lint or type error fails the build before the (long) test suite runs
test: lint system-tools
	$(PY) -m pytest -q

# ruff on the whole repository; mypy on the files listed in [tool.mypy] of pyproject.toml
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(STAMP) system-tools
	$(PY) -m tests.bench

reliability: $(STAMP) system-tools
	CSPINE_RELIABILITY_FULL=1 $(PY) -m pytest -q tests/reliability

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .mypy_cache
