"""Full-state training checkpoints, written atomically and read without unpickling arbitrary objects.

A checkpoint directory ``checkpoints/step_000123/`` holds:

* ``model.safetensors``   the (unwrapped) model weights
* ``optimizer.pt``        the optimizer's state dict (tensors and numbers; loaded with ``weights_only=True``)
* ``rng_<rank>.pt``       torch (and CUDA) RNG states per process (``weights_only=True``)
* ``rng_<rank>.json``     Python and NumPy RNG states per process
* ``scheduler.json``      the LR scheduler's state
* ``trainer_state.json``  step, epoch, batch position in the epoch, best metric, samples seen
* ``config.json``         the resolved training config (resume refuses a different one unless forced)
* ``checkpoint.json``     the manifest, written last: a directory without it is incomplete

Writes go to ``.tmp-step_000123/`` first and are renamed into place, so a kill at any point leaves
either the previous checkpoints or a complete new one; ``--resume latest`` ignores anything else.

Testing hook: :func:`fault` (environment variable ``RAHF_FAULT``, see there) kills the process or
corrupts a value at a named point, so that tests can reproduce kills and numerical faults.
"""

from __future__ import annotations

import difflib
import json
import os
import pickle
import random
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_model, save_model

STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "checkpoint.json"


# ----------------------------------------------------------------------------- fault injection (tests only)
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
    "stall": "after step N the loop waits (up to 120 s) for SIGTERM/SIGINT",
}
_fired: set = set()


def parse_faults(spec: Optional[str]) -> list[tuple[str, int]]:
    """``"checkpoint_write@4,nan_loss@3"`` → ``[("checkpoint_write", 4), ("nan_loss", 3)]``; a bad item
    raises ValueError."""
    out = []
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, at = item.partition("@")
        if name not in KILL_POINTS and name not in FLAG_POINTS:
            raise ValueError(f"{FAULT_ENV}: unknown fault point {name!r}; "
                             f"choose from {sorted(KILL_POINTS) + sorted(FLAG_POINTS)}")
        if not at.strip().isdigit():
            raise ValueError(f"{FAULT_ENV}: {item!r} must look like POINT@STEP, e.g. mid_step@3")
        out.append((name, int(at)))
    return out


def fault(point: str, step: int) -> bool:
    """Testing hook. If ``$RAHF_FAULT`` names ``point@step`` (comma-separated list), a kill point sends
    this process SIGKILL; a flag point returns True (once per process). Unset: returns False at once."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return False
    if (point, step) in parse_faults(spec) and (point, step) not in _fired:
        _fired.add((point, step))
        if point in KILL_POINTS:
            print(f"{FAULT_ENV}: killing process {os.getpid()} at {point}@{step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return True
    return False


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_save_pretrained(model, directory: Path, metadata: Optional[dict] = None) -> None:
    """``model.save_pretrained`` into a temporary sibling, then swap it into place."""
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, metadata=metadata)
    old = directory.with_name(f".old-{directory.name}-{os.getpid()}")
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(directory.parent)


def config_diff(saved: dict, current: dict) -> list[str]:
    """Readable unified diff of two resolved configs (JSON, sorted keys)."""
    a = json.dumps(saved, indent=1, sort_keys=True).splitlines()
    b = json.dumps(current, indent=1, sort_keys=True).splitlines()
    return list(difflib.unified_diff(a, b, "checkpoint config", "this run's config", lineterm="", n=1))


# Keys that may change between a run and its resumption without changing what is trained.
RESUME_TOLERANT = {("data", "num_workers"), ("data", "pin_memory"), ("train", "log_every"), ("tracking",),
                   ("eval", "max_batches"), ("run", "name"), ("train", "threads"), ("checkpoint",),
                   ("train", "time_limit_minutes"), ("train", "stop_after_steps"), ("eval", "every"),
                   ("eval", "batch_size")}


def _strip_tolerant(cfg: dict) -> dict:
    cfg = json.loads(json.dumps(cfg))
    for path in RESUME_TOLERANT:
        node = cfg
        for k in path[:-1]:
            node = node.get(k, {})
        node.pop(path[-1], None)
    return cfg


def _load_tensors(path: Path):
    """``torch.load(weights_only=True)``: tensors, numbers, strings and containers only; anything else
    (a pickled class or function) is refused before it is constructed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} holds something other than tensors and plain data; refusing to load it "
                         f"(torch.load with weights_only=True): {first}") from e


