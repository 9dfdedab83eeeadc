"""Model cards: the ``README.md`` that documents a checkpoint in its directory and on the Hugging Face Hub.

:func:`write_model_card` (re)generates the card from what the checkpoint directory holds: ``config.json``
(the configuration summary), ``model.safetensors`` (parameter count, training step), ``metrics.json``
(evaluation tables) and, for a training run's ``export``/``best`` directory, the run's ``config.yaml`` one
level up (which dataset it was trained on). The card is YAML front matter (``library_name: rahf``, tags,
licence, datasets, metric names) followed by Markdown: how to load the model, the configuration, the
metrics, the training data, intended use and limitations, and the data's terms.

Generated cards carry :data:`MARKER`; a hand-written ``README.md`` (without it) is kept unless
``overwrite=True``.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence

from ..configtools import to_dict
from .config import HEAD_STYLES, PRESETS, RAHFConfig
from .hub import parse_repo_id, publishable_files

CARD_FILE = "README.md"
METRICS_FILE = "metrics.json"
MARKER = "<!-- rahf:model-card -->"
DEFAULT_LICENSE = "other"
TAGS = ("rahf", "rich-human-feedback", "text-to-image", "reward-model", "image-text-feedback", "safetensors")

# metrics.json key prefixes → metric ids in the Hub's metadata vocabulary
_HUB_METRICS = {"score/plcc/": "pearsonr", "score/srcc/": "spearmanr", "heatmap/mse": "mse",
                "keyword/precision": "precision", "keyword/recall": "recall", "keyword/f1": "f1"}
# display order of the metric groups (the first part of a key); others follow alphabetically
_GROUP_ORDER = ("summary", "score", "heatmap", "keyword", "keyword_per_prompt")
_GROUP_LAST = ("count", "loss")
_GROUP_TITLES = {
    "summary": "Summary",
    "score": "Scores (correlation with the annotated scores)",
    "heatmap": "Heatmaps",
    "keyword": "Misaligned keywords (pooled over all words)",
    "keyword_per_prompt": "Misaligned keywords (averaged per prompt)",
    "count": "Counts",
    "loss": "Losses",
}


# ---------------------------------------------------------------------------------------------- facts
def weights_info(path: str | Path) -> tuple[int, dict]:
    """(number of parameters, the file's metadata) of a safetensors file, read from its header only."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        return int(n), dict(f.metadata() or {})


def head_style(config: RAHFConfig) -> str:
    """The named head style (``HEAD_STYLES``) the config's heads equal, the preset's own, or ``custom``."""
    keys = ("heatmap_head", "score_head")
    mine = {k: to_dict(getattr(config, k)) for k in keys}
    for name, style in HEAD_STYLES.items():
        if {k: to_dict(style[k]) for k in keys} == mine:
            return name
    if config.preset in PRESETS:
        own = RAHFConfig.preset(config.preset)
        if {k: to_dict(getattr(own, k)) for k in keys} == mine:
            return f"the {config.preset} preset's own"
    return "custom"


def read_metrics(directory: str | Path) -> Optional[dict]:
    """``directory/metrics.json`` as a dict, or ``None`` when absent."""
    path = Path(directory) / METRICS_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of metric name → value")
    return data


def training_data(directory: str | Path) -> Optional[dict]:
    """What the model in ``directory`` was trained on, when ``directory`` is a training run's ``export`` or
    ``best`` directory: ``{"root", "source", "splits"}`` from the run's ``config.yaml`` and the dataset's
    ``dataset.json``. ``None`` when that cannot be told."""
    import yaml

    run_config = Path(directory).resolve().parent / "config.yaml"
    if not run_config.is_file():
        return None
    try:
        data = (yaml.safe_load(run_config.read_text()) or {}).get("data") or {}
    except (yaml.YAMLError, AttributeError):
        return None
    root = data.get("root") if isinstance(data, dict) else None
    if not root:
        return None
    info_path = Path(root) / "dataset.json"
    info = {}
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
        except ValueError:
            info = {}
    return {"root": str(root), "source": info.get("source"), "splits": info.get("splits") or {}}


# ---------------------------------------------------------------------------------------------- tables
def _fmt(key: str, value) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(v):
        return "—"
    if key.startswith("count/") and v.is_integer():
        return str(int(v))
    return f"{v:.4f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def metrics_tables(metrics: Mapping[str, object]) -> str:
    """Markdown tables of a flat ``metrics.json`` (keys ``group/metric[/target]``), one per group.

    A group whose keys all have three parts is a grid (rows: metric, columns: target, e.g. PLCC/SRCC ×
    the four scores); other groups are two-column lists.
    """
    unavailable = metrics.get("unavailable") if isinstance(metrics.get("unavailable"), Mapping) else {}
    groups: dict[str, list[tuple[list[str], str, object]]] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping) or "/" not in str(key):  # the "measured"/"unavailable" blocks
            continue
        if value is None and key in unavailable:
            value = f"n/a ({unavailable[key]})"
        parts = str(key).split("/")
        groups.setdefault(parts[0] if len(parts) > 1 else "other", []).append((parts[1:] or parts, str(key), value))
    order = ([g for g in _GROUP_ORDER if g in groups]
             + sorted(g for g in groups if g not in _GROUP_ORDER and g not in _GROUP_LAST)
             + [g for g in _GROUP_LAST if g in groups])
    out: list[str] = []
    for g in order:
        items = groups[g]
        out.append(f"**{_GROUP_TITLES.get(g, g)}**")
        out.append("")
        if all(len(p) == 2 for p, _, _ in items):
            rows, cols = list(dict.fromkeys(p[0] for p, _, _ in items)), list(dict.fromkeys(p[1] for p, _, _ in items))
            cell = {(p[0], p[1]): _fmt(k, v) for p, k, v in items}
            out += _table(["metric"] + cols, [[r] + [cell.get((r, c), "") for c in cols] for r in rows])
        else:
            out += _table(["metric", "value"], [["/".join(p), _fmt(k, v)] for p, k, v in items])
        out.append("")
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------- card
def _datasets_of(data: Optional[dict]) -> list[str]:
    source = (data or {}).get("source")
    if source == "synth":
        return ["rahf-synth"]
    if source == "richhf-18k":
        return ["RichHF-18K", "Pick-a-Pic"]
    return []


