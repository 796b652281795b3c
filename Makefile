# brainfm: the two commands a new user types are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.brainfm-installed
# Brainmarks (MedARC's evaluation suite) for the plugin's tests: see install-brainmarks
BRAINMARKS_VERSION := 0.1.1
BRAINMARKS_STAMP := $(VENV)/.brainmarks-installed
# keep pip quiet about the extra local indexes some machines configure
PIP := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: install install-brainmarks demo demo-volume test test-slow bench bench-search bench-scale-data bench-eval bench-gpu bench-fingerprint gpu-wheels gpu-check clean-venv

install: $(STAMP)

# torch first and pinned (a CPU build on these machines); then the package, editable, with dev
# tools. Re-runs only when pyproject.toml changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e ".[dev]"
	@$(BIN)/python -c "import torch, sys; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '$(TORCH_VERSION)' else 'torch %s installed, expected $(TORCH_VERSION)' % torch.__version__)"
	@touch $@

# Brainmarks beside brainfm, in the same environment, for the plugin (src/brainmarks/models/brainfm.py) and its
# tests. brainmarks 0.1.1 declares setuptools<67 while torch 2.13 needs setuptools>=77, so pip's resolver cannot
# install it (left alone it replaces torch). Its runtime dependencies come from the extra brainfm[brainmarks]
# (resolved with torch pinned), then brainmarks itself without its declared dependencies; torch is checked again,
# and the modules the tests use must import offline. Re-runs when pyproject.toml changes (through $(STAMP)).
install-brainmarks: $(BRAINMARKS_STAMP)

$(BRAINMARKS_STAMP): $(STAMP)
	$(PIP) install -q "torch==$(TORCH_VERSION)" -e ".[dev,brainmarks]"
	$(PIP) install -q --no-deps "brainmarks==$(BRAINMARKS_VERSION)"
	@$(BIN)/python -c "import torch, sys; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '$(TORCH_VERSION)' else 'torch %s installed, expected $(TORCH_VERSION)' % torch.__version__)"
	@# importing Brainmarks logs one line per model of its own whose optional package is absent (BrainLM, SwiFT, ...)
	@# and pycortex prints that Inkscape is missing (only its SVG figures need it): shown only if the check fails
	@HF_HUB_OFFLINE=1 $(BIN)/python -c "import brainmarks.models.registry as r, brainmarks.datasets.base, brainmarks.main_logistic; assert 'brainfm' in r.list_models(), r.list_models()" \
		> $(VENV)/.brainmarks-check.log 2>&1 || { cat $(VENV)/.brainmarks-check.log; exit 1; }
	@touch $@

# Does a model trained by brainfm beat FC fingerprinting? Fetch the embedded real data (7 HCP subjects; 5 subjects
# of another site), pretrain the demo's model and three simple baselines on the first half of each HCP run, and
# re-identify subjects on the held-out second halves and, zero-shot, on the other site: the model against its
# initialisation (FC itself), FC fingerprinting, meanMLP, BrainNetCNN and an MLP on FC.
# Re-runnable: ckpt_path=auto resumes each run, and a finished one ends at once (a run stopped by Ctrl-C goes on);
# `brainfm-train experiment=demo run_name=demo overwrite=true` trains one again from scratch.
DEMO_COMPARE := compare='{meanMLP: outputs/baseline_mean_mlp/demo, BrainNetCNN: outputs/baseline_brainnetcnn/demo, FC-MLP: outputs/baseline_fc_mlp/demo}'
demo: install
	$(BIN)/brainfm-data fetch hcp_rest_roi
	$(BIN)/brainfm-data fetch gw_rest_roi
	$(BIN)/brainfm-train experiment=demo run_name=demo ckpt_path=auto
	$(BIN)/brainfm-train experiment=baseline_mean_mlp run_name=demo ckpt_path=auto
	$(BIN)/brainfm-train experiment=baseline_brainnetcnn run_name=demo ckpt_path=auto
	$(BIN)/brainfm-train experiment=baseline_fc_mlp run_name=demo ckpt_path=auto
	$(BIN)/brainfm-evaluate ckpt=outputs/demo/demo probe=false $(DEMO_COMPARE)
	$(BIN)/brainfm-evaluate ckpt=outputs/demo/demo probe=false $(DEMO_COMPARE) data_path=data/gw_rest_roi.h5 \
		window_lengths=[30,60] out_dir=outputs/demo/demo/eval_gw

