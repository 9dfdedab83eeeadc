"""Throughput of ``RAHFScorer.score`` (images/s) per model preset, autocast dtype and decode mode.

    python benchmarks/predict.py [--presets tiny paper] [--dtypes fp32 bf16] [--decode none constrained free]
                                 [--n 16] [--batch-size 8] [--image-size 256] [--device cpu] [--json out.json]

Models are built with random weights (no checkpoint or download needed). The ``paper`` preset uses
the T5-base vocabulary size; when the ``t5-base`` tokenizer is not available offline it runs with
the built-in ``words`` tokenizer (the cost is the same: only the embedding table's size matters).
Each measurement scores ``--n`` random RGB images of ``--image-size`` px (PIL, decoded in memory,
so file I/O is not timed) against ~12-word prompts after one warm-up batch; the time is the
minimum over ``--repeat`` runs. Includes preprocessing, the forward pass, decoding and the
bilinear upsampling of both heatmaps to the image's size. The default run takes well under 2
minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from PIL import Image

from rahf import RAHF, RAHFConfig, RAHFScorer

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
WORDS = ("a yellow cat on a red mat next to two blue squares and one small green star in the corner").split()


def build(preset: str) -> RAHF:
    torch.manual_seed(0)
    if preset == "tiny":
        return RAHF(RAHFConfig.preset("tiny"))
    try:
        from rahf.model.tokenizer import load_tokenizer

        load_tokenizer(RAHFConfig.preset(preset).text.tokenizer)
        return RAHF(RAHFConfig.preset(preset))
    except Exception:  # offline without the T5 tokenizer: same shapes, built-in tokenizer
        return RAHF(RAHFConfig.preset(preset, text={"tokenizer": "words", "vocab_size": 32128}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--decode", nargs="+", default=["none", "constrained", "free"])
    ap.add_argument("--n", type=int, default=16, help="images per measurement")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (args.image_size, args.image_size, 3), dtype=np.uint8))
              for _ in range(args.n)]
    prompts = [" ".join(rng.choice(WORDS, size=12)) for _ in range(args.n)]
    results = []
    for preset in args.presets:
        model = build(preset)
        for dt in args.dtypes:
            scorer = RAHFScorer(model, device=device, dtype=DTYPES[dt])
            for mode in args.decode:
                decode = None if mode == "none" else mode
                scorer.score(images[:args.batch_size], prompts[:args.batch_size], args.batch_size, decode)  # warm-up
                best = float("inf")
                for _ in range(max(1, args.repeat)):
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    scorer.score(images, prompts, batch_size=args.batch_size, decode=decode)
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    best = min(best, time.perf_counter() - t)
                results.append({"preset": preset, "dtype": dt, "decode": mode, "images_per_s": args.n / best,
                                "seconds": best, "n": args.n, "batch_size": args.batch_size})
                r = results[-1]
                print(f"  {preset:8s} {dt:5s} {mode:12s} {r['images_per_s']:8.2f} img/s", flush=True)
        del model
    info = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "image_size": args.image_size,
            "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None}
    print()
    print(f"RAHFScorer.score throughput on {device} ({info['gpu'] or str(info['threads']) + ' threads'}), "
          f"{args.n} images of {args.image_size} px, batch {args.batch_size}")
    print("| preset | dtype | decode | images/s |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['preset']} | {r['dtype']} | {r['decode']} | {r['images_per_s']:.2f} |")
    out = {"info": info, "results": results}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