class CheckpointManager:
    def __init__(self, directory: Path, keep_last: int = 2):
        self.dir = Path(directory)
        self.keep_last = keep_last

    # ---- discovery
    def complete(self) -> list[tuple[int, Path]]:
        """Complete checkpoints (manifest present and consistent), oldest first."""
        out = []
        if not self.dir.is_dir():
            return out
        for p in self.dir.iterdir():
            m = STEP_DIR.match(p.name)
            if not m or not (p / MANIFEST).is_file():
                continue
            try:
                manifest = json.loads((p / MANIFEST).read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if all((p / f).is_file() for f in manifest.get("files", [])):
                out.append((int(m.group(1)), p))
        return sorted(out)

    def latest_step(self) -> Optional[int]:
        c = self.complete()
        return c[-1][0] if c else None

    def find(self, spec: str) -> Optional[Path]:
        """'latest' → newest complete checkpoint here; otherwise a checkpoint directory path."""
        if spec == "latest":
            c = self.complete()
            return c[-1][1] if c else None
        p = Path(spec)
        if not (p / MANIFEST).is_file():
            raise FileNotFoundError(f"{p} is not a complete checkpoint (no {MANIFEST})")
        return p

    # ---- save
    def save(self, accelerator, state: dict, config: dict) -> Path:
        step = state["step"]
        final = self.dir / f"step_{step:06d}"
        tmp = self.dir / f".tmp-step_{step:06d}"
        rank = accelerator.process_index
        if accelerator.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        model = accelerator.unwrap_model(accelerator._models[0], keep_torch_compile=False) if accelerator._models else None
        optimizer = accelerator._optimizers[0] if accelerator._optimizers else None
        files = []
        if accelerator.is_main_process:
            save_model(model, str(tmp / "model.safetensors"))
            torch.save(optimizer.optimizer.state_dict() if hasattr(optimizer, "optimizer") else optimizer.state_dict(),
                       tmp / "optimizer.pt")
            sched = accelerator._custom_objects[0] if accelerator._custom_objects else None
            _write_json(tmp / "scheduler.json", sched.state_dict() if sched is not None else {})
            _write_json(tmp / "trainer_state.json", state)
            _write_json(tmp / "config.json", config)
            fault("checkpoint_write", step)
        # every process saves its own RNG states
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, tmp / f"rng_{rank}.pt")
        np_state = np.random.get_state()
        py_state = random.getstate()
        _write_json(tmp / f"rng_{rank}.json", {
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]})
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = sorted(p.name for p in tmp.iterdir())
            _write_json(tmp / MANIFEST, {"step": step, "files": files, "num_processes": accelerator.num_processes,
                                         "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            for p in tmp.iterdir():  # flush file contents before the rename makes them visible
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
            fault("checkpoint_publish", step)
            self._prune()
        accelerator.wait_for_everyone()
        return final

    def _prune(self) -> None:
        complete = self.complete()
        for _, p in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.dir.iterdir():  # leftovers of killed writes
            if p.name.startswith(".tmp-") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    # ---- load
    def load(self, accelerator, path: Path, config: dict, force: bool = False) -> dict:
        path = Path(path)
        saved_cfg = json.loads((path / "config.json").read_text())
        if _strip_tolerant(saved_cfg) != _strip_tolerant(config):
            diff = "\n".join(config_diff(_strip_tolerant(saved_cfg), _strip_tolerant(config)))
            if not force:
                raise ValueError(f"checkpoint {path} was written with a different config; refusing to resume "
                                 f"(pass --force to resume anyway):\n{diff}")
            accelerator.print(f"warning: resuming {path} with a different config (--force):\n{diff}")
        model = accelerator.unwrap_model(accelerator._models[0], keep_torch_compile=False)
        load_model(model, str(path / "model.safetensors"), strict=True, device=str(accelerator.device))
        optimizer = accelerator._optimizers[0]
        opt_state = _load_tensors(path / "optimizer.pt")
        (optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer).load_state_dict(opt_state)
        if accelerator._custom_objects:
            accelerator._custom_objects[0].load_state_dict(json.loads((path / "scheduler.json").read_text()))
        rank = accelerator.process_index
        rng_file = path / f"rng_{rank}.pt"
        if rng_file.is_file():
            rng = _load_tensors(rng_file)
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
            js = json.loads((path / f"rng_{rank}.json").read_text())
            py = js["python"]
            random.setstate((py[0], tuple(py[1]), py[2]))
            n = js["numpy"]
            np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
        return json.loads((path / "trainer_state.json").read_text())