def _data_section(data: Optional[dict], datasets: Sequence[str]) -> list[str]:
    source = (data or {}).get("source")
    splits = (data or {}).get("splits") or {}
    split_text = ", ".join(f"{k} {v}" for k, v in sorted(splits.items())) if splits else ""
    lines: list[str] = []
    if source == "synth":
        lines.append("The procedural **synth** dataset generated by the `rahf` package itself (`rahf data synth`): "
                     "simple shapes and colours on plain backgrounds, with generated prompts, implausibility and "
                     "misalignment heatmaps, scores and tagged prompts. It holds no third-party images or "
                     "annotations.")
    elif source == "richhf-18k":
        lines.append("**RichHF-18K** rich human feedback annotations (heatmaps, scores, misaligned keywords) on "
                     "**Pick-a-Pic** images, converted to the package's format with `rahf data convert-richhf`.")
    elif datasets:
        lines.append("Datasets: " + ", ".join(f"`{d}`" for d in datasets) + ".")
    else:
        lines.append("Not recorded with the checkpoint (the card found no training run configuration next to it; "
                     "pass the dataset names when writing the card).")
    if split_text:
        lines.append("")
        lines.append(f"Records per split: {split_text}.")
    return lines


def build_model_card(directory: str | Path, *, metrics: Optional[Mapping[str, object]] = None,
                     repo_id: Optional[str] = None, license: Optional[str] = None,
                     datasets: Optional[Sequence[str]] = None, data: Optional[dict] = None):
    """The model card of the checkpoint in ``directory`` as a ``huggingface_hub.ModelCard``.

    ``metrics``: default ``directory/metrics.json`` (if any). ``repo_id``: the Hub repo it is published as
    (used in the loading examples). ``license``: a Hub licence id (default ``other``). ``datasets``: the
    front matter's dataset names (default: from the detected training data). ``data``: the training data
    as :func:`training_data` returns it (default: detected from the training run's directory).
    """
    from huggingface_hub import ModelCard, ModelCardData

    d = Path(directory)
    config = RAHFConfig.load(d / "config.json")
    n_params, meta = weights_info(d / "model.safetensors")
    if metrics is None:
        metrics = read_metrics(d)
    if data is None:
        data = training_data(d)
    datasets = list(datasets) if datasets else _datasets_of(data)
    hub_metrics = sorted({m for k in (metrics or {}) for p, m in _HUB_METRICS.items() if str(k).startswith(p)})
    base_models = [m for m in (config.vision.pretrained, config.text.pretrained)
                   if m and not Path(m).exists() and parse_repo_id(m)]
    tags = list(TAGS) + [f"rahf-{config.preset}", config.variant.replace("_", "-")]
    if (data or {}).get("source") == "synth":
        tags.append("synthetic-data")
    card_data = ModelCardData(library_name="rahf", license=license or DEFAULT_LICENSE, tags=tags,
                              datasets=datasets or None, metrics=hub_metrics or None,
                              base_model=base_models or None)
    name = repo_id or "ORG/NAME"
    v, t = config.vision, config.text
    grid = v.img_size // v.patch_size
    vision_desc = f"`{v.arch}`" + "".join(f", {k} {getattr(v, k)}" for k in ("embed_dim", "depth", "num_heads")
                                           if getattr(v, k) is not None)
    if v.stem != "patch":
        vision_desc += f", {v.stem} stem"
    summary = [
        ("preset", f"`{config.preset}`"),
        ("variant", f"`{config.variant}`"),
        ("head style", head_style(config)),
        ("parameters", f"{n_params:,} ({n_params / 1e6:.1f} M)"),
        ("image size", f"{v.img_size}×{v.img_size} px (patch {v.patch_size}, {grid}×{grid} grid)"),
        ("vision encoder", vision_desc + (f" (initialised from `{v.pretrained}`)" if v.pretrained else "")),
        ("text encoder / decoder", f"T5, d_model {t.d_model}, {t.num_layers} encoder + {t.num_decoder_layers} "
                                   f"decoder layers" + (f" (initialised from `{t.pretrained}`)" if t.pretrained else "")),
        ("tokenizer", f"`{t.tokenizer}` (saved with the weights)"),
        ("heatmap size", f"{config.heatmap_size}×{config.heatmap_size}"),
    ]
    extra = [name for name, on in (("word head (per-word tags)", config.word_head),
                                   ("scene head (per-patch shape / colour / size, a synth training aid)",
                                    config.scene_head),
                                   ("score heads also read the prompt tokens", config.score_text)) if on]
    if extra:
        summary.append(("extra heads", "; ".join(extra)))
    if "step" in meta:
        summary.append(("training steps", str(meta["step"])))
    files = sorted(set(publishable_files(d)) | {CARD_FILE})

    body = [MARKER, "", f"# {repo_id or 'RAHF model'}", "",
            "A Rich Automatic Human Feedback (RAHF) model for text-to-image generation, trained with the `rahf` "
            "package. Given an image and the prompt it was generated from, it predicts an **implausibility** "
            "heatmap (artifacts), a **misalignment** heatmap (regions that do not match the prompt), four scores "
            "in [0, 1] (**plausibility, alignment, aesthetics, overall**; higher is better) and the prompt with "
            "`_0` after each word the image does not show.", "",
            "## How to use", "",
            "With the `rahf` package installed:", "",
            "```python", "from rahf import RAHFScorer", "",
            f'scorer = RAHFScorer.from_pretrained("{name}")  # or a local copy: from_pretrained("path/to/dir")',
            'result = scorer.score("image.png", "a yellow cat on a red mat")[0]',
            'result.scores["overall"], result.implausibility.shape, result.misaligned_words', "```", "",
            "From the command line (every `--checkpoint` flag takes a directory or a repo id, `org/name@revision` "
            "for a branch, tag or commit):", "",
            "```bash", f'rahf predict --checkpoint {name} --image image.png --prompt "a yellow cat on a red mat" '
                       "--out predictions/", "```", "",
            "Offline: once downloaded, the model loads from the Hugging Face cache with `HF_HUB_OFFLINE=1` (or "
            "`local_files_only=True`). The weights are `model.safetensors`; nothing is unpickled.", "",
            "## Model", ""]
    body += _table(["", ""], [[k, val] for k, val in summary])
    body += ["", "## Evaluation", ""]
    if metrics:
        body += ["From `metrics.json` (written by `rahf train` for the test split with the best checkpoint, or "
                 "by `rahf eval --out`). Heatmap metrics: MSE (all images and images without annotated "
                 "regions), CC, KLD, SIM, NSS, AUC-Judd; scores: Pearson (PLCC) and Spearman (SRCC) "
                 "correlation; keywords: precision, recall and F1 of the misaligned words.", ""]
        measured = metrics.get("measured")
        if isinstance(measured, Mapping):
            body += ["Measured on split `{}` ({} examples), decoding `{}`, heatmap metrics at the {}.".format(
                measured.get("split"), measured.get("examples"), measured.get("decode"),
                measured.get("heatmap_metric_size", "stored ground-truth size")), ""]
        body.append(metrics_tables(metrics).rstrip())
    else:
        body.append("No `metrics.json` was saved with this checkpoint.")
    body += ["", "## Training data", ""] + _data_section(data, datasets)
    body += ["", "## Intended use and limitations", "",
             "- Intended for research on evaluating text-to-image models: scoring and ranking generated images "
             "(e.g. best-of-N selection), locating implausible or misaligned regions, flagging prompt words an "
             "image misses, and as a reward or filtering signal.",
             "- The scores and heatmaps are predictions of human annotators' judgements, with their biases and "
             "disagreements; they are not ground truth. Check them on your own images before relying on them.",
             "- A model knows only the kind of data it was trained on. A model trained on the synth dataset has "
             "seen simple generated shapes and a closed vocabulary: its outputs on real photographs or "
             "free-form prompts are not meaningful.",
             "- Heatmaps are predicted at "
             f"{config.heatmap_size}×{config.heatmap_size} and upsampled to the image size: they are coarse.",
             "- Not for decisions about people or as the sole judge of content moderation."]
    body += ["", "## Data terms", "",
             "- The synth dataset is generated by the `rahf` package; it contains no third-party content.",
             "- RichHF-18K (the annotations) and Pick-a-Pic (the images and prompts) are distributed under their "
             "own licences and terms of use. Anyone who trains on them, uses a model trained on them, or "
             "redistributes such a model must check those terms and comply with them.",
             f"- The licence of these weights is the publisher's (`license: {card_data.license}` above)."]
    body += ["", "## Files", "",
             "- " + ", ".join(f"`{f}`" for f in files),
             "- Regenerate this card with `rahf.model.card.write_model_card(directory)` (done by `rahf push`)."]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"
    return ModelCard(content)


def write_model_card(directory: str | Path, *, metrics: Optional[Mapping[str, object]] = None,
                     repo_id: Optional[str] = None, license: Optional[str] = None,
                     datasets: Optional[Sequence[str]] = None, data: Optional[dict] = None,
                     overwrite: bool = False) -> Optional[Path]:
    """(Re)write ``directory/README.md`` from the directory's files (see :func:`build_model_card`).

    A ``README.md`` not generated here (no :data:`MARKER`) is kept, with a warning, unless ``overwrite``;
    the return value is then ``None``, else the card's path.
    """
    path = Path(directory) / CARD_FILE
    if path.is_file() and not overwrite and MARKER not in path.read_text(encoding="utf-8", errors="replace"):
        warnings.warn(f"{path} is a hand-written model card; keeping it (pass overwrite=True to replace it)")
        return None
    card = build_model_card(directory, metrics=metrics, repo_id=repo_id, license=license, datasets=datasets,
                            data=data)
    path.write_text(str(card), encoding="utf-8")
    return path
