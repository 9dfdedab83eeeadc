"""Data-loading throughput next to the training step rate: can loading keep up?

    python benchmarks/data.py [--preset tiny] [--n 256] [--workers 0 1 2] [--threads 2] [--json out.json]

Builds two small fixture datasets on the fly in a temporary directory (nothing is downloaded):
  * ``synth``: the package's synth generator at the preset's image size (128 px PNGs, 128² maps);
  * ``richhf``: a converted-RichHF-like split written with rahf.data.format.SplitWriter: ~512 px
    JPEG images (smooth random content, quality 90) and 512² soft-disk heatmaps (8-bit PNG).
For each it reports the samples/s of one worker (Dataset.__getitem__ + collate with the preset's
tokenizer, in this process with one torch thread, as in a DataLoader worker), the samples/s of a
DataLoader with each ``--workers`` count (the trainer's settings: persistent workers, pin_memory on
CUDA), and the training step rate of the preset at ``--batch-size`` (random inputs, ``--threads``),
so the ratio loader/step says whether loading keeps up (target: ≥ 2× with the default workers).
``--overlap`` also times training steps fed by the loader (default workers) against steps on a
fixed batch: the difference is the loading overhead the step actually sees.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import machine_info, print_table, setup_threads, write_json  # noqa: E402
from rahf.model.config import RAHFConfig  # noqa: E402
from rahf.data.format import SCORE_NAMES, SplitWriter, map_to_png_bytes, open_dataset, write_dataset_info  # noqa: E402
from rahf.data.torch_data import RAHFCollator, RAHFTorchDataset  # noqa: E402
from rahf.training.config import DataConfig  # noqa: E402

WORDS = "a red cat on the mat with two blue dogs near green tree under yellow sky big small".split()


def soft_disks(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    m = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(0, 4))):
        cy, cx = rng.uniform(0, size, 2)
        r = size / 20
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        m = np.maximum(m, np.clip((r - d) / (0.5 * r), 0, 1) * rng.uniform(0.3, 1.0))
    return m


def write_richhf_like(root: Path, n: int, size: int = 512, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with SplitWriter(root, "train") as w:
        for i in range(n):
            low = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
            img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
            noise = rng.integers(-12, 12, (size, size, 3))
            img = Image.fromarray(np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            words = list(rng.choice(WORDS, int(rng.integers(5, 15))))
            flags = rng.random(len(words)) < 0.2
            w.add(f"{i:06d}", " ".join(words), " ".join(x + "_0" if f else x for x, f in zip(words, flags)),
                  {s: float(rng.random()) for s in SCORE_NAMES}, (buf.getvalue(), "jpg"),
                  map_to_png_bytes(soft_disks(rng, size)), map_to_png_bytes(soft_disks(rng, size)))
    write_dataset_info(root, source="benchmark-richhf-like", splits={"train": n})


def one_worker_rate(ds, collate, batch: int, n: int) -> dict:
    """Samples/s of __getitem__ alone and with collate, one torch thread (as in a DataLoader worker)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds[0]
        t0 = time.perf_counter()
        items = [ds[i % len(ds)] for i in range(n)]
        t_items = time.perf_counter() - t0
        t0 = time.perf_counter()
        for j in range(0, n - batch + 1, batch):
            collate(items[j:j + batch])
        t_coll = time.perf_counter() - t0
        nb = (n // batch) * batch
    finally:
        torch.set_num_threads(prev)
    return {"getitem_per_s": n / t_items, "collate_ms_per_batch": 1e3 * t_coll / max(1, n // batch),
            "worker_per_s": 1.0 / (t_items / n + t_coll / max(1, nb))}


def loader(ds, collate, batch: int, workers: int):
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, collate_fn=collate, num_workers=workers,
                                       pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                                       drop_last=True)


def loader_rate(ds, collate, batch: int, workers: int, n: int) -> float:
    dl = loader(ds, collate, batch, workers)
    it = iter(dl)
    next(it)  # start-up (worker spawn) not timed
    got, t0 = 0, time.perf_counter()
    while got < n:
        try:
            b = next(it)
        except StopIteration:
            it = iter(dl)
            continue
        got += b["pixel_values"].shape[0]
    return got / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=32, help="the trainer's default batch")
    p.add_argument("--n", type=int, default=128, help="records per fixture split (and samples timed)")
    p.add_argument("--workers", type=int, nargs="+", default=None, help="DataLoader workers (default: 0, the "
                   "trainer's default, and 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the training step")
    p.add_argument("--step-steps", type=int, default=3)
    p.add_argument("--overlap", action="store_true")
    p.add_argument("--formats", nargs="+", default=["synth", "richhf"], choices=("synth", "richhf"))
    p.add_argument("--keep", help="build the fixtures here and keep them")
    p.add_argument("--json")
    args = p.parse_args(argv)
    setup_threads(args.threads)
    default_workers = DataConfig().num_workers
    workers = args.workers if args.workers is not None else sorted({0, default_workers, 2})

    from benchmarks.train_step import Runner, build_config

    cfg = build_config(args.preset, "preset", "multi_head")
    model_cfg = RAHFConfig.preset(args.preset)
    from rahf.model.tokenizer import load_tokenizer

    tok_name = model_cfg.text.tokenizer
    try:
        tok = load_tokenizer(tok_name)
    except Exception:  # t5-base is not available offline: the word tokenizer costs about the same
        tok_name, tok = "words", load_tokenizer("words")
    collate = RAHFCollator(tok, model_cfg.text.max_prompt_tokens, model_cfg.text.max_target_tokens)

    tmp = tempfile.TemporaryDirectory() if not args.keep else None
    base = Path(args.keep or tmp.name)
    rows = []
    try:
        for fmt in args.formats:
            root = base / fmt
            t0 = time.perf_counter()
            if not (root / "train" / "manifest.jsonl").is_file():
                if fmt == "synth":
                    from rahf.data.synth import generate

                    generate(root, train=args.n, dev=0, test=0, size=cfg.vision.img_size, seed=0, workers=1)
                else:
                    write_richhf_like(root, args.n)
            print(f"fixture {fmt}: {args.n} records in {time.perf_counter() - t0:.1f} s", flush=True)
            ds = RAHFTorchDataset(open_dataset(root, "train"), cfg.vision.img_size, cfg.heatmap_size,
                                  cfg.vision.mean, cfg.vision.std)
            row = {"format": fmt, "image": f"{ds.split[0].image.size[0]} px", "tokenizer": tok_name,
                   **one_worker_rate(ds, collate, args.batch_size, args.n)}
            for w in workers:
                row[f"loader_w{w}_per_s"] = loader_rate(ds, collate, args.batch_size, w, 2 * args.n)
            rows.append(row)
            print(f"  {fmt}: one worker {row['worker_per_s']:.0f} samples/s", flush=True)

        a = argparse.Namespace(compile=False, channels_last=True, grad_ckpt=False, optim="foreach", dtype="fp32",
                               batch_size=args.batch_size, prompt_len=16, target_len=20)
        r = Runner(args.preset, cfg, a, torch.device("cpu"))
        r.step()
        times = [r.step() for _ in range(args.step_steps)]
        step_rate = args.batch_size / min(times)
        print(f"training step ({args.preset}, batch {args.batch_size}, {torch.get_num_threads()} threads): "
              f"{step_rate:.1f} samples/s", flush=True)
        for row in rows:
            row["step_per_s"] = step_rate
            row["default_workers"] = default_workers
            row["ratio_default"] = row[f"loader_w{default_workers}_per_s"] / step_rate if \
                f"loader_w{default_workers}_per_s" in row else None
        if args.overlap:
            for row in rows:
                root = base / row["format"]
                ds = RAHFTorchDataset(open_dataset(root, "train"), cfg.vision.img_size, cfg.heatmap_size,
                                      cfg.vision.mean, cfg.vision.std)
                it = iter(loader(ds, collate, args.batch_size, default_workers))
                b = next(it)
                t0, done = time.perf_counter(), 0
                for _ in range(args.step_steps):
                    try:
                        b = next(it)
                    except StopIteration:
                        it = iter(loader(ds, collate, args.batch_size, default_workers))
                        b = next(it)
                    r.batch = {**r.batch, **{k: b[k] for k in ("pixel_values", "scores", "implausibility_map",
                                                               "misalignment_map")}}
                    r.inputs = {**r.inputs, "pixel_values": b["pixel_values"]}
                    r.step()
                    done += args.batch_size
                row["fed_step_per_s"] = done / (time.perf_counter() - t0)
    finally:
        if tmp is not None:
            tmp.cleanup()

    print()
    cols = [("format", "format", ""), ("image", "image", ""), ("getitem_per_s", "getitem/s", ".0f"),
            ("collate_ms_per_batch", "collate ms/batch", ".1f"), ("worker_per_s", "1 worker/s", ".0f")]
    cols += [(f"loader_w{w}_per_s", f"loader w={w}/s", ".0f") for w in workers]
    cols += [("step_per_s", "step samples/s", ".1f"), ("ratio_default", f"ratio (w={default_workers})", ".1f")]
    if args.overlap:
        cols.append(("fed_step_per_s", "step fed by loader/s", ".1f"))
    print_table(rows, cols)
    write_json(args.json, {"benchmark": "data", "args": vars(args), "machine": machine_info(torch.device("cpu")),
                           "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
