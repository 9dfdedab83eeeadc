"""Full-state training checkpoints, written atomically and read without unpickling arbitrary objects.

A checkpoint directory ``checkpoints/step_000123/`` holds, for the objects named in
:class:`Checkpointed`:

* ``model.safetensors``   the model's weights (the unwrapped model)
* ``optimizer.pt``        the optimizer's state dict (tensors and numbers; loaded with ``weights_only=True``)
* ``fsdp/``               under FSDP, instead of those two: the model's and the optimizer's sharded state
                          (``SHARDED_STATE_DICT``, every process writes its shards through accelerate's FSDP
                          support and ``torch.distributed.checkpoint``; the same number of processes resumes it)
* ``scheduler.json``      the learning-rate scheduler's state dict
* ``rng_<rank>.pt``       torch (and CUDA) RNG states of each process (``weights_only=True``)
* ``rng_<rank>.json``     Python and NumPy RNG states of each process
* ``trainer_state.json``  the trainer's counters: step, samples seen, best metric, and the data position
                          (epoch, batch within the epoch)
* ``config.json``         the resolved training config (resume refuses a different one unless forced)
* ``checkpoint.json``     the manifest, written last: a directory without it is incomplete

Writes go to ``.tmp-step_000123/`` first and are renamed into place, so a kill at any point leaves
either the previous checkpoints or a complete new one; ``--resume latest`` ignores anything else.
The accelerator is used only through its public API (process rank and count, barriers, printing,
and under FSDP the plugin and accelerate's FSDP state-dict helpers, those ``accelerator.save_state`` /
``load_state`` use; the RNG states stay ours, written without pickling). An exported model
(:func:`atomic_save_pretrained`) is always whole: under FSDP :func:`full_model` gathers it first.
"""

from __future__ import annotations

import difflib
import json
import os
import pickle
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from .faults import fault

STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "checkpoint.json"
TRAINING_INFO = "training.json"  # written by atomic_save_pretrained next to an exported model


@dataclass
class Checkpointed:
    """The objects a checkpoint saves and restores (besides the RNG states and the trainer's counters)."""

    model: torch.nn.Module  # unwrapped (no DDP / compile wrapper): its state dict keys are the model's own
    optimizer: Any  # anything with state_dict() / load_state_dict(), e.g. accelerate's wrapped optimizer
    scheduler: Any  # likewise; its state dict must be JSON (LambdaLR's is: numbers and lists)
    wrapped: Optional[torch.nn.Module] = None  # the prepared model (FSDP: its sharded state is saved through it)


