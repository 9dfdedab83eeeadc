"""Pretrained encoders: a T5 and a timm ViT checkpoint, loaded in full or not at all.

``model.text.pretrained`` names a T5 checkpoint: a local directory (``config.json`` + ``model.safetensors``,
as ``save_pretrained`` writes it) or a Hub name such as ``google/flan-t5-base`` (resolved through the
Hugging Face cache; offline, from the cache alone). ``model.vision.pretrained`` names a timm ViT: a local
``.safetensors`` file, a directory holding ``model.safetensors`` (and, as timm writes it, a ``config.json``
with the ``pretrained_cfg``), a timm name such as ``vit_base_patch16_224.augreg2_in21k_ft_in1k`` or
``hf-hub:org/name``. Only safetensors are read; nothing is unpickled.

What comes from the checkpoints (:func:`resolve_pretrained`; the checkpoint wins over the rahf config,
and each value it changes is logged):

* the T5 architecture, from the checkpoint's own ``config.json``: the fields in :data:`TEXT_FIELDS`
  (``tie_word_embeddings``: true for T5 v1.0, whose ``lm_head`` is the shared embedding and whose decoder
  output is scaled by ``d_model ** -0.5``; false for T5 v1.1 / Flan-T5, with an ``lm_head`` of their own);
* the image mean/std, from the ViT's ``pretrained_cfg`` (the ``config.json`` beside the weights, else
  timm's registry entry for the name or ``model.vision.arch``).

The config the model is built from records these values, so a rahf checkpoint saved from it reloads
without the pretrained files.

What fails, with :class:`PretrainedMismatchError` (a :class:`~rahf.configtools.ConfigError`):

* a tensor of the model that the checkpoint lacks, a tensor of the checkpoint that the model lacks, or
  one of another shape, all named (the ViT's classifier head is dropped on purpose; rahf's own heads
  and projection are not part of either checkpoint);
* a ViT whose image or patch size is not the config's (``model.vision.allow_resize=true`` resamples the
  position embedding and the patch projection with timm instead);
* a T5 vocabulary smaller than the tokenizer's;
* a model built with another T5 architecture than the checkpoint's (:meth:`RAHF.load_pretrained_encoders`
  on a model not built by :meth:`RAHF.from_pretrained_encoders`).

:func:`check_random_init`: a training run of a non-``tiny`` preset needs both encoders pretrained unless
``model.allow_random_init=true``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..configtools import ConfigError
from .config import RAHFConfig

log = logging.getLogger("rahf.model")

# The T5 settings taken from a checkpoint's config.json (model.text.<field>).
TEXT_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
               "feed_forward_proj", "relative_attention_num_buckets", "relative_attention_max_distance",
               "layer_norm_epsilon", "dropout_rate", "tie_word_embeddings")
_LISTED = 20  # keys named per kind in an error message


class PretrainedMismatchError(ConfigError):
    """Pretrained weights that do not fit the model: missing, unexpected or differently shaped tensors, an
    image/patch size the config does not have, or a T5 architecture other than the model's."""


# ----------------------------------------------------------------------------- random init
def check_random_init(config: RAHFConfig) -> None:
    """Refuse to train a non-``tiny`` preset from random encoders (see the module docstring)."""
    if config.preset == "tiny" or config.allow_random_init:
        return
    missing = [key for key, spec in (("model.text.pretrained", config.text.pretrained),
                                     ("model.vision.pretrained", config.vision.pretrained)) if not spec]
    if missing:
        raise ConfigError(
            f"model.preset={config.preset!r} would train with random {' and '.join(k.split('.')[1] for k in missing)} "
            f"weights: set {' and '.join(missing)} (e.g. model.text.pretrained=/models/t5-base "
            f"model.vision.pretrained={config.vision.arch}.augreg2_in21k_ft_in1k, or a local .safetensors file), "
            f"or model.allow_random_init=true to train from scratch on purpose")


# ----------------------------------------------------------------------------- messages
def _names(keys, what: str) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_LISTED]) + (f" … and {len(keys) - _LISTED} more" if len(keys) > _LISTED else "")
    return f"{len(keys)} {what}: {shown}"


