"""Pieces of the training loop: the resumable data order, the loaders, and stop requests by signal."""

from __future__ import annotations

import signal
from typing import Optional

import torch

from .config import TrainConfig


class EpochSampler(torch.utils.data.Sampler):
    """A permutation that depends only on (seed, epoch): resuming reproduces the data order."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def make_loader(ds, collate, batch_size: int, cfg: TrainConfig, sampler=None, shuffle=False):
    """A DataLoader with the run's worker settings (``data.num_workers``, ``data.pin_memory``).

    It has its own generator (seeded by ``train.seed``): starting an iteration draws the workers' base
    seed from it, not from the global torch RNG, so a resumed run (which starts an iteration that the
    uninterrupted run did not) draws the same dropout masks as the uninterrupted one."""
    workers = cfg.data.num_workers
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, sampler=sampler, shuffle=shuffle, collate_fn=collate, num_workers=workers,
        pin_memory=cfg.data.pin_memory and torch.cuda.is_available(), persistent_workers=workers > 0,
        drop_last=False, generator=torch.Generator().manual_seed(cfg.train.seed))


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits. A second
    Ctrl-C stops at once. Use as a context manager (installs the handlers, restores the old ones)."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._old = {}

    def install(self) -> "StopRequest":
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    @property
    def name(self) -> Optional[str]:
        return signal.Signals(self.signal).name if self.signal is not None else None

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()