def is_fsdp(accelerator) -> bool:
    """Whether ``accelerator`` shards the model with FSDP."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _sharded_plugin(accelerator):
    """The FSDP plugin, set to ``SHARDED_STATE_DICT`` (each process saves and loads only its shards)."""
    plugin = accelerator.state.fsdp_plugin
    plugin.set_state_dict_type("SHARDED_STATE_DICT")
    return plugin


def full_model(accelerator, wrapped, unwrapped):
    """The model to export whole: ``unwrapped`` itself, except under FSDP, where the full state dict is
    gathered (``FULL_STATE_DICT``, a collective: every process calls this) and loaded into a copy on
    the CPU of the main process (None on the others)."""
    if not is_fsdp(accelerator):
        return unwrapped
    state = accelerator.get_state_dict(wrapped)
    if not accelerator.is_main_process:
        return None
    model = type(unwrapped)(unwrapped.config, tokenizer=unwrapped.tokenizer)
    model.load_state_dict(state, strict=True)
    return model


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


def atomic_save_pretrained(model, directory: Path, metadata: Optional[dict] = None,
                           training: Optional[dict] = None) -> None:
    """``model.save_pretrained`` into a temporary sibling, then swap it into place. ``metadata`` goes
    into the safetensors header; ``training`` (how the weights were trained: step, limits, an early
    stop) into ``training.json`` beside them."""
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, metadata=metadata)
    if training is not None:
        write_training_info(tmp, training)
    old = directory.with_name(f".old-{directory.name}-{os.getpid()}")
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(directory.parent)


def write_training_info(directory: Path, info: dict) -> None:
    """``directory/training.json``: how the model saved there was trained."""
    _write_json(Path(directory) / TRAINING_INFO, info)


def config_diff(saved: dict, current: dict) -> list[str]:
    """Readable unified diff of two resolved configs (JSON, sorted keys)."""
    a = json.dumps(saved, indent=1, sort_keys=True).splitlines()
    b = json.dumps(current, indent=1, sort_keys=True).splitlines()
    return list(difflib.unified_diff(a, b, "checkpoint config", "this run's config", lineterm="", n=1))


# Keys that may change between a run and its resumption without changing what is trained.
RESUME_TOLERANT = {("data", "num_workers"), ("data", "pin_memory"), ("train", "log_every"), ("tracking",),
                   ("eval", "max_batches"), ("run", "name"), ("train", "threads"), ("checkpoint",),
                   ("train", "time_limit_minutes"), ("train", "stop_after_steps"),
                   ("train", "collective_timeout_s"), ("eval", "every"),
                   ("eval", "batch_size"), ("model", "head_style")}  # head_style: a label read off the heads


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


def rng_states() -> tuple[dict, dict]:
    """This process's RNG states: ``(torch, python_and_numpy)``, the first for ``torch.save`` (tensors),
    the second JSON."""
    torch_states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        torch_states["cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    other = {"python": [py_state[0], list(py_state[1]), py_state[2]],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return torch_states, other


def set_rng_states(torch_states: dict, other: dict) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(torch_states["torch"])
    if "cuda" in torch_states and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch_states["cuda"])
    py = other["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = other["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


class CheckpointManager:
    """The checkpoints of one run in ``directory``: writes (atomic, the newest ``keep_last`` kept),
    finds the newest complete one, and restores a run's state from one."""

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
            if all((p / f).exists() for f in manifest.get("files", [])):
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
    def save(self, accelerator, objects: Checkpointed, state: dict, config: dict) -> Path:
        """Write checkpoint ``state["step"]`` (collective: every process calls it, each saves its RNG
        states; the main process writes the rest, the manifest last, then renames it into place)."""
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
        fsdp = is_fsdp(accelerator)
        if fsdp:  # collective: every process writes its shards
            from accelerate.utils import save_fsdp_model, save_fsdp_optimizer

            plugin = _sharded_plugin(accelerator)
            save_fsdp_model(plugin, accelerator, objects.wrapped, str(tmp / "fsdp"))
            save_fsdp_optimizer(plugin, accelerator, objects.optimizer, objects.wrapped, str(tmp / "fsdp"))
        if accelerator.is_main_process:
            if not fsdp:
                save_model(objects.model, str(tmp / "model.safetensors"))
                torch.save(objects.optimizer.state_dict(), tmp / "optimizer.pt")
            _write_json(tmp / "scheduler.json", objects.scheduler.state_dict())
            _write_json(tmp / "trainer_state.json", state)
            _write_json(tmp / "config.json", config)
            fault("checkpoint_write", step)
        torch_states, other = rng_states()
        torch.save(torch_states, tmp / f"rng_{rank}.pt")
        _write_json(tmp / f"rng_{rank}.json", other)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = sorted(p.name for p in tmp.iterdir())
            _write_json(tmp / MANIFEST, {"step": step, "files": files, "num_processes": accelerator.num_processes,
                                         "fsdp": fsdp, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            for p in tmp.rglob("*"):  # flush file contents before the rename makes them visible
                if p.is_file():
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
    def load(self, accelerator, path: Path, objects: Checkpointed, config: dict, force: bool = False) -> dict:
        """Restore ``objects`` and this process's RNG states from checkpoint ``path``; returns the
        trainer state. A checkpoint written with a different config (beyond :data:`RESUME_TOLERANT`)
        is refused with a diff unless ``force``."""
        path = Path(path)
        saved_cfg = json.loads((path / "config.json").read_text())
        if _strip_tolerant(saved_cfg) != _strip_tolerant(config):
            diff = "\n".join(config_diff(_strip_tolerant(saved_cfg), _strip_tolerant(config)))
            if not force:
                raise ValueError(f"checkpoint {path} was written with a different config; refusing to resume "
                                 f"(pass --force to resume anyway):\n{diff}")
            accelerator.print(f"warning: resuming {path} with a different config (--force):\n{diff}")
        sharded, fsdp = (path / "fsdp").is_dir(), is_fsdp(accelerator)
        if sharded != fsdp:
            raise ValueError(f"checkpoint {path} was written {'under' if sharded else 'without'} FSDP; resume it "
                             f"{'under' if sharded else 'without'} FSDP (the launch config it was written with)")
        if fsdp:  # collective: every process reads its shards
            from accelerate.utils import load_fsdp_model, load_fsdp_optimizer

            plugin = _sharded_plugin(accelerator)
            load_fsdp_model(plugin, accelerator, objects.wrapped, str(path / "fsdp"))
            load_fsdp_optimizer(plugin, accelerator, objects.optimizer, objects.wrapped, str(path / "fsdp"))
        else:
            load_model(objects.model, str(path / "model.safetensors"), strict=True, device=str(accelerator.device))
            objects.optimizer.load_state_dict(_load_tensors(path / "optimizer.pt"))
        objects.scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
        rank = accelerator.process_index
        rng_file = path / f"rng_{rank}.pt"
        if rng_file.is_file():
            set_rng_states(_load_tensors(rng_file), json.loads((path / f"rng_{rank}.json").read_text()))
        return json.loads((path / "trainer_state.json").read_text())
