# The two fresh-machine commands of the README:  `make demo`  and  `make test`.
# Both create .venv, install torch's CPU build first (pip install torch==2.13.0), then the rest.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

install: $(BIN)/.installed

# all six stages on the embedded default data, on this machine's CPU (SLURM is used when present
# only if you run slurm/run_pipeline.sh yourself; the demo always runs locally)
demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash slurm/run_pipeline.sh --local --config slurm/config/demo.env

test: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q tests

.PHONY: install demo test
