#!/usr/bin/env bash
# One-GPU check (H100): the large384 preset in bf16 autocast — samples/s, MFU against a measured bf16
# matmul peak, peak memory — then the largest batch that fits (doubling search). Under 5 minutes.
#
#   bash benchmarks/gpu_check.sh [--device cpu --steps 1 --batch-size 1 ...]   (extra args are passed on)
#
# Defaults: --preset large384 --dtype bf16 --batch-size 16 --steps 10 --repeats 3 (30 timed steps),
# --find-max-batch from 16. Results: benchmarks/gpu_check.json (or $GPU_CHECK_JSON).
# Without a GPU it runs on CPU with whatever arguments are given (a dry run: pass --device cpu
# --steps 1 --batch-size 1 --preset tiny to check the script quickly).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
OUT=${GPU_CHECK_JSON:-benchmarks/gpu_check.json}
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  DEFAULTS=(--preset large384 --dtype bf16 --device cuda --batch-size 16 --steps 10 --repeats 3 --warmup 2 --optim fused
            --find-max-batch)
else
  echo "no CUDA device: CPU dry run (pass e.g. --device cpu --steps 1 --batch-size 1 --preset tiny)"
  DEFAULTS=(--preset large384 --dtype bf16 --device cpu --batch-size 1 --steps 1 --warmup 0 --threads 0)
fi
# later arguments override earlier ones (argparse keeps the last value)
exec timeout 290 "$PY" benchmarks/train_step.py "${DEFAULTS[@]}" --json "$OUT" "$@"
