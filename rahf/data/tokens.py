"""Token lengths: what a text costs a model's tokenizer, and which texts a token limit cuts.

The model reads at most ``model.text.max_prompt_tokens`` tokens of a prompt and learns at most
``model.text.max_target_tokens`` tokens of a tagged prompt (the decoder target, ``_0`` tags
included); :class:`rahf.data.torch_data.RAHFCollator` cuts longer ones and says so. The dataset
validator and the RichHF converter report the length distribution with :func:`length_summary`, so a
limit can be chosen before training. Lengths count the special tokens the model sees (T5: the
trailing ``</s>``). No torch import.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np

__all__ = ["token_counts", "length_summary", "PERCENTILES", "format_summary", "truncation_lines"]

PERCENTILES: tuple[int, ...] = (50, 90, 99)
_CHUNK = 1024


def token_counts(tokenizer, texts: Iterable[str]) -> list[int]:
    """The number of tokens each text encodes to, special tokens included, untruncated."""
    texts = list(texts)
    out: list[int] = []
    for i in range(0, len(texts), _CHUNK):
        out += [len(ids) for ids in tokenizer(texts[i:i + _CHUNK])["input_ids"]]
    return out


def length_summary(counts: Sequence[int], limit: Optional[int] = None) -> dict:
    """``{"n", "p50", "p90", "p99", "max", "mean"}`` of token ``counts``, and with ``limit`` also
    ``"limit"`` and ``"over_limit"`` (how many are longer, i.e. would be cut). A percentile is an
    observed length: the smallest with at least that share of the texts at or below it."""
    out: dict = {"n": len(counts)}
    a = np.asarray(counts, dtype=np.int64)
    for p in PERCENTILES:
        out[f"p{p}"] = int(np.percentile(a, p, method="inverted_cdf")) if a.size else None
    out["max"] = int(a.max()) if a.size else None
    out["mean"] = round(float(a.mean()), 2) if a.size else None
    if limit is not None:
        out["limit"] = int(limit)
        out["over_limit"] = int((a > limit).sum())
    return out


def format_summary(name: str, s: dict) -> str:
    """One line: ``prompt tokens: p50 12, p90 25, p99 41, max 77 (n 15810); 3 over the limit of 64``."""
    if not s.get("n"):
        return f"{name} tokens: no texts"
    line = f"{name} tokens: " + ", ".join(f"p{p} {s[f'p{p}']}" for p in PERCENTILES) + f", max {s['max']} (n {s['n']})"
    if "limit" in s:
        line += f"; {s['over_limit']} over the limit of {s['limit']}" + (" (cut)" if s["over_limit"] else "")
    return line


def truncation_lines(split: str, info: dict) -> list[str]:
    """The lines a run prints about a split's token lengths (``info``:
    :meth:`rahf.data.torch_data.RAHFCollator.truncation`): one per text kind, then a warning per kind
    with texts over its limit, naming the setting to raise."""
    lines = [f"{split} split: " + format_summary(kind, info[kind]) for kind in ("prompt", "target")]
    for kind, setting in (("prompt", "max_prompt_tokens"), ("target", "max_target_tokens")):
        s = info[kind]
        if s.get("over_limit"):
            what = "prompts" if kind == "prompt" else "targets (tagged prompts)"
            lines.append(f"warning: {s['over_limit']} of {s['n']} {split} {what} are longer than "
                         f"model.text.{setting}={s['limit']} tokens (longest {s['max']}) and are cut")
    return lines
