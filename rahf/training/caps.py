"""Caps: limits that end a run before ``train.max_steps`` and still evaluate and export it.

A capped run is not a finished one, and says so: :class:`EarlyStop` is recorded in ``result.json``,
the export's ``training.json`` and ``metrics.json`` (``"stopped_early"``), and the run's last line is a
warning (``stopped by the time limit at step N of M``) instead of ``done``. Pauses
(``train.stop_after_steps``, SIGTERM) are not caps: they checkpoint and exit for a resume. Too many bad
records (``data.max_bad_fraction``) is not a cap either: it stops the run with an error.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional


@dataclass(frozen=True)
class EarlyStop:
    reason: str  # e.g. "time limit"
    step: int  # the last optimizer step run
    max_steps: int  # train.max_steps
    setting: str  # the limit, as a config override, e.g. "train.time_limit_minutes=8"

    @property
    def message(self) -> str:
        return f"stopped by the {self.reason} at step {self.step} of {self.max_steps}"

    def to_dict(self) -> dict:
        return {**asdict(self), "message": self.message}


class TimeLimit:
    """``train.time_limit_minutes`` (0: none), counted from the start of the loop."""

    def __init__(self, minutes: float):
        self.minutes = minutes
        self.start = time.time()

    def elapsed(self) -> float:
        return time.time() - self.start

    def exceeded(self) -> bool:
        return bool(self.minutes) and self.elapsed() > 60 * self.minutes

    def jump(self) -> None:
        """The ``clock_jump`` fault: count the limit as used up (nothing without a limit)."""
        self.start -= 60 * self.minutes + 1 if self.minutes else 0

    def stop(self, step: int, max_steps: int) -> EarlyStop:
        return EarlyStop("time limit", step, max_steps, f"train.time_limit_minutes={self.minutes:g}")


def stopped_early_field(stop: Optional[EarlyStop]) -> Optional[dict]:
    """The ``"stopped_early"`` value of the run's JSON files: the stop's fields, or null."""
    return stop.to_dict() if stop is not None else None
