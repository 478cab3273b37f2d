# Two commands for a newcomer (see README.md):
#   make run    set up a virtual environment and run the main job (the accuracy evaluation
#               of KCM pruning on the embedded default model and task)
#   make test   set up the same environment and run the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on this machine's disk; a GPU machine can override, e.g.
#   make setup TORCH_SPEC="torch==2.13.0" PIP_EXTRA="--index-url ..."
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.kcm-installed
EVAL_ARGS ?=

.PHONY: setup test lint run bench-smoke clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	# numpy with torch: the editable install's build imports torch, which warns "Failed to
	# initialize NumPy" when numpy is not there yet
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" "numpy>=1.24"
	$(BIN)/python -m pip install --quiet --no-build-isolation -e ".[test,eval]"
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check .

test: setup lint
	TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests
	TRITON_INTERPRET=1 KCM_BENCH_SMOKE=1 $(BIN)/python -m pytest -q benchmarks --benchmark-disable

run: setup
	HF_HUB_OFFLINE=1 $(BIN)/kcm-eval $(EVAL_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

# make gpu-check: build the CUDA extension for the present GPU, run the GPU tests (no
# interpreter), compute-sanitizer memcheck/racecheck, the benchmarks and the timing goals;
# results under benchmarks/results/<device>/ (see tools/gpu_check.py, benchmarks/README.md).
# Runs with the GPU machine's own python (its CUDA torch), not the CPU venv:
#   make gpu-check PART=1        one lent-GPU command (<= 8 min): build, GPU parity tests, timing goals
#   make gpu-check PART=2        the second: sanitizers, dispatch table, the benchmarks
#   make gpu-check [STAGES=env,build,tests] [GPU_CHECK_OUT=dir] [BUDGET=seconds] [GPU_PYTHON=python3]
#   make gpu-check DRY_RUN=1 [PART=1]   the plan with each stage's estimated time, and a check
#                                       that its files exist (no GPU needed)
GPU_PYTHON ?= python3
.PHONY: gpu-check
gpu-check:
	$(GPU_PYTHON) tools/gpu_check.py $(if $(DRY_RUN),--dry-run) $(if $(PART),--part $(PART)) $(if $(STAGES),--stages $(STAGES)) $(if $(GPU_CHECK_OUT),--out $(GPU_CHECK_OUT)) $(if $(BUDGET),--budget $(BUDGET))
