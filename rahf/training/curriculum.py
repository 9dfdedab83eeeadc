"""A curriculum inside one training job: easy (one-object) scenes first, full scenes later.

A synth train split generated with ``data.synth.easy_fraction > 0`` holds one-object scenes ("a red
circle", drawn in another colour or shape half of the time; :func:`rahf.data.synth.is_easy`) beside
the full scenes. With ``data.curriculum`` set (the share of easy records per epoch, e.g. ``[1.0, 1.0,
0.5, 0.3]``, the last value kept for the later epochs), :class:`CurriculumEpochSampler` draws each
epoch's records with that share from the easy ones and the rest from the full ones. An epoch keeps
the split's length (so steps per epoch, resume positions and the schedule are unchanged) and its
order depends only on (seed, epoch), like :class:`rahf.training.loop_utils.EpochSampler`; records of
the smaller pool repeat within an epoch when the share asks for more than it holds.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..data.format import read_dataset_info
from ..data.synth import is_easy
from ..swaps import group_key


def easy_indices(root: str, split: str, uids: Sequence[str]) -> list[bool]:
    """Per record of ``split`` (its ``uids``, variants ``<uid>~<k>`` included): whether it shows an easy
    scene. Needs a synth split generated with ``easy_fraction > 0`` (else a ValueError)."""
    info = read_dataset_info(root)
    frac = float((info.get("easy_fraction") or {}).get(split, 0.0))
    if info.get("source") != "synth" or frac <= 0:
        raise ValueError(f"data.curriculum needs a synth train split with easy scenes: {root}/{split} has none "
                         f"(generate it with data.synth.easy_fraction > 0; a synth dataset generated for another job is not "
                         f"regenerated: delete it or point data.root elsewhere, and the job generates its own)")
    seed, prefix = int(info.get("seed", 0)), f"synth-{split}-"
    out = []
    for u in uids:
        base = group_key(u)
        if not base.startswith(prefix) or not base[len(prefix):].isdigit():
            raise ValueError(f"record {u}: not a synth uid of split {split!r}")
        out.append(is_easy(seed, split, int(base[len(prefix):]), frac))
    return out


class CurriculumEpochSampler(torch.utils.data.Sampler):
    """Epoch ``e``: ``round(share_e · n)`` records drawn from the easy pool and the rest from the full
    pool (each pool's records in a random order, cycled when the count exceeds it), shuffled together;
    ``n`` = the split's length; ``share_e`` = ``shares[min(e, len(shares) - 1)]``."""

    def __init__(self, easy: Sequence[bool], shares: Sequence[float], seed: int):
        if not shares or any(not 0.0 <= s <= 1.0 for s in shares):
            raise ValueError(f"data.curriculum: shares must be in [0, 1], got {list(shares)}")
        self.easy = [i for i, e in enumerate(easy) if e]
        self.full = [i for i, e in enumerate(easy) if not e]
        if (any(s > 0 for s in shares) and not self.easy) or (any(s < 1 for s in shares) and not self.full):
            raise ValueError("data.curriculum asks for a pool the split does not have "
                             f"({len(self.easy)} easy, {len(self.full)} full records)")
        self.shares, self.seed, self.epoch, self.n = list(shares), seed, 0, len(easy)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def share(self, epoch: int) -> float:
        return self.shares[min(epoch, len(self.shares) - 1)]

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        k = round(self.share(self.epoch) * self.n)

        def draw(pool: list[int], m: int) -> list[int]:
            out: list[int] = []
            while len(out) < m:
                out += [pool[i] for i in torch.randperm(len(pool), generator=g).tolist()]
            return out[:m]

        picked = draw(self.easy, k) + draw(self.full, self.n - k)
        return iter([picked[i] for i in torch.randperm(self.n, generator=g).tolist()])


__all__ = ["CurriculumEpochSampler", "easy_indices"]
