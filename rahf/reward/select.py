"""Best-of-N selection: keep, for each prompt, the candidate image with the highest predicted score."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from ..schema import SCORE_NAMES


def select_best(candidates: Sequence[Mapping], by: str = "overall", threshold: Optional[float] = None,
                min_candidates: int = 1) -> dict:
    """Best-of-N data selection. ``candidates``: dicts with ``image``, ``prompt`` and
    ``scores`` (a dict holding ``by``). Candidates are grouped by prompt (first-seen order); in each
    group with at least ``min_candidates`` candidates the one with the highest ``scores[by]`` (the
    first on ties) is kept if ``threshold`` is None or its score is >= ``threshold``.

    Returns ``{"by", "threshold", "kept": [best candidate of each kept group], "groups": [{"prompt",
    "candidates", "best" (index in the group or None), "kept" (bool), "reason"}]}``.
    """
    if by not in SCORE_NAMES:
        raise ValueError(f"by must be one of {SCORE_NAMES}, got {by!r}")
    groups: dict[str, list[Mapping]] = {}
    for c in candidates:
        groups.setdefault(c["prompt"], []).append(c)
    kept, out_groups = [], []
    for prompt, cands in groups.items():
        g = {"prompt": prompt, "candidates": [dict(c) for c in cands], "best": None, "kept": False}
        if len(cands) < min_candidates:
            g["reason"] = f"fewer than {min_candidates} candidates"
        else:
            vals = [float(c["scores"][by]) for c in cands]
            best = int(np.argmax(vals))
            g["best"] = best
            if threshold is None or vals[best] >= threshold:
                g["kept"], g["reason"] = True, "best clears the threshold" if threshold is not None else "best"
                kept.append(dict(cands[best]))
            else:
                g["reason"] = f"best {by} {vals[best]:.4f} < threshold {threshold}"
        out_groups.append(g)
    return {"by": by, "threshold": threshold, "kept": kept, "groups": out_groups}