def mismatch_message(source: str, missing=(), unexpected=(), mismatched=()) -> Optional[str]:
    """One message naming every kind of mismatch (``mismatched``: ``(key, checkpoint shape, model shape)``),
    or None when there is none."""
    parts = []
    if missing:
        parts.append(_names(missing, "model tensors missing from the checkpoint"))
    if unexpected:
        parts.append(_names(unexpected, "checkpoint tensors the model does not have"))
    if mismatched:
        parts.append(_names([f"{k} (checkpoint {tuple(a)}, model {tuple(b)})" for k, a, b in mismatched],
                            "tensors of another shape"))
    return f"{source} does not fit the model: " + "; ".join(parts) if parts else None


def _is_path(spec: str) -> bool:
    """Whether ``spec`` is written as a path (absolute, ``./``, ``~``), not as a Hub or timm name."""
    return spec.startswith((".", "~", os.sep))


def _offline_hint() -> str:
    from .hub import is_offline

    return (" (HF_HUB_OFFLINE is set: only the Hugging Face cache is read; download it once online, or give a "
            "local path)" if is_offline() else "")


# ----------------------------------------------------------------------------- T5
def t5_config(spec: str):
    """The ``transformers.T5Config`` of the T5 checkpoint ``spec`` (a directory or a Hub name)."""
    from transformers import T5Config

    where = f"model.text.pretrained={spec!r}"
    if _is_path(spec) and not Path(spec).expanduser().is_dir():
        raise ConfigError(f"{where}: no such directory")
    spec = str(Path(spec).expanduser()) if Path(spec).expanduser().is_dir() else spec
    try:
        raw, _ = T5Config.get_config_dict(spec)
    except OSError as e:
        raise ConfigError(f"{where}: no T5 config.json found{_offline_hint()}: {e}") from None
    if raw.get("model_type") not in ("t5", "mt5"):
        raise ConfigError(f"{where}: config.json is of model_type {raw.get('model_type')!r}, not a T5")
    return T5Config.from_dict(raw)


def text_settings(t5cfg) -> dict:
    """The :data:`TEXT_FIELDS` of a ``T5Config`` as ``model.text`` settings."""
    out = {k: getattr(t5cfg, k) for k in TEXT_FIELDS if k != "tie_word_embeddings"}
    # transformers >= 5 keeps the v1.0/v1.1 distinction in scale_decoder_outputs (its tie_word_embeddings
    # is always true); earlier versions in tie_word_embeddings
    out["tie_word_embeddings"] = bool(getattr(t5cfg, "scale_decoder_outputs", t5cfg.tie_word_embeddings))
    return out


def model_text_settings(model) -> dict:
    """The :data:`TEXT_FIELDS` of a built RAHF model (the vocabulary: its embedding's size)."""
    t = model.config.text
    return {**{k: getattr(t, k) for k in TEXT_FIELDS}, "vocab_size": model.t5.config.vocab_size}


