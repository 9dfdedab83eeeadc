"""Pieces of the training loop: the resumable data order, the loaders, stop requests by signal, and
the per-step decision that every process takes together."""

from __future__ import annotations

import signal
from dataclasses import dataclass
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


# What a process can meet during an optimizer step that must change what every process does.
STEP_FLAGS = ("empty_batch", "nonfinite_loss", "nonfinite_grad", "signal", "time_limit")


@dataclass(frozen=True)
class StepDecision:
    """The flags of every process for one optimizer step: ``values[flag]`` holds each rank's value (0:
    not raised; ``signal``: the signal's number) and ``ranks[flag]`` the ranks that raised it."""

    values: dict

    @property
    def ranks(self) -> dict:
        return {name: [r for r, v in enumerate(vals) if v] for name, vals in self.values.items()}

    def who(self, flag: str) -> str:
        r = self.ranks[flag]
        return f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}"

    def action(self, on_nonfinite: str, fp16: bool) -> str:
        """What the step does, the same on every process:

        * ``"step"``: the optimizer update;
        * ``"error"`` / ``"skip"`` (``train.on_nonfinite``): a non-finite loss on any rank, or a
          non-finite gradient norm on any rank without fp16;
        * ``"scaler"``: fp16 and a non-finite gradient norm (an overflow): the gradient scaler skips
          the update and lowers its scale; not an error.
        """
        if self.ranks["nonfinite_loss"] or (self.ranks["nonfinite_grad"] and not fp16):
            return "error" if on_nonfinite == "error" else "skip"
        if self.ranks["nonfinite_grad"]:
            return "scaler"
        return "step"


def decide_together(local: dict, rank: int, world: int, device=None) -> StepDecision:
    """Every process's ``local`` flags (names of :data:`STEP_FLAGS`: a bool, or an int such as a signal's
    number; 0/False when not raised) in one
    all-reduce (MAX) of a small ``flags × processes`` integer tensor; one process: no collective.
    Every process must call it once per optimizer step, at the same point."""
    unknown = set(local) - set(STEP_FLAGS)
    if unknown:
        raise ValueError(f"unknown step flags {sorted(unknown)}; known: {STEP_FLAGS}")
    t = torch.zeros(len(STEP_FLAGS), world, dtype=torch.int32, device=device)
    for i, name in enumerate(STEP_FLAGS):
        t[i, rank] = int(local.get(name) or 0)
    if world > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    rows = t.cpu().tolist()
    return StepDecision({name: rows[i] for i, name in enumerate(STEP_FLAGS)})
