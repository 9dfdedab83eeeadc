"""Visual outputs: heatmap overlays, the ``rahf predict`` page and the ``rahf eval --report`` page.

Every page is a single self-contained ``index.html`` (inline CSS, no scripts, no network): the
predict page references overlay PNGs written next to it (relative paths inside OUT); the eval
report embeds its images as base64 ``data:`` URIs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import Counter
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .._extras import require
from ..schema import MAP_NAMES, SCORE_NAMES
from ..schema import parse_tagged

MAP_CMAPS = {"implausibility": "jet", "misalignment": "jet", "mask": "Reds"}
HIGHLIGHT = (220, 30, 30)

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:16px;background:#fafafa;color:#222}
h1{font-size:20px;margin:4px 0 12px} h2{font-size:17px;margin:22px 0 8px}
.grid{display:flex;flex-wrap:wrap;gap:14px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;max-width:100%}
.card img{display:block;max-width:100%;height:auto;image-rendering:auto}
.prompt{margin:6px 0 2px;font-size:14px} .bad{color:#c00;font-weight:700;text-decoration:underline}
.scores{font-size:12px;color:#444} .path{font-size:11px;color:#888;word-break:break-all}
table{border-collapse:collapse;font-size:13px;background:#fff} td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th:first-child,td:first-child{text-align:left}
"""