def t5_state_dict(t5, spec: str) -> dict:
    """The tensors of the T5 checkpoint ``spec``, checked to fill every tensor of ``t5`` (a
    ``T5ForConditionalGeneration`` of the checkpoint's architecture) and nothing else, for
    ``t5.load_state_dict(..., strict=True)``; else :class:`PretrainedMismatchError` naming what does not fit."""
    import torch
    from transformers import T5ForConditionalGeneration

    spec = str(Path(spec).expanduser()) if Path(spec).expanduser().is_dir() else spec
    source = f"pretrained T5 {spec!r}"
    try:
        src, info = T5ForConditionalGeneration.from_pretrained(spec, output_loading_info=True, use_safetensors=True,
                                                               ignore_mismatched_sizes=True)
    except OSError as e:
        raise ConfigError(f"{source}: no safetensors weights found{_offline_hint()}: {e}") from None
    msg = mismatch_message(source, info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"])
    if msg or info.get("error_msgs"):
        raise PretrainedMismatchError(msg or f"{source}: {'; '.join(info['error_msgs'])}")
    sd = src.state_dict()
    if t5.lm_head.weight is t5.shared.weight and not torch.equal(sd["lm_head.weight"], sd["shared.weight"]):
        raise PretrainedMismatchError(f"{source}: its lm_head.weight is not its shared embedding, but its config "
                                      f"says tie_word_embeddings (T5 v1.0 style)")
    mine = t5.state_dict()
    check_same_tensors(source, mine, sd)
    return sd


def check_same_tensors(source: str, mine: dict, theirs: dict) -> None:
    """Raise :class:`PretrainedMismatchError` naming every key missing from ``theirs``, every extra key
    and every shape that differs between the two state dicts."""
    msg = mismatch_message(source, mine.keys() - theirs.keys(), theirs.keys() - mine.keys(),
                           [(k, theirs[k].shape, mine[k].shape) for k in theirs.keys() & mine.keys()
                            if theirs[k].shape != mine[k].shape])
    if msg:
        raise PretrainedMismatchError(msg)


# ----------------------------------------------------------------------------- ViT
@dataclass
class VisionSource:
    """Where a ViT's weights are and what its ``pretrained_cfg`` says (timm's keys: mean, std, input_size,
    classifier, ...)."""

    spec: str
    file: Path
    pretrained_cfg: dict = field(default_factory=dict)
    architecture: Optional[str] = None

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(float(x) for x in self.pretrained_cfg["mean"])

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(float(x) for x in self.pretrained_cfg["std"])


def _timm_config_file(path: Path) -> Optional[tuple[dict, Optional[str]]]:
    """``(pretrained_cfg, architecture)`` from a timm ``config.json``; None when there is no such file or it
    is not timm's."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if "architecture" not in data:  # not timm's (e.g. a transformers config)
        return None
    return dict(data.get("pretrained_cfg", data)), data["architecture"]


def _registry_cfg(name: str) -> Optional[dict]:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return None if cfg is None else cfg.to_dict()


def _hub_file(repo: str, filename: str, spec: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo, filename))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise ConfigError(f"model.vision.pretrained={spec!r}: {filename} of the Hub repo {repo} is not available"
                          f"{_offline_hint()}: {type(e).__name__}") from None


def vision_source(spec: str, arch: str) -> VisionSource:
    """Resolve ``model.vision.pretrained`` (see the module docstring); ``arch``: ``model.vision.arch``, whose
    timm registry entry gives the ``pretrained_cfg`` of a weights file that has no ``config.json`` beside it."""
    where = f"model.vision.pretrained={spec!r}"
    path = Path(spec).expanduser()
    found = None
    if path.is_dir():
        file, found = path / "model.safetensors", _timm_config_file(path / "config.json")
        if not file.is_file():
            raise ConfigError(f"{where}: the directory has no model.safetensors (only safetensors are read)")
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise ConfigError(f"{where}: not a .safetensors file (only safetensors are read)")
        file, found = path, _timm_config_file(path.parent / "config.json")
    elif spec.startswith("hf-hub:"):
        repo = spec[len("hf-hub:"):]
        found = _timm_config_file(_hub_file(repo, "config.json", spec))
        file = _hub_file(repo, "model.safetensors", spec)
    elif _is_path(spec) or "/" in spec:
        raise ConfigError(f"{where}: no such file or directory (a Hub repo is written hf-hub:org/name)")
    else:
        cfg = _registry_cfg(spec)
        if cfg is None:
            raise ConfigError(f"{where}: not a file, and timm knows no pretrained weights of that name")
        if not cfg.get("hf_hub_id"):
            raise ConfigError(f"{where}: timm's weights of that name are not on the Hugging Face Hub; download "
                              f"them as a .safetensors file and give its path")
        name = cfg.get("hf_hub_filename") or "model.safetensors"
        file = _hub_file(cfg["hf_hub_id"], name if name.endswith(".safetensors") else "model.safetensors", spec)
        found = cfg, spec.split(".")[0]
    if found is None:  # a bare weights file: the pretrained_cfg timm registers for model.vision.arch
        cfg = _registry_cfg(arch)
        if cfg is None:
            raise ConfigError(f"{where}: no config.json beside the weights and timm registers no pretrained_cfg "
                              f"for model.vision.arch={arch!r}, so the image mean/std are unknown; put timm's "
                              f"config.json (with pretrained_cfg mean/std) next to the file")
        found = cfg, None
    cfg, architecture = found
    for key in ("mean", "std"):
        if len(cfg.get(key) or ()) != 3:
            raise ConfigError(f"{where}: its pretrained_cfg has no 3-channel {key} ({cfg.get(key)!r})")
    return VisionSource(spec, file, cfg, architecture)


def _geometry(pos_tokens: int, patch: int, prefix: int) -> tuple[int, int]:
    """(image size, patch size) of a square patch grid with ``pos_tokens`` position embeddings."""
    grid = math.isqrt(max(pos_tokens - prefix, 0))
    return grid * patch, patch


def vit_state_dict(vit, source: VisionSource, allow_resize: bool = False) -> dict:
    """The tensors of ``source``, checked to fill every tensor of the timm ViT ``vit`` (built with
    ``num_classes=0``; the checkpoint's classifier is dropped) and nothing else, for
    ``vit.load_state_dict(..., strict=True)``; else :class:`PretrainedMismatchError` naming what does not
    fit. A checkpoint of another image or patch size is resampled with timm only when ``allow_resize``."""
    from safetensors.torch import load_file

    what = f"pretrained ViT {source.spec!r}" + (f" ({source.architecture})" if source.architecture else "")
    sd = load_file(str(source.file))
    mine = vit.state_dict()
    classifier = source.pretrained_cfg.get("classifier") or "head"
    for head in [classifier] if isinstance(classifier, str) else list(classifier):  # dropped on purpose
        for k in [k for k in sd if (k == head or k.startswith(head + ".")) and k not in mine]:
            del sd[k]
    pos, proj = "pos_embed", "patch_embed.proj.weight"
    if pos in sd and pos in mine and proj in sd and proj in mine and (
            sd[pos].shape[1] != mine[pos].shape[1] or sd[proj].shape[-2:] != mine[proj].shape[-2:]):
        grid = vit.patch_embed.grid_size
        prefix = mine[pos].shape[1] - grid[0] * grid[1]  # prefix tokens that have a position embedding
        ckpt_img, ckpt_patch = _geometry(sd[pos].shape[1], sd[proj].shape[-1], prefix)
        model_img, model_patch = vit.patch_embed.img_size[0], vit.patch_embed.patch_size[0]
        if not allow_resize:
            raise PretrainedMismatchError(
                f"{what} is for img_size={ckpt_img}, patch_size={ckpt_patch}; the model has model.vision.img_size="
                f"{model_img}, model.vision.patch_size={model_patch}: set those, or model.vision.allow_resize=true "
                f"to resample the position embedding and patch projection (timm)")
        from timm.layers import resample_abs_pos_embed, resample_patch_embed

        if sd[proj].shape[-2:] != mine[proj].shape[-2:]:
            sd[proj] = resample_patch_embed(sd[proj], list(vit.patch_embed.patch_size), interpolation="bicubic",
                                            antialias=True, verbose=False)
        if sd[pos].shape[1] != mine[pos].shape[1]:
            sd[pos] = resample_abs_pos_embed(sd[pos], list(grid), num_prefix_tokens=prefix, interpolation="bicubic",
                                             antialias=True, verbose=False)
        log.warning("%s resized from img_size=%d, patch_size=%d to %d, %d", what, ckpt_img, ckpt_patch, model_img,
                    model_patch)
    check_same_tensors(what, mine, sd)
    return sd


# ----------------------------------------------------------------------------- the config
def resolve_pretrained(config: RAHFConfig) -> tuple[RAHFConfig, list[str]]:
    """``config`` with the T5 architecture of ``model.text.pretrained`` and the mean/std of
    ``model.vision.pretrained`` (see the module docstring), and one line per value that changed."""
    text, vision = {}, {}
    if config.text.pretrained:
        text = text_settings(t5_config(config.text.pretrained))
    if config.vision.pretrained:
        src = vision_source(config.vision.pretrained, config.vision.arch)
        vision = {"mean": src.mean, "std": src.std}
    changes = []
    for section, new in (("text", text), ("vision", vision)):
        old = getattr(config, section)
        changes += [f"model.{section}.{k}: {getattr(old, k)!r} -> {v!r} (from model.{section}.pretrained)"
                    for k, v in new.items() if getattr(old, k) != v]
    if not changes:
        return config, []
    return config.replace(**{s: new for s, new in (("text", text), ("vision", vision)) if new}), changes
