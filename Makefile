# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Idle OpenMP threads must sleep, not spin: on a shared 2-core CPU spinning costs 10x (runtime.py).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo demo-cifar test lint bench study severity-study gpu-check clean

$(STAMP): setup.cfg pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision first and pinned: on this machine they come from local disk.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test,plot,corruptions]'
	# glass blur's Numba loop, compiled once into its disk cache (~5 s) instead of in every -C run
	$(BIN)/python -c "from augmix_gpu.data.make_c import compile_numba; compile_numba()"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python train.py

# The CIFAR command (configs/augmix_cifar.toml, WRN-40-2) on a generated CIFAR-100-format set and
# its CIFAR-C, on the CPU: only the budget is cut (2 epochs of 1000 images, batch 32).
CIFAR_DEMO ?= $(or $(AUGMIX_GPU_CACHE),$(HOME)/.cache/augmix_gpu)/demo-cifar
demo-cifar: $(STAMP)
	$(BIN)/python -m augmix_gpu.data.synthetic $(CIFAR_DEMO)/cifar --format cifar100 --train_per_class 100 --val_per_class 20
	$(BIN)/python -m augmix_gpu.data.make_c $(CIFAR_DEMO)/cifar $(CIFAR_DEMO)/CIFAR-100-C --cifar cifar100 --workers 2
	$(BIN)/python train.py --config augmix_cifar.toml --data $(CIFAR_DEMO)/cifar --cifar_c $(CIFAR_DEMO)/CIFAR-100-C --epochs 2 --batch 32 --workers 2 --ckpt_dir_base runs/demo-cifar

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two workers, one file each at a time (module fixtures stay in one process), one intra-op thread
# per process: the suite is mostly single-threaded subprocesses, so two cores halve its time.
test: $(STAMP) lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_augment.py
	$(BIN)/python benchmarks/bench_loader.py
	$(BIN)/python benchmarks/bench_train_step.py

study: $(STAMP)
	$(BIN)/python benchmarks/robustness_study.py

severity-study: $(STAMP)
	$(BIN)/python benchmarks/severity_study.py

# Every GPU path in stages within 8 minutes (docs/gpu.md): one row per stage in
# benchmarks/results/gpu_check.json as it ends. No GPU: one line, exit 0; a GPU torch cannot use:
# exit 1 with the reason. More stages later: make gpu-check GPU_CHECK="--only compile loader".
GPU_CHECK ?=
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py $(GPU_CHECK)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
