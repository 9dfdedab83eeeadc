"""Shared helpers for the benchmarks: threads, memory, measured GEMM peak, FLOP counting, tables."""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import nullcontext
from typing import Callable, Optional

import torch


def setup_threads(n: int) -> int:
    """Pin torch's intra-op threads (0: all cores). Returns the count in use."""
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- memory (CPU: /proc)
def _proc_status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size (VmRSS)."""
    kb = _proc_status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """High-water mark of the resident set size (VmHWM; reset by :func:`reset_peak_rss`)."""
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs). False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a block: CUDA ``max_memory_allocated`` or CPU VmHWM, absolute and as a delta over
    the memory in use when the block started."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            reset_peak_rss()
            self.start = rss_bytes()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = peak_rss_bytes()
        return False

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.start)


# ----------------------------------------------------------------------------- GEMM peak
def gemm_peak(device: torch.device, dtype: torch.dtype, n: int = 0, seconds: float = 1.0) -> dict:
    """Measured matmul throughput (FLOP/s) of an n×n×n product: the best of repeated timings."""
    if n <= 0:
        n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=c)  # warm-up
    sync(device)
    best, t_end, reps = float("inf"), time.perf_counter() + seconds, 0
    while reps < 3 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync(device)
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "flops_per_s": 2 * n ** 3 / best, "repeats": reps}


# ----------------------------------------------------------------------------- FLOP counting
def count_flops(fn: Callable[[], None], root: str, groups: dict[str, tuple[str, ...]]) -> tuple[int, dict[str, int]]:
    """Run ``fn`` under FlopCounterMode; returns (total FLOPs, FLOPs per group). A group sums the modules
    whose dotted names (relative to the root module ``root``) start with one of its prefixes."""
    from torch.utils.flop_counter import FlopCounterMode

    fc = FlopCounterMode(display=False)
    with fc:
        fn()
    counts = fc.get_flop_counts()
    total = int(fc.get_total_flops())
    rel = {name[len(root) + 1:]: int(sum(ops.values())) for name, ops in counts.items()
           if name.startswith(root + ".")}
    per: dict[str, int] = {}
    for g, prefixes in groups.items():
        hit = {n for n in rel if any(n == p or n.startswith(p + ".") for p in prefixes)}
        # modules are counted inclusively at every depth: keep only the outermost matches
        top = [n for n in hit if not any(n.startswith(a + ".") for a in hit if a != n)]
        per[g] = sum(rel[n] for n in top)
    per["other (loss, glue)"] = total - sum(per.values())
    return total, per


# ----------------------------------------------------------------------------- output
def machine_info(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "device": str(device), "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def print_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> None:
    """cols: (key, header, format spec)."""
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f) if f else str(r[k])) for k, _, f in cols])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) if j and i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: Optional[str], data: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        print(f"wrote {path}")


def autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
