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

from ..data.synth import SynthScenes, is_easy


def easy_indices(root: str, split: str, uids: Sequence[str]) -> list[bool]:
    """Per record of ``split`` (its ``uids``, variants ``<uid>~<k>`` included): whether it shows an easy
    scene. Needs a synth split generated with ``easy_fraction > 0`` (else a ValueError)."""
    try:
        scenes = SynthScenes(root, split)
    except ValueError:
        scenes = None
    if scenes is None or scenes.easy_fraction <= 0:
        raise ValueError(f"data.curriculum needs a synth train split with easy scenes: {root}/{split} has none "
                         f"(generate it with data.synth.easy_fraction > 0; a synth dataset generated for another job is not "
                         f"regenerated: delete it or point data.root elsewhere, and the job generates its own)")
    out = []
    for u in uids:
        i = scenes.index(u)
        if i is None:
            raise ValueError(f"record {u}: not a synth uid of split {split!r}")
        out.append(is_easy(scenes.seed, split, i, scenes.easy_fraction))
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
