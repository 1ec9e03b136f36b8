# Two commands do all the set-up: `make demo` and `make test`. Each makes (or reuses) the
# virtualenv in $(VENV), installing the CPU build of torch first so that pip never pulls a
# multi-GB CUDA build.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cgidm-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv demo test test-fast lint clean system-deps screenshots compose-test check-families

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# Real parts the end-to-end tests start, all Debian packages: redis-server, and the headless
# browser of the web tests (chromium driven through chromium-driver; never a downloaded one).
# The PDF report: WeasyPrint lays it out with Pango (and a font); the tests read it back with
# poppler-utils (pdftoppm, pdftotext, pdfimages).
LIBDIR := /usr/lib/$(shell uname -m)-linux-gnu
SYSTEM_PACKAGES := redis-server:/usr/bin/redis-server chromium:/usr/bin/chromium \
	chromium-driver:/usr/bin/chromedriver poppler-utils:/usr/bin/pdftoppm \
	libpango-1.0-0:$(LIBDIR)/libpango-1.0.so.0 libpangoft2-1.0-0:$(LIBDIR)/libpangoft2-1.0.so.0 \
	fonts-dejavu-core:/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
system-deps:
	@missing=""; for entry in $(SYSTEM_PACKAGES); do \
	  test -e "$${entry#*:}" || missing="$$missing $${entry%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

demo: $(STAMP)
	$(VENV)/bin/cgidm demo

# All the tests: the quick ones as test-fast runs them, then the slow ones (real servers,
# workers and browsers, production lease timings) one at a time, so none of them races another
# for the two cores.
# The slow tests outside tests/service build and run models without servers: two at a time.
# Those in tests/service start redis, S3, Celery workers, gateways and browsers, and measure
# leases and time limits at production settings: one at a time.
test: test-fast
	$(PY) -m pytest -m slow -q -n 2 --ignore=tests/service
	$(PY) -m pytest -m slow tests/service

# The quick loop while editing: everything but the tests marked slow (servers, processes,
# training); under 2 minutes on 2 cores. `make test` runs them all.
test-fast: $(STAMP) system-deps
	$(PY) -m pytest -m "not slow" -q -n 2

# Re-make the screenshots in docs/screenshots (README) with the browser tests.
screenshots: $(STAMP) system-deps
	CGIDM_SCREENSHOTS=docs/screenshots $(PY) -m pytest tests/service/test_web_browser.py -q

# The docker-compose stack built and run for real, as root (CI runs it after `make test`):
# installs Docker from Debian, builds the images from a locally made Debian base, starts the
# stack and checks it as a user would (scripts/compose_test.sh; README, Run with Docker).
compose-test: $(STAMP)
	bash scripts/compose_test.sh

# `cgidm check` on tiny layouts of every registered family, built locally (offline): a table
# family x layout -> ok / detected / verdict / seconds (docs/FAMILIES.md, "cgidm check on every
# family"; benchmarks/check_families.py).
check-families: $(STAMP)
	$(PY) -m benchmarks.check_families

# ruff, then mypy as pyproject.toml's [tool.mypy] sets it (strict on cgidm_core and app, the
# default check on cgidm and worker; cache in .mypy_cache).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) cgidm-out .pytest_cache
