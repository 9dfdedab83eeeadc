"""CPU threads of the training job, robust on a machine shared with other work.

Torch runs its CPU kernels on an OpenMP team; a thread that finishes its share of a parallel region
spins, waiting for the others. When another process runs, one thread of the team shares its core
with it and lags, and each of the thousands of parallel regions of a step waits for it. Measured
with ``benchmarks/train_step.py --preset tiny --batch-size 32 --busy-loops 1`` on 2 cores, beside
one single-threaded busy loop: 2 threads kept 0.30 of their idle samples/s; 1 thread kept 0.95 of
its own, but that is only 0.66 of 2 idle threads. ``OMP_WAIT_POLICY=PASSIVE`` (sleep instead of
spinning) kept 0.58 of the default's idle samples/s under load, but cost 8–11 % when idle (a wake-up
per region); ``GOMP_SPINCOUNT=10000`` cost 5 % idle and kept only 0.41.

So with ``train.threads=0`` the trainer adapts (:class:`AdaptiveThreads`): it runs on the cores
divided among the processes and now and then times the steps' computation at half that count (at
least 1), keeping the faster: 0.55 of the idle samples/s beside the busy loop over 24-step runs (the
first 3 steps before the switch included), and about 1 % of probing cost over the default job's
1,200 idle steps. A fixed ``train.threads``, ``train.deterministic=true`` or several processes
disable it: the thread count changes how floating-point sums are split, so an adaptive run is
reproducible only as far as the machine's load is.
"""

from __future__ import annotations

import os
import statistics
from typing import Optional


class AdaptiveThreads:
    """Keeps torch's intra-op thread count at ``full`` or ``reduced`` (default ``full // 2``, at
    least 1), whichever computes a step faster now.

    Call :meth:`observe` with each optimizer step's computation time (forward, backward, update; not
    data loading or evaluation). After ``window`` steps at the current count it *probes* the other
    one for ``1 + window`` steps (the first is not counted: a new thread team starts), and keeps it
    when its median is at least ``margin`` faster. A probe happens once at the start, as soon as
    the current count's median step time exceeds ``slowdown`` × its median when chosen (other work
    started), and after ``period`` steps; the period doubles after each probe that changes nothing,
    up to ``max_period`` (so a machine whose load has gone is noticed within that many steps).
    :meth:`apply` sets torch's count; :meth:`observe` returns a message when the count changes.
    """

    def __init__(self, full: int, reduced: Optional[int] = None, *, window: int = 3, period: int = 25,
                 max_period: int = 200, slowdown: float = 1.5, margin: float = 0.1):
        self.full = full
        self.reduced = reduced if reduced is not None else max(1, full // 2)
        self.window, self.slowdown, self.margin = window, slowdown, margin
        self.min_period, self.max_period, self.period = period, max_period, period
        self.current = full
        self.recent: list[float] = []  # step times at the current count since the last decision
        self.reference: Optional[float] = None  # median step time at the current count when it was chosen
        self.probing: Optional[int] = None
        self.probe_times: list[float] = []
        self.steps = 0  # at the current count since the last decision
        self.switches = 0

    @property
    def active(self) -> bool:
        return self.reduced != self.full

    @property
    def threads(self) -> int:
        """The count the next step runs with."""
        return self.probing if self.probing is not None else self.current

    def apply(self) -> None:
        import torch

        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def observe(self, seconds: float) -> Optional[str]:
        if not self.active:
            return None
        if self.probing is not None:
            self.probe_times.append(seconds)
            return self._decide() if len(self.probe_times) > self.window else None
        self.recent = (self.recent + [seconds])[-self.window:]
        self.steps += 1
        if len(self.recent) < self.window:
            return None
        now = statistics.median(self.recent)
        if self.reference is None or self.steps >= self.period or now > self.slowdown * self.reference:
            self.probing = self.reduced if self.current == self.full else self.full
            self.probe_times = []
            self.apply()
        return None

    def _decide(self) -> Optional[str]:
        other, probed = self.probing, statistics.median(self.probe_times[1:])
        mine = statistics.median(self.recent)
        self.probing, self.probe_times, self.steps = None, [], 0
        message = None
        if probed < (1 - self.margin) * mine:
            message = (f"threads: {self.current} → {other} (a step's computation took {mine:.3f} s with "
                       f"{self.current}, {probed:.3f} s with {other}; the CPU is shared with other work)"
                       if other < self.current else
                       f"threads: {self.current} → {other} ({mine:.3f} s → {probed:.3f} s per step's computation)")
            self.current, self.reference, self.recent = other, probed, []
            self.switches += 1
            self.period = self.min_period
        else:
            self.reference = mine
            self.period = min(2 * self.period, self.max_period)
        self.apply()
        return message

    def summary(self) -> dict:
        return {"threads": self.current, "adaptive": self.active, "switches": self.switches}


def cpu_threads(threads: int, num_processes: int) -> int:
    """``train.threads``, or (0) the cores divided among the processes."""
    return threads or max(1, (os.cpu_count() or 1) // num_processes)


def thread_controller(threads: int, deterministic: bool, accelerator) -> Optional[AdaptiveThreads]:
    """Set torch's CPU threads for the run; returns the controller that adapts them, else None.

    It adapts only with ``train.threads=0``, without ``train.deterministic``, in a single process (the
    processes of a run must compute bit-identical updates, e.g. the same gradient-norm sum) that has
    at least 2 threads."""
    import torch

    if accelerator.device.type != "cpu":
        return None
    n = cpu_threads(threads, accelerator.num_processes)
    torch.set_num_threads(n)
    if threads or deterministic or accelerator.num_processes > 1 or n < 2:
        return None
    return AdaptiveThreads(n)
