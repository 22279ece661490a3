# make test  – create .venv if needed, install (CPU torch pinned), run ruff + pytest
# make demo  – create .venv if needed, install, run the CPU demo (FRESH=1 starts over)
# make demo-finetune – after make demo: teach its model a new colour (LoRA and full fine-tuning)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip

.PHONY: install test lint demo demo-finetune bench clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# constraints.txt pins torch to the CPU build; torchvision is never installed.
	$(PIP) install -q -c constraints.txt -e '.[dev,demo]'
	# torch-fidelity (reference FID Inception for a parity test) needs torchvision as a package,
	# not for its Inception: installed without dependencies, outside the import path.
	$(PIP) install -q --no-deps --upgrade --target $(VENV)/reference torch-fidelity==0.4.0
	@touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install lint
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m pytest -q -n 2 --durations=15

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m ldm.demo $(if $(FRESH),--fresh,)

# Opt-in second act (a few minutes more than make demo's budget); needs make demo's demo_runs/.
demo-finetune: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m ldm.demo_finetune $(if $(FRESH),--fresh,)

bench: install
	$(BIN)/python bench/autoencoder.py
	$(BIN)/python bench/unet.py
	$(BIN)/python bench/data.py
	$(BIN)/python bench/sample.py

clean:
	rm -rf $(VENV) runs demo_runs .pytest_cache
