# Two commands on a fresh machine (see README):
#   make demo   sets up .venv and runs the main job on the shipped tiny checkpoints
#   make test   sets up .venv and runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is the CPU build this project is developed and tested with; on a CUDA machine,
# install the torch wheel matching your driver first and run `make setup TORCH=`.
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-slow lint bench clean gpu-bundle

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q $(TORCH))
	$(PY) -m pip install -q -e ".[dev,nuscenes,quant,sparse]"
	$(PY) -m pip install -q --no-deps nuscenes-devkit==1.2.0  # pins numpy<2; runs on numpy 2 (see pyproject)
	touch $@

demo: setup
	$(VENV)/bin/altermoma pipeline

# Two worker processes, one test file each at a time (module fixtures are built once); tests run single-threaded
# (tests/conftest.py), so two workers use the two cores CI has. PYTEST_WORKERS=0 runs them in this process.
PYTEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)

# the tests marked slow (deselected by `make test`): more models, every crash point, torchrun resume, ...
test-slow: setup
	$(PY) -m pytest -q -m slow $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# The pure-Python packages a lent GPU machine lacks (its Python has torch, onnx, onnxruntime, safetensors, tqdm,
# matplotlib): torch-pruning at pyproject's pin. Run there: PYTHONPATH=gpu-bundle python -m benchmarks.gpu (docs/gpu.md).
GPU_BUNDLE ?= gpu-bundle
gpu-bundle:
	rm -rf $(GPU_BUNDLE)
	python3 -m pip install -q --no-deps --no-compile --only-binary=:all: --target $(GPU_BUNDLE) \
		"$$(sed -n 's/^ *"\(torch-pruning==[^"]*\)".*/\1/p' pyproject.toml)"
	@size=$$(du -sm $(GPU_BUNDLE) | cut -f1); echo "$(GPU_BUNDLE): $$size MiB"; \
		test "$$size" -lt 64 || { echo "error: $(GPU_BUNDLE) is $$size MiB, over the 64 MiB a GPU run may carry" >&2; exit 1; }

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
