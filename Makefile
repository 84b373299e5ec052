# The README's two commands. Each sets up .venv from a fresh clone on its own.
#   make demo   the main job on the embedded default (half moons, no download)
#   make test   the test suite
# TORCH: the CPU build that lies on this machine's disk; on a GPU machine use e.g.
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

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b --quick; done

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
