# cspine-node: the two set-up commands are `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# postgresql: the tests start their own server from /usr/lib/postgresql/<version>/bin
# orthanc-dicomweb, chromium, npm: OHIF in a browser (tests/interop/test_ohif.py); a path that
# is no command (the plugin) is checked for existence
SYSTEM_TOOLS := storescu:dcmtk dciodvfy:dicom3tools /usr/sbin/Orthanc:orthanc openssl:openssl \
  /usr/lib/postgresql/*/bin/pg_ctl:postgresql chromium:chromium npm:npm \
  /usr/share/orthanc/plugins/libOrthancDicomWeb.so:orthanc-dicomweb
# OHIF's built viewer: npm's @ohif/app ships dist/, unpacked into the git-ignored .cache/.
# `npm pack` (the registry's tarball, integrity checked by npm), not `npm install`: the
# release's dependency tree does not resolve (@ohif/i18n@3.13.2 is not on the registry) and
# the built viewer needs none of it.
OHIF_VERSION := 3.13.2
OHIF_DIR := .cache/ohif/$(OHIF_VERSION)

.PHONY: run test lint bench reliability venv system-tools ohif clean

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
	  command -v $$cmd >/dev/null 2>&1 || [ -e $$cmd ] || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system tools:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo -n"; fi; \
	  ( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null ) \
	    || { echo "cannot install the system tools the tests need:$$missing (apt-get install -y$$missing)"; exit 1; }; \
	fi

# outside CI a failed fetch leaves the OHIF test to skip with its reason; with CI=true it fails
ohif: system-tools
	@if [ ! -f $(OHIF_DIR)/dist/index.html ]; then \
	  echo "fetching OHIF $(OHIF_VERSION) (npm pack @ohif/app) into $(OHIF_DIR)"; \
	  rm -rf $(OHIF_DIR) $(OHIF_DIR).part && mkdir -p $(OHIF_DIR).part \
	  && ( cd $(OHIF_DIR).part && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null \
	       && tar -xzf ohif-app-$(OHIF_VERSION).tgz --strip-components=1 package/dist \
	       && rm ohif-app-$(OHIF_VERSION).tgz ) \
	  && mv $(OHIF_DIR).part $(OHIF_DIR) \
	  || { echo "cannot fetch OHIF $(OHIF_VERSION) (npm pack @ohif/app@$(OHIF_VERSION))"; \
	       case "$$CI" in 1|true|yes) exit 1;; esac; }; \
	fi

run: $(STAMP)
	$(VENV)/bin/cspine serve

# lint first: a lint or type error fails the build before the (long) test suite runs;
# the 15 slowest tests are listed at the end (CI has 15 minutes for the suite)
test: lint system-tools ohif
	$(PY) -m pytest -q --durations=15

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
