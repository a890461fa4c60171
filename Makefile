# Two commands from a fresh clone: `make demo` and `make test`. Each builds .venv if needed.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test system-test venv clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

# The nightly job on MovieLens-1M on the embedded default (local Spark, local Ray, ./warehouse):
# train (loads ML-1M on first use) -> candidates for every user -> evaluation table.
demo: $(STAMP)
	$(VENV)/bin/dr train --dataset ml-1m --run-id demo-ml-1m --warehouse warehouse
	$(VENV)/bin/dr candidates --warehouse warehouse --train-run-id demo-ml-1m --top-n 100
	$(VENV)/bin/dr evaluate --warehouse warehouse --run-id demo-ml-1m

test: $(STAMP)
	$(PY) -m pytest -q -m "not system"

# Real `dr` processes: killed at every commit point of ingest/train/candidates/evaluate, and the
# nightly job on a Spark standalone cluster + a 2-node Ray cluster on loopback (~25 min).
system-test: $(STAMP)
	$(PY) -m pytest -q -m system

clean:
	rm -rf $(VENV) .data warehouse
