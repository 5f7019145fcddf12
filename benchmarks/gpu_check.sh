#!/usr/bin/env bash
# The prepared GPU check (issue 13): at most 5 minutes on one H100/H200.
#   benchmarks/gpu_check.sh            on the GPU machine (see .library/device/README.md: carry the
#                                      open_clip_torch, ftfy and wcwidth wheels, pip install them first)
#   benchmarks/gpu_check.sh --dry-run  here, on the CPU: checks the script, not the figures
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
if [[ "${1:-}" == "--dry-run" ]]; then
  $PY benchmarks/gpu_check.py --dry-run --out "$OUT/gpu_check.json"
  echo "dry run: the NCCL torchrun smoke run needs CUDA; skipped here"
  exit 0
fi
timeout 210 $PY benchmarks/gpu_check.py --out "$OUT/gpu_check.json"
# one-GPU NCCL smoke run of the real trainer (shapes10 is generated offline; random teacher weights)
$PY -c "from clipdistill.teacher.tiny import save_random_tiny_teacher as s; s('$OUT/tiny-random.safetensors', seed=0)"
timeout 90 torchrun --standalone --nproc_per_node 1 -m clipdistill train --method labels --data train \
  --epochs 1 --student resnet10t --max-images 2000 --pretrained "$OUT/tiny-random.safetensors" \
  --cache-dir "$OUT/cache" --out "$OUT/ddp-run" --no-progress --json | tail -1
echo "NCCL smoke run: done (backend as logged above)"
