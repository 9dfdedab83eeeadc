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
timeout 290 "$PY" benchmarks/train_step.py "${DEFAULTS[@]}" --json "$OUT" "$@"
# FSDP save and resume on one GPU (world size 1 still runs the sharded state-dict code): train 4 steps
# with a pause after 2 (a checkpoint of sharded model and optimizer state), resume to 4, and export
# (the full weights gathered). GPU only; RAHF_SKIP_FSDP_CHECK=1 skips it.
if [ -z "${RAHF_SKIP_FSDP_CHECK:-}" ] && "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  FSDP_DIR=$(mktemp -d)
  FSDP_RUN=(-m accelerate.commands.launch --config_file launch/fsdp_8gpu.yaml --num_processes 1 train.py
            data.root="$FSDP_DIR/data" run.output_dir="$FSDP_DIR" run.name=fsdp tracking.tracker=none
            model.preset=tiny train.max_steps=4 train.batch_size=8 eval.every=0 eval.test_at_end=false
            checkpoint.every=0 data.synth.train=64 data.synth.dev=16 data.synth.test=16)
  echo "FSDP check in $FSDP_DIR: pause at step 2, resume to 4"
  timeout 600 "$PY" "${FSDP_RUN[@]}" train.stop_after_steps=2
  timeout 600 "$PY" "${FSDP_RUN[@]}" --resume latest
  # the checkpoints hold sharded state (fsdp/), the resumed run went on from step 2, the export is whole
  test -f "$FSDP_DIR/fsdp/checkpoints/step_000004/checkpoint.json" && test -f "$FSDP_DIR/fsdp/export/model.safetensors"
  test -d "$FSDP_DIR/fsdp/checkpoints/step_000004/fsdp" && test ! -e "$FSDP_DIR/fsdp/checkpoints/step_000004/optimizer.pt"
  test "$(wc -l < "$FSDP_DIR/fsdp/steps.jsonl")" -eq 4
  "$PY" -c "from rahf import RAHF; RAHF.from_pretrained('$FSDP_DIR/fsdp/export'); print('FSDP save/resume/export: ok')"
fi
