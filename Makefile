# The README's commands: `make demo`, `make test` and `make test-faults`. All create / update .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The pinned versions every install uses (the image's and the compose MLflow server's too).
LOCK := constraints.txt

.PHONY: demo test test-faults reliability bench lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Re-install only when the dependency list or the pinned versions change.
$(STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/pip install --quiet -c $(LOCK) -e ".[dev]"
	touch $(STAMP)

# Rewrites constraints.txt from .venv as it is now (its `#` header kept): after a range in
# pyproject.toml changed or a package in .venv was upgraded. .venv then is what the lock says.
lock: $(STAMP)
	{ grep '^#' $(LOCK); $(BIN)/pip freeze --all --exclude-editable --exclude pip; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/clusterlab demo

# The fault-injection tests (killed workers and drivers, a stopped tracking server, a
# two-node cluster) take about as long as the rest together: `make test` leaves them to
# `make test-faults`, so that each stays under 15 minutes on 2 cores. CI runs both.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not faults"

test-faults: $(STAMP)
	$(BIN)/python -m pytest -q -m faults

# RELIABILITY.md from the rows the test runs recorded (.pytest_cache/clusterlab-reliability.json).
reliability: $(STAMP)
	$(BIN)/python tests/reliability_report.py

bench: $(STAMP)
	$(BIN)/python bench/augment.py
	$(BIN)/python bench/kmeans.py
	$(BIN)/python bench/sweep_packing.py
	$(BIN)/python bench/train_throughput.py --batch-size 32 --steps 2 --warmup 1 --sizes 32 \
		--levers fp32 bf16 channels_last fused no-aug

clean:
	rm -rf $(VENV) mlflow.db mlruns ray_results