# ------------------------------------------------------------------------------------------ drawing
def font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def colorize(heatmap: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """(H, W) in [0, 1] → (H, W, 3) uint8 through a matplotlib colormap."""
    colormaps = require("matplotlib", extra="report", purpose="heatmap overlays").colormaps

    h = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    return (colormaps[cmap](h)[..., :3] * 255.0 + 0.5).astype(np.uint8)


def blend(image: Image.Image, heatmap: np.ndarray, cmap: str = "jet", alpha: tuple[float, float] = (0.25, 0.45)) -> Image.Image:
    """The image with the colourised heatmap laid over it (opacity alpha[0] + alpha[1]·value),
    at the image's size (the heatmap is resized bilinearly when its size differs)."""
    image = image.convert("RGB")
    h = np.asarray(heatmap, dtype=np.float32)
    if h.shape != (image.height, image.width):
        h = np.asarray(Image.fromarray(h, mode="F").resize(image.size, Image.BILINEAR), dtype=np.float32)
    h = np.clip(np.nan_to_num(h), 0.0, 1.0)
    a = (alpha[0] + alpha[1] * h)[..., None]
    out = np.asarray(image, dtype=np.float32) * (1 - a) + colorize(h, cmap).astype(np.float32) * a
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def _fit(image: Image.Image, height: int, max_width: int) -> Image.Image:
    w, h = image.size
    nw = max(1, round(w * height / max(1, h)))
    nh = height
    if nw > max_width:
        nh, nw = max(1, round(height * max_width / nw)), max_width
    return image.resize((nw, nh), Image.BILINEAR)


def _text_width(draw: ImageDraw.ImageDraw, text: str, f) -> float:
    return draw.textlength(text, font=f)


def _draw_words(draw, xy, words: Sequence[tuple[str, bool]], f, width: int, line_h: int) -> int:
    """Draw words left to right, wrapping at ``width``; misaligned words in red and underlined.
    Returns the y below the last line."""
    x0, y = xy
    x = x0
    space = _text_width(draw, " ", f)
    for w, bad in words:
        tw = _text_width(draw, w, f)
        if x > x0 and x + tw > x0 + width:
            x, y = x0, y + line_h
        draw.text((x, y), w, fill=HIGHLIGHT if bad else (20, 20, 20), font=f)
        if bad:
            draw.line((x, y + line_h - 3, x + tw, y + line_h - 3), fill=HIGHLIGHT, width=2)
        x += tw + space
    return y + line_h


def _words_of(prompt: str, tagged: Optional[str]) -> list[tuple[str, bool]]:
    if tagged:
        w, f = parse_tagged(tagged)
        return list(zip(w, f))
    return [(w, False) for w in prompt.split()]


def render_overlay(image: Image.Image, heatmaps: Mapping[str, np.ndarray], prompt: str = "",
                   tagged_prompt: Optional[str] = None, scores: Optional[Mapping[str, float]] = None,
                   panel_height: int = 256, titles: Optional[Mapping[str, str]] = None) -> Image.Image:
    """Side by side: the original, then each heatmap over the picture; below them the prompt with
    misaligned words highlighted (red, underlined) and the scores."""
    image = image.convert("RGB")
    panels = [("image", _fit(image, panel_height, 2 * panel_height))]
    for name, hm in heatmaps.items():
        b = blend(image, hm, MAP_CMAPS.get(name, "jet"))
        label = (titles or {}).get(name) or f"{name} (max {float(np.max(hm)) if np.size(hm) else 0:.2f})"
        panels.append((label, _fit(b, panel_height, 2 * panel_height)))
    pad, title_h = 6, 20
    f, fs = font(14), font(13)
    W = sum(p.width for _, p in panels) + pad * (len(panels) + 1)
    ph = max(p.height for _, p in panels)
    canvas = Image.new("RGB", (W, pad + title_h + ph + 200), "white")
    draw = ImageDraw.Draw(canvas)
    x = pad
    for label, p in panels:
        draw.text((x, pad + 2), label, fill=(40, 40, 40), font=fs)
        canvas.paste(p, (x, pad + title_h))
        x += p.width + pad
    y = pad + title_h + ph + 6
    if prompt or tagged_prompt:
        y = _draw_words(draw, (pad, y), _words_of(prompt, tagged_prompt), f, W - 2 * pad, 19)
    if scores:
        line = "   ".join(f"{k} {float(v):.3f}" for k, v in scores.items())
        y = _draw_words(draw, (pad, y + 4), [(t, False) for t in line.split(" ") if t], fs, W - 2 * pad, 17)
    return canvas.crop((0, 0, W, y + pad))


def heatmap_stats(heatmap: np.ndarray) -> dict:
    """Summary numbers of one heatmap: max, mean, the fraction of pixels above 0.5 and the (x, y)
    of the maximum (pixels of the map, which is at the image's size)."""
    h = np.asarray(heatmap, dtype=np.float32)
    if h.size == 0:
        return {"max": 0.0, "mean": 0.0, "area_gt_0.5": 0.0, "argmax_xy": [0, 0]}
    iy, ix = np.unravel_index(int(np.argmax(h)), h.shape)
    return {"max": round(float(h.max()), 5), "mean": round(float(h.mean()), 5),
            "area_gt_0.5": round(float((h > 0.5).mean()), 5), "argmax_xy": [int(ix), int(iy)]}


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def tagged_html(prompt: str, tagged: Optional[str]) -> str:
    return " ".join(f'<span class="bad">{html.escape(w)}</span>' if bad else html.escape(w)
                    for w, bad in _words_of(prompt, tagged))


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def write_predictions_html(out_dir, rows: Sequence[Mapping], title: str = "RAHF predictions") -> Path:
    """``index.html`` for ``rahf predict``: one card per row (``overlay`` relative to ``out_dir``)."""
    cards = []
    for r in rows:
        sc = " · ".join(f"{k} {v:.3f}" for k, v in r["scores"].items())
        cards.append(
            f'<div class="card"><img src="{html.escape(r["overlay"])}" alt="overlay for {html.escape(str(r["image"]))}">'
            f'<div class="prompt">{tagged_html(r["prompt"], r.get("tagged_prompt"))}</div>'
            f'<div class="scores">{html.escape(sc)}</div><div class="path">{html.escape(str(r["image"]))}</div></div>')
    body = (f"<p>{len(rows)} image(s). Left: the image; then the implausibility and misalignment heatmaps over it. "
            f"Misaligned words are <span class=\"bad\">underlined in red</span>.</p>\n"
            f'<div class="grid">\n' + "\n".join(cards) + "\n</div>")
    path = Path(out_dir) / "index.html"
    path.write_text(_page(title, body), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ eval report
def _fmt(x, d=3) -> str:
    if x is None:
        return "—"
    x = float(x)
    return "nan" if math.isnan(x) else f"{x:.{d}f}"


def _scatter_png(pred: np.ndarray, true: np.ndarray, full: Mapping[str, float]) -> Image.Image:
    matplotlib = require("matplotlib", extra="report", purpose="the report's plots")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SCORE_NAMES), figsize=(4 * len(SCORE_NAMES), 4), dpi=80)
    for j, (ax, s) in enumerate(zip(np.atleast_1d(axes), SCORE_NAMES)):
        ax.scatter(true[:, j], pred[:, j], s=10, alpha=0.6, color="#1f77b4")
        ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--")
        ax.set_xlim(-0.02, 1.02), ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("true"), ax.set_ylabel("predicted")
        ax.set_title(f"{s} (n={len(pred)})\nPLCC {_fmt(full.get(f'score/plcc/{s}'))}  "
                     f"SRCC {_fmt(full.get(f'score/srcc/{s}'))}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _metrics_table(metrics: Mapping[str, float], unavailable: Mapping[str, str], decode: Optional[str]) -> str:
    def cell(key: str, d: int, scale: float = 1.0) -> str:
        if key in unavailable:
            return f'<span title="{html.escape(unavailable[key])}">n/a ({html.escape(unavailable[key])})</span>'
        v = metrics.get(key)
        return _fmt(None if v is None else scale * float(v), d)

    cols = [("mse_all", "MSE all", 5), ("mse_gt0", "MSE GT=0", 5), ("cc", "CC", 3), ("kld", "KLD", 3),
            ("sim", "SIM", 3), ("nss", "NSS", 3), ("auc_judd", "AUC-Judd", 3)]
    rows = ["<tr><th>heatmap</th>" + "".join(f"<th>{c[1]}</th>" for c in cols) + "</tr>"]
    for m in MAP_NAMES:
        rows.append(f"<tr><td>{m}</td>" + "".join(f"<td>{cell(f'heatmap/{k}/{m}', d)}</td>" for k, _, d in cols)
                    + "</tr>")
    t1 = "<table>" + "".join(rows) + "</table>"
    rows = ["<tr><th>score</th>" + "".join(f"<th>{s}</th>" for s in SCORE_NAMES) + "</tr>"]
    for k in ("plcc", "srcc"):
        rows.append(f"<tr><td>{k.upper()}</td>" + "".join(f"<td>{cell(f'score/{k}/{s}', 3)}</td>"
                                                         for s in SCORE_NAMES) + "</tr>")
    t2 = "<table>" + "".join(rows) + "</table>"
    from .metrics import keyword_prefixes

    kw = []
    for prefix in keyword_prefixes(metrics):
        mode = decode if prefix == "keyword" else prefix[len("keyword_"):]
        for suffix, label in (("", "pooled"), ("_per_prompt", "per-prompt avg")):
            name = f"{mode} decoding, {label}" if mode else label
            kw.append(f"<tr><td>{html.escape(name)}</td>"
                      + "".join(f"<td>{cell(f'{prefix}{suffix}/{m}', 1, 100.0)}</td>"
                                for m in ("precision", "recall", "f1")) + "</tr>")
    t3 = ("<table><tr><th>misaligned keywords (%)</th><th>precision</th><th>recall</th><th>F1</th></tr>"
          + "".join(kw) + "</table>") if kw else ""
    return f"<h2>Heatmaps</h2>{t1}<h2>Scores</h2>{t2}" + (f"<h2>Keywords</h2>{t3}" if t3 else "")


def _grid_row(ex, pred_maps: Mapping[str, np.ndarray], cc_value: float, pred_tagged: Optional[str],
              panel: int = 160) -> str:
    img = ex.image.convert("RGB")
    cells = [("image", _fit(img, panel, 2 * panel))]
    for m in MAP_NAMES:
        cells.append((f"{m}: predicted", _fit(blend(img, pred_maps[m]), panel, 2 * panel)))
        cells.append((f"{m}: ground truth", _fit(blend(img, getattr(ex, f"{m}_map")), panel, 2 * panel)))
    figs = "".join(f'<figure style="margin:0"><img src="{data_uri(p)}" alt="{html.escape(t)}">'
                   f'<figcaption class="scores">{html.escape(t)}</figcaption></figure>' for t, p in cells)
    return (f'<div class="card"><div class="grid" style="gap:6px">{figs}</div>'
            f'<div class="prompt">target: {tagged_html(ex.prompt, ex.tagged_prompt)}</div>'
            f'<div class="prompt">predicted: {tagged_html(ex.prompt, pred_tagged)}</div>'
            f'<div class="scores">uid {html.escape(ex.uid)} · implausibility CC {_fmt(cc_value)}</div></div>')


def _confusions(preds: Sequence[str], targets: Sequence[str]) -> tuple[Counter, Counter]:
    missed, false = Counter(), Counter()
    for p, t in zip(preds, targets):
        pw, pf = parse_tagged(p)
        tw, tf = parse_tagged(t)
        for i in range(max(len(pw), len(tw))):
            pbad = i < len(pw) and pf[i]
            tbad = i < len(tw) and tf[i]
            if tbad and not (pbad and pw[i] == tw[i]):
                missed[tw[i]] += 1
            if pbad and not (tbad and i < len(tw) and pw[i] == tw[i]):
                false[pw[i]] += 1
    return missed, false


def _counter_table(title: str, c: Counter, k: int = 15) -> str:
    rows = "".join(f"<tr><td>{html.escape(w)}</td><td>{n}</td></tr>" for w, n in c.most_common(k))
    return f'<div><table><tr><th>{html.escape(title)}</th><th>count</th></tr>{rows or "<tr><td>(none)</td><td>0</td></tr>"}</table></div>'


def write_eval_report(evaluation, ds, out_dir, n_show: int = 6, measured: Optional[Mapping] = None) -> Path:
    """Write ``out_dir/index.html`` (and ``out_dir/metrics.json``) for an evaluation just computed.

    ``evaluation``: a :class:`rahf.eval.evaluate.Evaluation` made with ``examples=True`` (and
    ``keep_maps >= n_show`` for the overlay grids); ``ds``: the dataset it ran over (a
    ``RAHFTorchDataset``, for the images and ground-truth maps). Nothing is run again: the page shows
    the metric tables (``n/a (reason)`` where unavailable), predicted-vs-true scatter plots per score,
    overlay grids (prediction beside ground truth) of the best and worst examples by the
    implausibility map's CC, and the keyword confusions (most often missed / falsely tagged words)
    of the evaluation's decoding.
    """
    from .evaluate import metrics_document

    ex = evaluation.examples
    if ex is None:
        raise ValueError("write_eval_report needs an evaluation run with examples=True")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics, unavailable = evaluation.metrics, evaluation.unavailable
    decode = evaluation.decode
    how = f"keyword predictions by {decode} decoding" if decode else "no keyword decoding"
    parts = [f"<p>{len(ex)} examples evaluated; {html.escape(how)}. Heatmap metrics at the stored "
             f"ground-truth size (predictions resized bilinearly).</p>"]
    parts.append(_metrics_table(metrics, unavailable, decode))
    parts.append(f'<h2>Predicted vs true scores</h2><img src="{data_uri(_scatter_png(ex.pred_scores, ex.true_scores, metrics))}" '
                 f'alt="score scatter plots" style="max-width:100%">')
    cc = ex.map_values.get("implausibility", {}).get("cc")
    pos = {i: j for j, i in enumerate(ex.index)}
    ranked = sorted(((float(cc[pos[i]]), i) for i in ex.maps), key=lambda t: (-t[0], t[1])) if cc is not None else []
    for title, pick in (("Best by implausibility CC", ranked[:n_show]),
                        ("Worst by implausibility CC", ranked[::-1][:n_show])):
        rows = [_grid_row(ds.split[i], ex.maps[i], c, ex.tagged[pos[i]]) for c, i in pick]
        note = "" if rows else "<p>(no example with a non-empty ground-truth implausibility map)</p>"
        parts.append(f"<h2>{title}</h2>{note}<div class=\"grid\">{''.join(rows)}</div>")
    if decode:
        missed, false = _confusions(ex.tagged, ex.target)
        parts.append('<h2>Keyword confusions</h2><div class="grid">' + _counter_table("most often missed", missed)
                     + _counter_table("most often falsely tagged", false) + "</div>")
    (out / "metrics.json").write_text(json.dumps(metrics_document(metrics, unavailable, measured), indent=2) + "\n")
    path = out / "index.html"
    path.write_text(_page("RAHF evaluation report", "\n".join(parts)), encoding="utf-8")
    return path
