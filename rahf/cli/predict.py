"""``rahf predict``, ``rahf select`` and ``rahf mask``: use a trained checkpoint on new images.

Manifest (for ``--manifest``): either JSONL, one object per line ``{"image": PATH, "prompt": TEXT}``,
or CSV with a header row holding the columns ``image`` and ``prompt`` (read as CSV when the file name
ends in ``.csv``). Relative image paths are resolved against the manifest's directory. Blank lines
and JSONL lines starting with ``#`` are skipped. Other fields are kept and copied to the outputs.

``--checkpoint`` is a checkpoint directory or a Hugging Face Hub repo id (``org/name[@revision]``).
Overlays and pages need matplotlib (``pip install "rahf[report]"``); ``rahf select`` does not.

* ``rahf predict --checkpoint DIR (--image PATH --prompt TEXT | --manifest FILE) --out OUT`` writes
  ``OUT/predictions.jsonl`` (one line per image), ``OUT/overlays/*.png`` and ``OUT/index.html``.
* ``rahf select --checkpoint DIR --manifest FILE --by overall [--threshold T] --out FILE`` groups
  the candidates by prompt and keeps each prompt's best image when it clears the threshold (
  data selection); ``FILE`` is JSON (``.json``) or JSONL (one line per prompt group).
* ``rahf mask --checkpoint DIR --manifest FILE --threshold T --dilate PX --out OUT`` writes an
  inpainting mask per image (0/255 PNG at the image's size) from the implausibility heatmap.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from .._extras import require
from ..reward.masks import heatmap_to_mask
from ..reward.select import select_best
from ..schema import SCORE_NAMES
from .common import add_decode, add_model_args, decode_mode, scorer_from_args


# ------------------------------------------------------------------------------------------ input
def read_manifest(path) -> list[dict]:
    """Read a predict/select/mask manifest (JSONL or CSV; see module docstring). Each returned dict
    has ``image`` (a path, resolved against the manifest's directory), ``prompt`` and any extra fields."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found")
    base = path.parent
    rows: list[dict] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"image", "prompt"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: CSV needs columns image,prompt (missing {sorted(missing)})")
            for lineno, row in enumerate(reader, 2):
                rows.append(dict(row, _where=f"{path}:{lineno}"))
    else:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                s = line.strip()
                if not s or s.startswith("#"):
                    continue
                try:
                    row = json.loads(s)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object")
                rows.append(dict(row, _where=f"{path}:{lineno}"))
    out = []
    for row in rows:
        where = row.pop("_where")
        if not isinstance(row.get("image"), str) or not row["image"]:
            raise ValueError(f"{where}: missing 'image'")
        if not isinstance(row.get("prompt"), str):
            raise ValueError(f"{where}: missing 'prompt'")
        p = Path(row["image"]).expanduser()
        row["image"] = str(p if p.is_absolute() else base / p)
        out.append(row)
    return out


def _inputs(args) -> list[dict]:
    if getattr(args, "manifest", None):
        return read_manifest(args.manifest)
    if getattr(args, "image", None):
        if args.prompt is None:
            raise SystemExit("--image needs --prompt")
        return [{"image": str(Path(i)), "prompt": args.prompt} for i in args.image]
    raise SystemExit("give --manifest FILE or --image PATH --prompt TEXT")


def _chunks(items: Sequence, n: int) -> Iterable[Sequence]:
    for s in range(0, len(items), max(1, n)):
        yield items[s:s + max(1, n)]


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=total <= 8, file=sys.stderr)


def _safe_name(i: int, path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem)[:60] or "image"
    return f"{i:05d}_{stem}.png"


def _score_rows(scorer, rows: Sequence[dict], batch_size: int, decode, desc: str):
    """Yield (row, PIL image, ScoreResult) for each row, scoring one batch at a time."""
    from ..data.format import load_image

    bar = _progress(len(rows), desc)
    try:
        for chunk in _chunks(rows, batch_size):
            images = [load_image(r["image"]) for r in chunk]
            results = scorer.score(images, [r["prompt"] for r in chunk], batch_size=batch_size, decode=decode)
            for r, im, res in zip(chunk, images, results):
                yield r, im, res
            bar.update(len(chunk))
    finally:
        bar.close()


# ------------------------------------------------------------------------------------------ predict
def run_predict(args) -> int:
    require("matplotlib", extra="report", purpose="rahf predict's overlays")
    from ..schema import MAP_NAMES
    from ..eval.report import heatmap_stats, render_overlay, write_predictions_html

    rows = _inputs(args)
    out = Path(args.out)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    scorer = scorer_from_args(args)
    decode = decode_mode(args.decode)
    page_rows = []
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for i, (row, im, res) in enumerate(_score_rows(scorer, rows, args.batch_size, decode, "predict")):
            name = "overlays/" + _safe_name(i, row["image"])
            render_overlay(im, res.heatmaps, res.prompt, res.tagged_prompt, res.scores).save(out / name)
            rec = {k: v for k, v in row.items() if k not in ("image", "prompt")}
            rec.update({"image": row["image"], "prompt": res.prompt, "scores": res.scores,
                        "tagged_prompt": res.tagged_prompt, "misaligned_words": res.misaligned_words,
                        "overlay": name, "width": res.size[0], "height": res.size[1],
                        "heatmaps": {m: heatmap_stats(res.heatmaps[m]) for m in MAP_NAMES}})
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            page_rows.append(rec)
    write_predictions_html(out, page_rows, title=f"RAHF predictions ({Path(args.checkpoint).name})")
    print(f"wrote {len(page_rows)} prediction(s) to {out / 'predictions.jsonl'} and {out / 'index.html'}")
    return 0


