"""Torch loading: a Dataset that prepares images and maps, and a collator that tokenizes once per batch.

Token limits are never silent: :class:`RAHFCollator` cuts a prompt longer than ``max_prompt_tokens``
and a tagged prompt (the decoder target) longer than ``max_target_tokens``, and marks each cut in the
batch (``prompt_truncated`` / ``target_truncated``), where the training loop and the evaluation count
them; :meth:`RAHFCollator.truncation` counts them for a whole split ahead of time.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .format import BAD_RECORD_POLICIES, ENCODER_PROMPTS, MAP_NAMES, SCORE_NAMES, DataError, Example, encoder_prompt
from .tokens import length_summary, token_counts


def resize_map(m, size: Optional[int]) -> torch.Tensor:
    """(H, W) float map (array or tensor) → (size, size) tensor. Downscaling averages (area), upscaling
    is bilinear. ``size=None`` keeps the stored size (for evaluation, where metrics are computed at it)."""
    if isinstance(m, torch.Tensor):
        t = m.detach().float()[None, None]
    else:
        t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    if size is None:
        return t[0, 0]
    if t.shape[-2:] == (size, size):
        return t[0, 0]
    if t.shape[-1] >= size and t.shape[-2] >= size:
        out = F.interpolate(t, size=(size, size), mode="area")
    else:
        out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return out[0, 0].clamp_(0.0, 1.0)


def image_to_tensor(img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """PIL image → (3, size, size) float tensor, resized (bicubic) and normalised."""
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class RAHFTorchDataset(torch.utils.data.Dataset):
    """Wraps a split (``open_dataset``) for a model: image (3, S, S) normalised, maps (h, h) in [0, 1],
    scores (4,), and the prompt strings (tokenized later, once per batch, by :class:`RAHFCollator`).

    ``heatmap_size``: the model's heatmap size for training (maps resized to it by
    :func:`resize_map`), or None to keep each map at its stored size — what evaluation uses, since
    heatmap metrics are computed at the stored ground-truth size.

    ``on_bad_record`` (default: the split's own): ``"error"`` lets a record's :class:`DataError` (bad or
    missing file) propagate; ``"skip"`` returns a marker ``{"bad": True, "index", "uid", "problem"}``
    instead, which :class:`RAHFCollator` drops from the batch and lists in ``batch["bad_records"]``
    (so it survives DataLoader workers and reaches the training loop, which counts it).

    ``scene_grid`` (a patch grid side; synth splits only, for ``model.scene_head``): each item also
    carries ``scene_targets`` ((grid², C) per-patch class shares, :func:`rahf.data.synth.scene_targets`)
    and ``scene_known`` (False, with zero targets, for a record that is not a generated scene)."""

    def __init__(self, split, image_size: int, heatmap_size: Optional[int], mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                 on_bad_record: Optional[str] = None, scene_grid: Optional[int] = None):
        self.split = split
        self.scene_grid = scene_grid
        self.scenes = None
        if scene_grid is not None:
            from .synth import SynthScenes

            self.scenes = SynthScenes(split.root, split.split)
        self.image_size = image_size
        self.heatmap_size = heatmap_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.on_bad_record = on_bad_record or getattr(split, "on_bad_record", "error")
        if self.on_bad_record not in BAD_RECORD_POLICIES:
            raise ValueError(f"on_bad_record must be one of {BAD_RECORD_POLICIES}, got {self.on_bad_record!r}")

    def __len__(self) -> int:
        return len(self.split)

    def prepare(self, ex: Example, index: int = -1) -> dict:
        item = {
            "index": index,
            "uid": ex.uid,
            "prompt": ex.prompt,
            "prompt_raw": ex.prompt_raw,
            "tagged_prompt": ex.tagged_prompt,
            "pixel_values": image_to_tensor(ex.image, self.image_size, self.mean, self.std),
            "scores": torch.tensor([ex.scores[s] for s in SCORE_NAMES], dtype=torch.float32),
            **{f"{m}_map": resize_map(getattr(ex, f"{m}_map"), self.heatmap_size) for m in MAP_NAMES},
        }
        if self.scenes is not None:
            from .synth import SCENE_CLASSES

            t = self.scenes.targets(ex.uid, self.scene_grid)
            item["scene_known"] = t is not None
            item["scene_targets"] = (torch.from_numpy(t) if t is not None
                                     else torch.zeros(self.scene_grid ** 2, SCENE_CLASSES))
        return item

    def __getitem__(self, i: int) -> dict:
        try:
            return self.prepare(self.split[i], i)
        except DataError as e:
            if self.on_bad_record != "skip":
                raise
            uid = e.uid
            if uid is None:
                entries = getattr(self.split, "entries", None)
                uid = entries[i].get("uid") if entries is not None else None
            return {"bad": True, "index": i, "uid": uid, "problem": e.problem}


class RAHFCollator:
    """Stacks tensors and tokenizes prompts (encoder input) and tagged prompts (decoder labels, padded
    with -100) once per batch. For the augmented-prompt variant it adds the tokenized task prefixes
    ``task_ids``/``task_mask`` (T, Lp), computed once at construction.

    ``encoder_prompt``: what the encoder reads (:data:`rahf.data.format.ENCODER_PROMPTS`): ``"clean"``
    the prompt's words, ``"original"`` the caption as written where the record keeps it
    (``prompt_raw``). The batch's ``prompts`` stay the clean words either way (constrained decoding
    and the labels are aligned to them).

    Texts over the token limits are cut (the end dropped, ``</s>`` kept) and marked: the batch's
    ``prompt_truncated`` / ``target_truncated`` are (B,) bool tensors.

    Heatmaps of one size are stacked to (B, H, W); maps kept at different stored sizes (evaluation
    on a dataset whose maps differ in size) stay a list of (H_i, W_i) tensors, in batch order."""

    def __init__(self, tokenizer, max_prompt_tokens: int = 64, max_target_tokens: int = 96,
                 task_prompts: Optional[dict] = None, tasks: Optional[Sequence[str]] = None,
                 encoder_prompt: str = "clean", word_tags: bool = False):
        if encoder_prompt not in ENCODER_PROMPTS:
            raise ValueError(f"encoder_prompt must be one of {ENCODER_PROMPTS}, got {encoder_prompt!r}")
        self.tokenizer = tokenizer
        self.word_tags = word_tags
        if word_tags and not getattr(tokenizer, "is_fast", False):
            raise ValueError("per-word tags (model.word_head) need a fast tokenizer (word ids): "
                             f"{type(tokenizer).__name__} has none; use tokenizer 'words' or a T5 sentencepiece one")
        if word_tags and encoder_prompt != "clean":
            raise ValueError("per-word tags (model.word_head) need the encoder to read the clean prompt "
                             "(model.text.encoder_prompt=clean): its words are the ones tagged")
        self.max_prompt_tokens = max_prompt_tokens
        self.max_target_tokens = max_target_tokens
        self.encoder_prompt = encoder_prompt
        self.task_ids = self.task_mask = None
        from ..schema import TAG

        tag_ids = tokenizer(TAG, add_special_tokens=False)["input_ids"]
        self.tag_token_id = tag_ids[0] if len(tag_ids) == 1 else -1  # -1: the tag is not one token
        if task_prompts is not None:
            texts = [task_prompts[t] for t in tasks]
            enc = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
            self.task_ids, self.task_mask = enc["input_ids"], enc["attention_mask"]

    @classmethod
    def for_model(cls, model) -> "RAHFCollator":
        cfg = model.config
        aug = cfg.variant == "augmented_prompt"
        from ..schema import TASKS

        return cls(model.tokenizer, cfg.text.max_prompt_tokens, cfg.text.max_target_tokens,
                   task_prompts=cfg.task_prompts if aug else None, tasks=TASKS if aug else None,
                   encoder_prompt=getattr(cfg.text, "encoder_prompt", "clean"),
                   word_tags=bool(getattr(cfg, "word_head", False)))

    def encoder_texts(self, prompts: Sequence[str], originals: Optional[Sequence[Optional[str]]] = None) -> list[str]:
        """What the encoder reads for clean ``prompts`` and their ``originals`` (captions as written;
        None entries or no list: the clean prompt)."""
        originals = list(originals) if originals is not None else [None] * len(prompts)
        return [encoder_prompt(p, o, self.encoder_prompt) for p, o in zip(prompts, originals)]

    def _encode(self, texts: list[str], limit: int) -> tuple[dict, torch.Tensor, list]:
        """Tokenized, padded and cut at ``limit``; (B,) bool: which texts were longer; and each text's
        token-to-word indices (fast tokenizers; else None). Texts are tokenized once; only a batch
        holding a text over the limit is tokenized again, with the tokenizer's own truncation."""
        full = self.tokenizer(texts)
        cut = torch.tensor([len(ids) > limit for ids in full["input_ids"]], dtype=torch.bool)
        if bool(cut.any()):
            full = self.tokenizer(texts, truncation=True, max_length=limit)
        word_ids = [full.word_ids(i) for i in range(len(texts))] if getattr(self.tokenizer, "is_fast", False) else None
        return self.tokenizer.pad(full, return_tensors="pt"), cut, word_ids

    def tokenize_prompts(self, prompts: list[str], originals: Optional[Sequence[Optional[str]]] = None,
                         word_ids: bool = False) -> dict:
        """The encoder's inputs for clean ``prompts`` (see :meth:`encoder_texts` for ``originals``);
        ``prompt_truncated``: (B,) bool, the prompts cut at ``max_prompt_tokens``; with ``word_ids`` also
        each prompt's token-to-word indices (``word_ids``, for :meth:`word_tag_targets`)."""
        enc, cut, ids = self._encode(self.encoder_texts(prompts, originals), self.max_prompt_tokens)
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "prompt_truncated": cut}
        if word_ids:
            out["word_ids"] = ids
        if self.task_ids is not None:
            out["task_ids"], out["task_mask"] = self.task_ids, self.task_mask
        return out

    def truncation(self, prompts: Sequence[str], tagged_prompts: Sequence[str],
                   originals: Optional[Sequence[Optional[str]]] = None) -> dict:
        """Token lengths of a split's encoder prompts and targets against this collator's limits:
        ``{"prompt": summary, "target": summary}`` (:func:`rahf.data.tokens.length_summary`, whose
        ``over_limit`` counts the texts the collator cuts)."""
        return {"prompt": length_summary(token_counts(self.tokenizer, self.encoder_texts(prompts, originals)),
                                         self.max_prompt_tokens),
                "target": length_summary(token_counts(self.tokenizer, tagged_prompts), self.max_target_tokens)}

    def split_truncation(self, split) -> dict:
        """:meth:`truncation` of every record of a split (:class:`rahf.data.format.RAHFDatasetSplit`),
        read from its manifest (no image is loaded)."""
        entries = split.entries
        return self.truncation([e["prompt"] for e in entries], [e["tagged_prompt"] for e in entries],
                               [e.get("prompt_raw") for e in entries])

    @staticmethod
    def word_tag_targets(word_ids: list, prompts: list[str], tagged: list[str], uids: Optional[list] = None) -> torch.Tensor:
        """(B, L): for each prompt token, 1 if its word is tagged in the tagged prompt, 0 if not, -1 for
        tokens of no word (padding, end of sequence)."""
        from ..schema import parse_tagged, split_words

        L = max((len(w) for w in word_ids), default=0)
        out = torch.full((len(word_ids), L), -1.0)
        for i, (ids, p, t) in enumerate(zip(word_ids, prompts, tagged)):
            words, flags = parse_tagged(t)
            if words != split_words(p):
                name = uids[i] if uids else f"#{i} of the batch"
                raise ValueError(f"record {name}: tagged prompt {t!r} does not tag the prompt {p!r} word for word")
            for j, w in enumerate(ids):
                if w is not None and w < len(flags):
                    out[i, j] = float(flags[w])
        return out

    def __call__(self, items: list[dict]) -> dict:
        """A batch of the good items. Skip markers (see :class:`RAHFTorchDataset`) are dropped and listed
        in ``batch["bad_records"]`` as ``{"index", "uid", "problem"}``; if every item is a marker, the
        batch is ``{"uids": [], "bad_records": [...], "empty": True}`` (no tensors)."""
        bad = [{"index": it["index"], "uid": it["uid"], "problem": it["problem"]} for it in items if it.get("bad")]
        if bad:
            items = [it for it in items if not it.get("bad")]
            if not items:
                return {"uids": [], "bad_records": bad, "empty": True}
        batch = {k: torch.stack([it[k] for it in items]) for k in ("pixel_values", "scores")}
        for k in (f"{m}_map" for m in MAP_NAMES):
            maps = [it[k] for it in items]
            batch[k] = torch.stack(maps) if len({tuple(t.shape) for t in maps}) == 1 else maps
        batch["bad_records"] = bad
        batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
        batch["uids"] = [it["uid"] for it in items]
        batch["prompts"] = [it["prompt"] for it in items]
        batch["tagged_prompts"] = [it["tagged_prompt"] for it in items]
        batch.update(self.tokenize_prompts(batch["prompts"], [it.get("prompt_raw") for it in items],
                                           word_ids=self.word_tags))
        tgt, batch["target_truncated"], _ = self._encode(batch["tagged_prompts"], self.max_target_tokens)
        labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, -100)
        batch["labels"] = labels
        batch["tag_token_id"] = self.tag_token_id
        if "scene_targets" in items[0]:
            batch["scene_targets"] = torch.stack([it["scene_targets"] for it in items])
            batch["scene_known"] = torch.tensor([bool(it["scene_known"]) for it in items])
        if self.word_tags:
            batch["word_tags"] = self.word_tag_targets(batch.pop("word_ids"), batch["prompts"], batch["tagged_prompts"],
                                                         batch["uids"])
        return batch
