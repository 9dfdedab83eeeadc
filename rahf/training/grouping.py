"""Batches that keep the prompts of one image together.

A split written with several prompts per image (``data.synth.prompts_per_image > 1``: a record and
its one-word-swap variants, uids ``<uid>~<k>``, see :mod:`rahf.data.synth_variants`) is shuffled by
*image*: :class:`GroupedEpochSampler` permutes the groups and emits each group's records one after
the other, so a batch holds the same image under prompts that fit it differently and the loss can
only go down by reading the prompt.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..data.synth_variants import group_key


def group_indices(uids: Sequence[str]) -> list[list[int]]:
    """Record indices grouped by image (:func:`rahf.data.synth_variants.group_key`), in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, u in enumerate(uids):
        groups.setdefault(group_key(u), []).append(i)
    return list(groups.values())


class GroupedEpochSampler(torch.utils.data.Sampler):
    """A permutation of the groups (records in a group stay adjacent, in their order) that depends only
    on (seed, epoch), as :class:`rahf.training.trainer.EpochSampler`."""

    def __init__(self, groups: list[list[int]], seed: int, shuffle: bool = True):
        self.groups, self.seed, self.shuffle, self.epoch = groups, seed, shuffle, 0
        self.n = sum(len(g) for g in groups)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = range(len(self.groups))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(len(self.groups), generator=g).tolist()
        return iter([i for k in order for i in self.groups[k]])
