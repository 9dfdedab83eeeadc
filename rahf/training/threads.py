"""CPU thread settings of the training job."""

from __future__ import annotations

import os

import torch


def set_threads(threads: int, accelerator) -> int:
    """Torch's intra-op threads on CPU: ``threads``, or (0) the cores divided among the processes."""
    if accelerator.device.type != "cpu":
        return torch.get_num_threads()
    n = threads or max(1, (os.cpu_count() or 1) // accelerator.num_processes)
    torch.set_num_threads(n)
    return n
