# `make test` and `make demo` set up everything they need on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   := /usr/share/datasets/fashion-mnist
STAMP  := $(VENV)/.installed

.PHONY: setup data slurm test test-fast lint demo bench clean

setup: $(STAMP)

$(STAMP): requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

data:
	@if [ ! -d $(DATA) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
	  else echo "Fashion-MNIST missing at $(DATA); install the Debian package dataset-fashion-mnist"; fi; \
	fi

# Slurm and munge for tests/test_slurm.py (a one-node cluster the tests start in a temporary directory)
slurm:
	@if ! command -v slurmctld >/dev/null 2>&1 && [ ! -x /usr/sbin/slurmctld ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge; \
	  else echo "Slurm missing: install the Debian packages slurm-wlm and munge (tests/test_slurm.py needs them)"; fi; \
	fi

# two workers, each test file on one (a file's fixtures, such as the Slurm cluster, start once):
# the real-Slurm and multi-process tests mostly wait, so the other worker computes meanwhile
test: setup data slurm
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile

# the edit-test loop: everything but the tests marked slow (multi-process runs, compiles, training)
test-fast: setup data
	$(PY) -m ruff check .
	$(PY) -m pytest -q -x -n 2 --dist loadfile -m "not slow"

lint: setup
	$(PY) -m ruff check .

demo: setup data
	$(VENV)/bin/largebatch demo --overwrite

bench: setup data
	$(PY) benchmarks/optimizer_step.py
	$(PY) benchmarks/trainer_overhead.py
	$(PY) benchmarks/scaling_cpu.py
	$(PY) benchmarks/data_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
