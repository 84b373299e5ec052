# The README's two commands. Each sets up .venv from a fresh clone on its own.
#   make demo   the main job on the embedded default (half moons, no download)
#   make test   the test suite
# TORCH: the torch requirement pip installs (default: torch==2.13.0); for a CUDA build use e.g.
#   make test TORCH="torch --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m robustbnn demo --out $(DEMO_DIR)

# torchattacks: a test-only cross-check, installed without its dependencies (its torchvision pin would
# replace the CPU torch with a CUDA build); it needs only torch, numpy and scipy, which are here.
TEST_STAMP := $(VENV)/.installed-test
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-deps torchattacks==3.5.1
	touch $(TEST_STAMP)

test: $(TEST_STAMP)
	$(PY) -m pytest

bench: $(TEST_STAMP)
	set -e; for b in benchmarks/[a-z]*.py; do $(PY) $$b --quick; done

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
