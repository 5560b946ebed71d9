# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# Both create the virtualenv when it is missing: torch first (a local CPU build here; an unpinned
# torch would pull GBs of CUDA packages), then tvlens with the pinned versions of constraints.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tvlens-installed

.PHONY: demo test venv bench lint browser

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tvlens demo

# The browser test (tests/test_report_browser.py) drives Debian's headless chromium through playwright,
# which never downloads a browser; install chromium where it is missing (CI runs as root).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

test: $(STAMP) browser
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check tvlens tests benchmarks
