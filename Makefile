# Two commands on a fresh machine (see README):
#   make demo   sets up .venv and runs the main job on the shipped tiny checkpoints
#   make test   sets up .venv and runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is the CPU build this project is developed and tested with; on a CUDA machine,
# install the torch wheel matching your driver first and run `make setup TORCH=`.
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q $(TORCH))
	$(PY) -m pip install -q -e ".[dev,nuscenes,quant]"
	$(PY) -m pip install -q --no-deps nuscenes-devkit==1.2.0  # pins numpy<2; runs on numpy 2 (see pyproject)
	touch $@

demo: setup
	$(VENV)/bin/altermoma pipeline

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
