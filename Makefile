# The README's two commands: `make demo` and `make test`. Both create / update .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Re-install only when the dependency list changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/clusterlab demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/augment.py
	$(BIN)/python bench/kmeans.py
	$(BIN)/python bench/sweep_packing.py
	$(BIN)/python bench/train_throughput.py --batch-size 32 --steps 2 --warmup 1 --sizes 32 \
		--levers fp32 bf16 channels_last fused no-aug

clean:
	rm -rf $(VENV) mlflow.db mlruns ray_results
