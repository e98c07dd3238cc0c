# The two commands: `make demo` and `make test`. Both set everything up first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.honed-setup

.PHONY: setup demo test test-slow bench clean

setup: $(STAMP)

# torch==2.13.0 first: it is the CPU wheel on this machine's disk; an unpinned torch pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,serve,ui,track,qlora,export]"
	touch $(STAMP)

demo: setup
	$(BIN)/honed demo

# the quick suite (about 10 minutes on 2 cores); the long checks carry @pytest.mark.slow and run in test-slow
test: setup
	$(BIN)/python -m pytest -q -m "not slow"

# the long checks (kill-and-resume, several processes, whole demo, browser launch): CI's second step
test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/head_only.py

clean:
	rm -rf $(VENV) runs
