"""Fault injection for tests: ``RAHF_FAULT=POINT@STEP[@RANK][,POINT@STEP[@RANK]...]``.

At a *kill point* the process sends itself SIGKILL (a crash or preemption at the worst moment); at a
*flag point* :func:`fault` returns True once and the caller injects the fault (a NaN loss, a NaN
gradient, a stall). Each fault fires at most once per process. Unset, :func:`fault` costs one
environment lookup. ``@RANK`` limits a fault to the process of that rank (``$RANK``, set by
``accelerate launch``; 0 when unset); without it every process fires. Not for production use.
"""

from __future__ import annotations

import os
import signal
from typing import Optional

FAULT_ENV = "RAHF_FAULT"
KILL_POINTS = {
    "mid_step": "after step N's backward pass, before its optimizer update",
    "mid_eval": "during the evaluation at step N, after its first batch",
    "checkpoint_write": "while step N's checkpoint is half written (weights and optimizer, no manifest)",
    "checkpoint_publish": "right after step N's checkpoint is renamed into place, before older ones are pruned",
}
FLAG_POINTS = {
    "nan_loss": "step N's loss becomes NaN",
    "nan_grad": "a gradient of step N becomes NaN (before the gradient-norm check)",
    "bad_batch": "every record of a batch of step N fails to load (as if its files were corrupt)",
    "stall": "after step N the loop waits (up to 120 s) for SIGTERM/SIGINT",
    "clock_jump": "at step N's decision the time limit counts as used up (the wall clock jumps past it)",
}
_fired: set = set()


def parse_faults(spec: Optional[str]) -> list[tuple]:
    """``"checkpoint_write@4,nan_loss@3@1"`` → ``[("checkpoint_write", 4), ("nan_loss", 3, 1)]``; a bad
    item raises ValueError."""
    out = []
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, at = item.partition("@")
        if name not in KILL_POINTS and name not in FLAG_POINTS:
            raise ValueError(f"{FAULT_ENV}: unknown fault point {name!r}; "
                             f"choose from {sorted(KILL_POINTS) + sorted(FLAG_POINTS)}")
        parts = [p.strip() for p in at.split("@")]
        if not 1 <= len(parts) <= 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"{FAULT_ENV}: {item!r} must look like POINT@STEP or POINT@STEP@RANK, e.g. mid_step@3")
        out.append((name, *map(int, parts)))
    return out


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def fault(point: str, step: int) -> bool:
    """If ``$RAHF_FAULT`` names ``point@step`` (or ``point@step@rank`` with this process's rank), a kill
    point sends this process SIGKILL and a flag point returns True (once per process). Otherwise (and
    always when unset) returns False."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return False
    rank = _rank()
    named = any(f[:2] == (point, step) and (len(f) == 2 or f[2] == rank) for f in parse_faults(spec))
    if named and (point, step) not in _fired:
        _fired.add((point, step))
        if point in KILL_POINTS:
            print(f"{FAULT_ENV}: killing process {os.getpid()} at {point}@{step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return True
    return False