# ------------------------------------------------------------------------------------------ select
def run_select(args) -> int:
    rows = read_manifest(args.manifest)
    scorer = scorer_from_args(args)
    cands = []
    for row, _, res in _score_rows(scorer, rows, args.batch_size, None, "select"):
        cands.append({**{k: v for k, v in row.items() if k not in ("image", "prompt")},
                      "image": row["image"], "prompt": res.prompt, "scores": res.scores})
    sel = select_best(cands, by=args.by, threshold=args.threshold, min_candidates=args.min_candidates)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".jsonl":
        with open(out, "w", encoding="utf-8") as f:
            for g in sel["groups"]:
                f.write(json.dumps({"by": sel["by"], "threshold": sel["threshold"], **g,
                                    "kept_image": g["candidates"][g["best"]]["image"] if g["kept"] else None},
                                   ensure_ascii=False) + "\n")
    else:
        out.write_text(json.dumps(sel, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"kept {len(sel['kept'])} of {len(sel['groups'])} prompt(s) ({len(cands)} candidates) by {args.by}"
          + (f" >= {args.threshold}" if args.threshold is not None else "") + f"; wrote {out}")
    return 0


# ------------------------------------------------------------------------------------------ mask
def run_mask(args) -> int:
    require("matplotlib", extra="report", purpose="rahf mask's overlays")
    from PIL import Image

    from ..eval.report import blend

    rows = read_manifest(args.manifest) if args.manifest else _inputs(args)
    out = Path(args.out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    scorer = scorer_from_args(args)
    n = 0
    with open(out / "masks.jsonl", "w", encoding="utf-8") as f:
        for i, (row, im, res) in enumerate(_score_rows(scorer, rows, args.batch_size, None, "mask")):
            mask = heatmap_to_mask(res.implausibility, args.threshold, args.dilate)
            name = _safe_name(i, row["image"])
            Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(out / "masks" / name)
            side = Image.new("RGB", (im.width * 2, im.height), "white")
            side.paste(blend(im, res.implausibility), (0, 0))
            side.paste(blend(im, mask.astype(np.float32), "Reds", alpha=(0.0, 0.6)), (im.width, 0))
            side.save(out / "overlays" / name)
            f.write(json.dumps({"image": row["image"], "prompt": res.prompt, "mask": f"masks/{name}",
                                "overlay": f"overlays/{name}", "masked_fraction": round(float(mask.mean()), 6),
                                "width": im.width, "height": im.height,
                                "plausibility": res.scores["plausibility"]}, ensure_ascii=False) + "\n")
            n += 1
    print(f"wrote {n} mask(s) to {out / 'masks'} (threshold {args.threshold}, dilate {args.dilate} px)")
    return 0


# ------------------------------------------------------------------------------------------ parser
def _common(p: argparse.ArgumentParser, manifest_required: bool) -> None:
    add_model_args(p)
    p.add_argument("--manifest", required=manifest_required,
                   help='JSONL ({"image": path, "prompt": text} per line) or CSV with columns image,prompt; '
                        "relative paths are resolved against the manifest's directory")


def register(sub) -> None:
    p = sub.add_parser("predict", help="score images: predictions.jsonl, overlay PNGs and index.html")
    _common(p, manifest_required=False)
    p.add_argument("--image", action="append", help="an image file (repeatable); needs --prompt")
    p.add_argument("--prompt", help="the prompt for --image")
    p.add_argument("--out", required=True, help="output directory")
    add_decode(p)
    p.set_defaults(func=run_predict)

    s = sub.add_parser("select", help="best-of-N data selection: keep each prompt's best image by a score")
    _common(s, manifest_required=True)
    s.add_argument("--by", default="overall", choices=list(SCORE_NAMES))
    s.add_argument("--threshold", type=float, default=None, help="keep the best only if its score is >= this")
    s.add_argument("--min-candidates", type=int, default=1,
                   help="only select among prompts with at least this many candidate images (default 1)")
    s.add_argument("--out", required=True, help="output file: .json (one object) or .jsonl (one line per prompt)")
    s.set_defaults(func=run_select)

    m = sub.add_parser("mask", help="inpainting masks from the implausibility heatmap")
    _common(m, manifest_required=False)
    m.add_argument("--image", action="append", help="an image file (repeatable); needs --prompt")
    m.add_argument("--prompt", help="the prompt for --image")
    m.add_argument("--threshold", type=float, default=0.5, help="mask pixels whose heatmap value is > this")
    m.add_argument("--dilate", type=int, default=0, help="dilate the mask by a disk of this radius (pixels)")
    m.add_argument("--out", required=True, help="output directory (masks/, overlays/, masks.jsonl)")
    m.set_defaults(func=run_mask)
