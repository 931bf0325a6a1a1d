# lit_wsss: every target only builds a command line; the work is done by `lit-wsss` (lit_wsss/cli.py).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
METHOD ?= cam
DATA   ?= voc
ARGS   ?=
# experiments/<data>/_base.yaml, then the method's recipe (experiments/methods/) and what the data set changes
# (experiments/<data>/), the layering of lit_wsss.stages.configs
METHOD_FILES := $(wildcard experiments/methods/$(METHOD).yaml experiments/$(DATA)/$(METHOD).yaml)
ifeq ($(METHOD_FILES),)
$(error METHOD=$(METHOD) DATA=$(DATA): neither experiments/methods/$(METHOD).yaml nor experiments/$(DATA)/$(METHOD).yaml exists)
endif
CFG    := --config experiments/$(DATA)/_base.yaml $(foreach f,$(METHOD_FILES),--config $(f))

# Offline-safe defaults (../shared/stack.md, "Pitfalls").
export NO_ALBUMENTATIONS_UPDATE := 1
export JSONARGPARSE_DEPRECATION_WARNINGS := off
export WANDB_SILENT := true

.DEFAULT_GOAL := help
.PHONY: help install demo test test-all train cams eval-cam pipeline pipeline-mini validate benchmark
OUT    ?= outputs/cams
LIST   ?= val
ROOT   ?= data/synthetic

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: $(VENV)/.installed  ## virtual environment with lit_wsss (editable), test and EfficientNet extras

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[test,effnet]"
	touch $@

demo: install  ## train baseline CAM on the built-in synthetic set (CPU, minutes) and compare with trivial baselines
	$(BIN)/python -m lit_wsss.demo $(ARGS)

test: install  ## the test suite without slow and GPU tests (what CI runs)
	$(BIN)/python -m pytest -q -m "not slow and not gpu" $(ARGS)

test-all: install  ## every test, slow ones included
	$(BIN)/python -m pytest -q -m "not gpu" $(ARGS)

# GSLM trains in rounds (GLM -> seeds -> SLM x 3): its `train` is the `lit-wsss gslm` driver
TRAIN_CMD = $(if $(filter gslm,$(METHOD)),gslm --data $(DATA),fit $(CFG))

train: install  ## make train METHOD=cam DATA=voc ARGS="--data.init_args.root ... --trainer.devices 4" (gslm: ARGS="--root ...")
	$(BIN)/lit-wsss $(TRAIN_CMD) $(ARGS)

cams: install  ## make cams DATA=synth CKPT=path/last.ckpt OUT=outputs/cams  (CAM files + manifest; resumes)
	$(BIN)/lit-wsss predict $(CFG) --config experiments/stages/predict_cams.yaml --ckpt_path $(CKPT) \
	  --trainer.callbacks.init_args.out_dir $(OUT) $(ARGS)

eval-cam: install  ## make eval-cam CAMS=outputs/cams ROOT=data/synthetic LIST=val OUT=outputs/eval/cams.json
	$(BIN)/lit-wsss eval-cam --cams $(CAMS) --root $(ROOT) --list $(LIST) --out $(OUT) $(ARGS)

# the pipeline's default ROOT is the synthetic set; DATA=voc ROOT=... on the command line wins
pipeline: DATA = synth
pipeline: LIST = train
pipeline: install  ## make pipeline METHOD=cam|sipe|cpn|vwe|gslm|slams|ground_truth [DATA=synth ROOT=data/synthetic LIST=train] (train CAM ... pseudo labels ... segmentation mIoU on val)
	$(BIN)/lit-wsss pipeline --data $(DATA) --method $(METHOD) --root $(ROOT) --list $(LIST) $(ARGS)

benchmark: DATA_ROOT = ../shared/data/voc12-bench
benchmark: RESULTS = docs/results.md
benchmark: BUDGET = benchmarks/budgets/cpu.yaml
benchmark: install  ## make benchmark [DATA_ROOT=voc-style root RESULTS=docs/results.md BUDGET=...]: every method, one table (resumes)
	$(BIN)/lit-wsss benchmark --root $(DATA_ROOT) --results $(RESULTS) --budget $(BUDGET) $(ARGS)

pipeline-mini: install  ## the chain up to the pseudo labels on ../shared/data/voc12-mini (real VOC images, CPU)
	$(BIN)/lit-wsss pipeline --data voc --method cam --root ../shared/data/voc12-mini \
	  --list ../shared/data/voc12-mini/val.txt --out outputs/pipeline/voc12-mini \
	  --cam-config experiments/voc/mini.yaml --cam-config experiments/voc/mini_cpu.yaml --irn-config experiments/voc/mini_irn.yaml \
	  --no-segmentation $(ARGS)

validate: install  ## make validate METHOD=cam DATA=voc ARGS="--ckpt_path ... --data.init_args.root ..."
	$(BIN)/lit-wsss validate $(CFG) $(ARGS)
