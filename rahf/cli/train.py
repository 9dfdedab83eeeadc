"""``rahf train`` and ``rahf eval`` (both also work under ``accelerate launch``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from .common import add_batch_size, add_checkpoint, add_data, add_decode


def run_train(args: argparse.Namespace) -> int:
    from ..training.trainer import run

    return run(args)


def register(sub) -> None:
    from ..training.config import add_arguments

    p = sub.add_parser("train", help="train, evaluate and export a model (same as train.py)")
    add_arguments(p)
    p.set_defaults(func=run_train)

    e = sub.add_parser(
        "eval", help="evaluate a checkpoint on a dataset split (every metric in docs/metrics.md)",
        description="Evaluate a checkpoint. When CHECKPOINT/metrics.json records how it was measured (its "
                    "\"measured\" block: dataset, split, decoding, batch size, ...), those settings are the "
                    "defaults, so `rahf eval --checkpoint RUN/export` measures the training job's numbers again; "
                    "every flag given overrides its setting.")
    add_checkpoint(e)
    add_data(e, required=False, split=None, help="dataset directory in the package's format (default: as recorded)",
             split_help="default: as recorded, else test")
    e.add_argument("--out", help="write metrics.json (metrics, \"unavailable\" reasons, \"measured\" settings) here")
    e.add_argument("--predictions", help="write per-example results (scores, tagged prompt, per-map metrics) as JSONL here")
    add_batch_size(e, default=None, help=f"default: as recorded, else {DEFAULT_BATCH_SIZE}")
    add_decode(e, default=None, both=True,
               help="default: as recorded, else constrained. 'both': that decoding for keyword/... plus the "
                    "other one's keyword metrics as keyword_<other>/... (the training job's test keys)")
    e.add_argument("--num-workers", type=int, default=1)
    e.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], help="default: as recorded, else no")
    e.add_argument("--max-batches", type=int, help="default: as recorded, else all (0: all)")
    e.add_argument("--counterfactual", type=int, metavar="N",
                   help="the counterfactual block (one-word prompt swaps: does the model read the prompt?) on the "
                        "first N records; 0: off; default: as recorded, else every record")
    e.add_argument("--report", help="also write a visual HTML report of this evaluation into this directory")
    e.set_defaults(func=run_eval)


DEFAULT_BATCH_SIZE = 32


def eval_settings(args: argparse.Namespace, measured: dict) -> dict:
    """The settings of ``rahf eval``: each flag given, else the checkpoint's recorded ``measured``
    value, else the default. Returns data, split, batch_size, max_batches, decode, decode_also,
    mixed_precision, on_bad_record."""
    from ..eval.predict import DEFAULT_DECODE, check_decode, other_decode

    rec = measured or {}
    data = args.data or rec.get("dataset")
    if not data:
        raise SystemExit("rahf eval: give --data (the checkpoint records no dataset)")
    recorded_decode = check_decode(rec["decode"]) if "decode" in rec else DEFAULT_DECODE
    if args.decode is None:
        decode = recorded_decode
        decode_also = check_decode(rec.get("decode_also")) if "decode" in rec else None
    elif args.decode == "both":
        decode = recorded_decode or DEFAULT_DECODE
        decode_also = other_decode(decode)
    else:
        decode, decode_also = check_decode(args.decode), None
    max_batches = args.max_batches if args.max_batches is not None else rec.get("max_batches")
    return {"data": data, "split": args.split or rec.get("split") or "test",
            "batch_size": args.batch_size or rec.get("batch_size") or DEFAULT_BATCH_SIZE,
            "max_batches": max_batches or None, "decode": decode, "decode_also": decode_also,
            "mixed_precision": args.mixed_precision or rec.get("mixed_precision") or "no",
            "on_bad_record": rec.get("on_bad_record") or "error",
            "counterfactual_records": (getattr(args, "counterfactual", None) if getattr(args, "counterfactual", None)
                                       is not None else rec.get("counterfactual_records"))}


def run_eval(args: argparse.Namespace) -> int:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from ..data.format import open_dataset
    from ..data.torch_data import RAHFCollator, RAHFTorchDataset
    from ..eval.evaluate import measurement, read_metrics, run_evaluation, write_metrics
    from ..model import RAHF

    from ..model.hub import resolve_checkpoint

    if args.report:
        from .._extras import require

        require("matplotlib", extra="report", purpose="rahf eval --report")
    checkpoint = resolve_checkpoint(args.checkpoint)  # a directory, or a Hub repo id resolved into the cache
    recorded = checkpoint / "metrics.json"
    measured = read_metrics(recorded)[2] if recorded.is_file() else {}
    st = eval_settings(args, measured)
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=st["mixed_precision"])
    if acc.device.type == "cpu":
        import os

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // acc.num_processes))
    model = RAHF.from_pretrained(checkpoint).to(acc.device).eval()
    cfg = model.config
    # ground-truth maps at their stored size: heatmap metrics are computed there
    ds = RAHFTorchDataset(open_dataset(st["data"], st["split"], on_bad_record=st["on_bad_record"]),
                          cfg.vision.img_size, None, cfg.vision.mean, cfg.vision.std)
    loader = torch.utils.data.DataLoader(ds, batch_size=st["batch_size"], collate_fn=RAHFCollator.for_model(model),
                                         num_workers=args.num_workers)
    loader = acc.prepare(loader)
    if measured and acc.is_main_process:
        given = {k for k in ("data", "split", "batch_size", "decode", "mixed_precision", "max_batches")
                 if getattr(args, k) is not None}
        used = ", ".join(f"{k}={st[k]}" for k in ("data", "split", "batch_size", "decode", "decode_also",
                                                   "mixed_precision", "max_batches") if k not in given)
        print(f"settings recorded in {recorded}: {used}")
    keep = 6 if args.report else 0
    ev = run_evaluation(model, loader, gather_object=gather_object if acc.num_processes > 1 else None,
                        decode=st["decode"], decode_also=st["decode_also"],
                        max_batches=st["max_batches"], progress=acc.is_local_main_process, autocast=acc.autocast,
                        examples=bool(args.report or args.predictions), keep_maps=keep)
    info = measurement(ev, split=st["split"], dataset=st["data"], checkpoint=args.checkpoint,
                       batch_size=st["batch_size"], max_batches=st["max_batches"],
                       mixed_precision=st["mixed_precision"], num_processes=acc.num_processes,
                       on_bad_record=st["on_bad_record"], model_heatmap_size=cfg.heatmap_size)
    cf = st["counterfactual_records"]
    if cf != 0 and acc.is_main_process:
        from ..eval.counterfactual import counterfactual_metrics

        ev.metrics.update(counterfactual_metrics(model, ds.split, cf, batch_size=st["batch_size"],
                                                 decode=st["decode"] or "constrained"))
    info["counterfactual_records"] = cf
    if acc.is_main_process:
        print(f"{st['split']} split of {st['data']} ({int(ev.metrics.get('count/n', 0))} examples), "
              f"checkpoint {args.checkpoint}, decoding {st['decode']}"
              + (f" (+ {st['decode_also']} as keyword_{st['decode_also']}/...)" if st["decode_also"] else ""))
        print(ev.tables())
        cut = {k: int(ev.metrics.get(f"count/truncated_{k}s", 0)) for k in ("prompt", "target")}
        if any(cut.values()):
            print(f"warning: {cut['prompt']} prompt(s) cut at model.text.max_prompt_tokens="
                  f"{cfg.text.max_prompt_tokens} and {cut['target']} tagged prompt(s) cut at "
                  f"max_target_tokens={cfg.text.max_target_tokens}; their keywords and alignment see only the "
                  "kept tokens (count/truncated_* in the metrics)", file=sys.stderr)
        if cf != 0:
            from ..eval.counterfactual import format_counterfactual

            print(format_counterfactual(ev.metrics))
        if args.out:
            write_metrics(args.out, ev.metrics, ev.unavailable, info)
        if args.predictions:
            out = Path(args.predictions)
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "w", encoding="utf-8") as f:
                for rec in ev.examples.records():
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        if args.report:
            from ..eval.report import write_eval_report

            write_eval_report(ev, ds, args.report, n_show=keep, measured=info)
    acc.wait_for_everyone()
    return 0
