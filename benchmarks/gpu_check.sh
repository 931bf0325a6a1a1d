#!/usr/bin/env bash
# GPU readiness check of lit_wsss (issue 18). TO BE RUN BY THE PERSON WHO HAS THE CUDA MACHINE: it was written and
# dry-run on a CPU-only host (`python benchmarks/gpu_stages.py --device cpu ...`), never on a GPU.
#
#   bash benchmarks/gpu_check.sh                 # from a fresh checkout; installs .venv first (make install)
#   STEPS=50 IMAGES=96 METHOD=cpn bash benchmarks/gpu_check.sh
#
# What it runs, in this order (every command is printed before it runs):
#   1. make install (pip install -e ".[test,effnet]" into .venv; a no-op when .venv is up to date)
#   2. nvidia-smi, then benchmarks/gpu_stages.py: torch / CUDA / cuDNN versions, a 1-process NCCL all_reduce,
#      then per precision (fp32, bf16-mixed, bf16-mixed + channels_last) on the built-in synthetic set:
#      fit baseline CAM and METHOD (STEPS steps each), CAM export of IMAGES held-out images, lit-wsss eval-cam,
#      the export again with its IR labels streamed (the CRF in WORKERS CPU processes beside the GPU),
#      fit IRNet (STEPS steps), IRNet's random walk (pseudo-label predict); then a Markdown table of images/s per
#      stage and the CAM mIoU of each precision (written to $OUT/gpu_check.md)
#   3. pytest -m gpu tests/test_gpu.py (one test per stage, on the GPU, bf16-mixed)
# Budget on an H200: about 3 min of install on a fresh machine, then 2-4 min of stages; every size is a variable.
set -euo pipefail
cd "$(dirname "$0")/.."

STEPS=${STEPS:-50}           # training steps of each fit
IMAGES=${IMAGES:-96}         # held-out images: CAM export, IR labels, IRNet, random walk
TRAIN_IMAGES=${TRAIN_IMAGES:-240}
BATCH=${BATCH:-16}
METHOD=${METHOD:-sipe}       # the method trained beside baseline CAM: sipe or cpn
WORKERS=${WORKERS:-8}        # data loader workers (and IR-label processes)
VARIANTS=${VARIANTS:-fp32,bf16,bf16+CL}
OUT=${OUT:-outputs/gpu_check}
PYTHON=${PYTHON:-python3}
export NO_ALBUMENTATIONS_UPDATE=1 JSONARGPARSE_DEPRECATION_WARNINGS=off WANDB_MODE=offline WANDB_SILENT=true

run() { echo "+ $*" >&2; "$@"; }

start=$(date +%s)
run make install PYTHON="$PYTHON"
run nvidia-smi || echo "nvidia-smi failed: no NVIDIA driver visible" >&2
run .venv/bin/python benchmarks/gpu_stages.py --device gpu --steps "$STEPS" --images "$IMAGES" \
    --train-images "$TRAIN_IMAGES" --batch "$BATCH" --method "$METHOD" --workers "$WORKERS" \
    --variants "$VARIANTS" --out "$OUT"
run .venv/bin/python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
echo "gpu_check: done in $(( $(date +%s) - start )) s; table in $OUT/gpu_check.md" >&2
