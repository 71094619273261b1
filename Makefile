# The two fresh-machine commands of the README:  `make demo`  and  `make test`.
# Both create .venv, install torch first (pip install $(TORCH_SPEC); the CPU wheel where pip's index
# serves it, the CUDA build from plain PyPI on Linux), then the rest.
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

# All six stages on the embedded default data, on this machine's CPU (the demo always runs locally;
# `sbatch slurm/run_pipeline.sh` submits the same chain to SLURM). Pass 1 trains on Foldseek 3Di
# tokens (06: accuracy against the 3Di baselines); pass 2 reuses stages 01-03 and trains on our
# decodable geo C-alpha tokens (06: RMSD / TM-score / lDDT, PDB files), with 16 placement codes (258
# pair tokens) for ~8k residues; pass 3 goes the other way, 3Di -> amino acids (inverse folding; 06:
# sequence recovery against the struct2seq baselines, substitution matrix, and pass 1's model folding
# the designs back).
demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash slurm/run_pipeline.sh --local --config slurm/config/demo.env
	PATH="$(CURDIR)/$(BIN):$$PATH" TOKEN_KIND=geo S04_ARGS="--geo-k 16" \
	  bash slurm/run_pipeline.sh --local --config slurm/config/demo.env
	PATH="$(CURDIR)/$(BIN):$$PATH" TOKENS_SUFFIX=_struct2seq S04_ARGS="--direction struct2seq" \
	  S06_ARGS="--consistency-checkpoint $${TOKENFOLD_DATA:-data}/runs/demo_3di_mini/final" \
	  bash slurm/run_pipeline.sh --local --config slurm/config/demo.env

test: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q tests

# Kanzi is not on PyPI: `make test-kanzi` installs it from its source (KANZI_SRC) into a venv of its own and
# runs tests/test_kanzi.py there, where skipping is a failure. Not in .venv: Kanzi imports timm, timm imports
# torchvision, and PyPI's torchvision only imports beside PyPI's own (CUDA) torch build, not beside the CPU
# torch that .venv gets here ("operator torchvision::nms does not exist"). KANZI_TORCH_SPEC is a matching
# pair (here both lie on disk; ~6.7 GB with the CUDA libraries, which also run on a CPU).
KANZI_SRC ?= ../shared/third_party/kanzi
KANZI_VENV ?= .venv-kanzi
KANZI_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

$(KANZI_VENV)/bin/.installed: requirements.txt requirements-dev.txt
	$(PY) -m venv $(KANZI_VENV)
	$(KANZI_VENV)/bin/pip install -q --upgrade pip
	$(KANZI_VENV)/bin/pip install -q $(KANZI_TORCH_SPEC)
	$(KANZI_VENV)/bin/pip install -q -r requirements-dev.txt "$(KANZI_SRC)"
	touch $@

test-kanzi: $(KANZI_VENV)/bin/.installed
	PATH="$(abspath $(KANZI_VENV))/bin:$$PATH" TOKENFOLD_REQUIRE_KANZI=1 $(KANZI_VENV)/bin/python -m pytest -q tests/test_kanzi.py

.PHONY: install demo test test-kanzi