# SimMIM on real 4-D fMRI (nitime + nipy NIfTI runs, preprocessed to a 48^3 volume store) on the CPU.
demo-volume: install
	$(BIN)/brainfm-data fetch nifti_toy
	$(BIN)/brainfm-train experiment=simmim_toy run_name=demo trainer.max_steps=200 trainer.val_check_interval=50 ckpt_path=auto

# BRAINFM_REQUIRE_BRAINMARKS: the Brainmarks plugin's tests fail, not skip, when brainmarks does not import
test: install install-brainmarks
	BRAINFM_REQUIRE_BRAINMARKS=1 $(BIN)/python -m pytest -q

test-slow: install install-brainmarks
	BRAINFM_REQUIRE_BRAINMARKS=1 $(BIN)/python -m pytest -q -m slow

# SWIFT_REPO=<checkout of Transconnectome/SwiFT> adds the side-by-side Swin4D v7 comparison.
bench: install
	$(BIN)/brainfm-data fetch hcp_rest_roi
	$(BIN)/python scripts/bench_roi_loader.py
	$(BIN)/python scripts/bench_objectives.py
	$(BIN)/python scripts/bench_swin4d.py $(if $(SWIFT_REPO),--swift-repo $(SWIFT_REPO))
	$(BIN)/python scripts/bench_volume_loader.py

# median pruner vs none on the same 20-trial search (~6-10 min on 2 CPU cores)
bench-search: install
	$(BIN)/brainfm-data fetch hcp_rest_roi
	$(BIN)/python scripts/bench_pruning.py

# the data layer at UK Biobank scale on synthetic stores (45,000 and 60,000 runs; ~15-25 min on 2 cores):
# store open time and metadata operations, time to the first optimizer step, worker memory, parcellation
bench-scale-data: install
	$(BIN)/python scripts/bench_scale_data.py

# subject re-identification over 100,000 and 300,000 synthetic embeddings (D = 288): blockwise time and
# peak memory (< 2 GB) vs dense where it fits (10,000 / 30,000; predicted beyond); ~10 min on 2 cores
bench-eval: install
	$(BIN)/python scripts/bench_eval.py

# does a model trained by brainfm beat FC fingerprinting? every model/readout/objective combination, 3 seeds, on
# held-out HCP halves and zero-shot on another site (gw); PROTOCOL=selection: what the demo's recipe was chosen on
# (first halves only). ~60-90 min on 2 cores
bench-fingerprint: install
	$(BIN)/python scripts/bench_fingerprint.py --protocol $(or $(PROTOCOL),final)

# training-step speed on the GPU it finds: Swin4D v7/v9/v11 at 5m/51m/202m (96^3 x 20) and GPT 202m, SDPA vs
# flex attention vs torch.compile, samples/s, peak memory, MFU; eager vs compiled for every family. Without a
# GPU, the same cases at a small size (~5-10 min on 2 cores). SWIFT_REPO=<SwiFT checkout> adds SwiFT's ver7.
# BENCH_GPU_ARGS: the script's options, e.g. BENCH_GPU_ARGS="--only swin4d_v9 gpt --sizes 202m --steps 3".
bench-gpu: install
	$(BIN)/python scripts/bench_gpu.py $(BENCH_GPU_ARGS)

# First run on a GPU machine without network (README, "First run on a GPU"). gpu-wheels, here, with network:
# brainfm's wheel and the pure-Python packages the GPU image lacks (hydra-core, omegaconf, antlr4-python3-runtime,
# nibabel; never torch) at the versions installed here, with the SwiFT ver7 parity fixture, into .gpu-wheels/
# (git-ignored; its size and contents printed, at most 64 MiB). gpu-check, there (no `install`: nothing can be
# fetched): brainfm from .gpu-wheels/ beside the machine's own torch (pip --no-index --no-deps), its torch features,
# `pytest -m cuda tests/test_cuda.py` and a short bench-gpu (GPT and Swin4D v9 at 202m) within 8 minutes; the
# reports go to $$OUT (./gpu-check-out). scripts/gpu_check.sh --help says more (--dry-run, --install-only).
gpu-wheels: install
	PYTHON=$(BIN)/python bash scripts/gpu_check.sh --prepare

gpu-check:
	PYTHON=$(PYTHON) bash scripts/gpu_check.sh

clean-venv:
	rm -rf $(VENV)
