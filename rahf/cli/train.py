"""``rahf train`` and ``rahf eval`` (both also work under ``accelerate launch``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub) -> None:
    from ..training.trainer import add_arguments, run

    p = sub.add_parser("train", help="train, evaluate and export a model (same as train.py)")
    add_arguments(p)
    p.set_defaults(func=run)

    e = sub.add_parser("eval", help="evaluate a checkpoint on a dataset split (every metric in docs/metrics.md)")
    e.add_argument("--checkpoint", required=True, help="a save_pretrained directory (e.g. RUN/export)")
    e.add_argument("--data", required=True, help="dataset directory in the package's format")
    e.add_argument("--split", default="test")
    e.add_argument("--out", help="write the metrics as JSON here")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--decode", default="free", help="free, constrained, both, or none")
    e.add_argument("--num-workers", type=int, default=1)
    e.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    e.add_argument("--max-batches", type=int)
    e.add_argument("--report", help="also write a visual HTML report of the evaluation into this directory")
    e.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    import torch
    from accelerate import Accelerator

    from ..data.format import open_dataset
    from ..data.torch_data import RAHFCollator, RAHFTorchDataset
    from ..eval.evaluate import evaluate
    from ..eval.metrics import format_tables
    from ..model import RAHF

    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=args.mixed_precision)
    if acc.device.type == "cpu":
        import os

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // acc.num_processes))
    model = RAHF.from_pretrained(args.checkpoint).to(acc.device).eval()
    cfg = model.config
    ds = RAHFTorchDataset(open_dataset(args.data, args.split), cfg.vision.img_size, cfg.heatmap_size,
                          cfg.vision.mean, cfg.vision.std)
    # ground-truth maps at their stored size: predictions are upsampled to it for the metrics
    first = ds.split[0].implausibility_map.shape[0] if len(ds) else cfg.heatmap_size
    ds.heatmap_size = first
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, collate_fn=RAHFCollator.for_model(model),
                                         num_workers=args.num_workers)
    loader = acc.prepare(loader)
    modes = {"both": ["free", "constrained"], "none": [None]}.get(args.decode, [args.decode])
    metrics: dict = {}
    for i, mode in enumerate(modes):
        m = evaluate(model, loader, gather=acc.gather_for_metrics, decode=mode, max_batches=args.max_batches,
                     progress=acc.is_local_main_process, autocast=acc.autocast)
        if i == 0:
            metrics.update(m)
        if mode == "constrained" and len(modes) > 1:
            metrics.update({k.replace("keyword", "keyword_constrained", 1): v for k, v in m.items()
                            if k.startswith("keyword")})
    if acc.is_main_process:
        print(f"{args.split} split of {args.data} ({int(metrics.get('count/n', 0))} examples), checkpoint {args.checkpoint}")
        print(format_tables(metrics))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
        if args.report:
            from ..eval.report import write_eval_report

            write_eval_report(model, ds, metrics, args.report)
    acc.wait_for_everyone()
    return 0
