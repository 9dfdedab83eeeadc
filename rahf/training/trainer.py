"""The training job: ``accelerate launch train.py [--config X.yaml] [key=value ...]`` (or ``rahf train``).

Order of start-up (fixed): config → run directory → data (generated if the default synth set is
absent) → model (``run.init_from`` weights, else pretrained encoders if configured, else random) →
freezing (before wrapping) → optimizer/scheduler → ``accelerator.prepare`` → ``--resume``.

Run directory: ``config.yaml``, ``run_info.json``, ``metrics.jsonl`` (train/eval logs),
``steps.jsonl`` (one line per optimizer step: step, epoch, the uids of its batches; on resume, lines
after the checkpoint's step are dropped, since those steps are run again), ``bad_records.jsonl``
(``data.on_bad_record=skip``: every skipped record once, with its problem), ``checkpoints/``,
``best/``, ``export/``, ``result.json``.

Testing hook: ``RAHF_FAULT=POINT@STEP`` (see :func:`rahf.training.checkpoint.fault`) kills the process
or injects a NaN at a named point; unset, it costs nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from ..configtools import ConfigError, dump_yaml, to_dict
from ..data.format import DataError, open_dataset, read_dataset_info
from ..data.torch_data import RAHFCollator, RAHFTorchDataset
from ..eval.evaluate import evaluate, model_inputs
from ..model.loss import RAHFLoss
from ..eval.metrics import format_tables
from ..model.rahf_model import RAHF
from .config import TrainConfig, default_config_path, resolve_config
from .checkpoint import FAULT_ENV, CheckpointManager, atomic_save_pretrained, fault, parse_faults


# ----------------------------------------------------------------------------- set-up helpers
def git_commit() -> Optional[str]:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def ensure_data(cfg: TrainConfig, accelerator: Accelerator) -> None:
    """Generate the synth dataset at ``data.root`` when it is absent and generation is allowed."""
    root = Path(cfg.data.root)
    present = (root / cfg.data.train_split / "manifest.jsonl").is_file()
    if not present and cfg.data.generate_synth:
        if accelerator.is_main_process:
            from ..data.synth import generate

            s = cfg.data.synth
            accelerator.print(f"generating synth data at {root} (train {s.train}, dev {s.dev}, test {s.test}, {s.size} px)")
            generate(root, train=s.train, dev=s.dev, test=s.test, size=s.size, seed=s.seed)
        accelerator.wait_for_everyone()
    elif not present:
        raise FileNotFoundError(f"no dataset at {root} (missing {cfg.data.train_split}/manifest.jsonl); "
                                f"convert one with `rahf data convert-richhf` or set data.generate_synth=true")


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
    workers = cfg.data.num_workers
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, sampler=sampler, shuffle=shuffle, collate_fn=collate, num_workers=workers,
        pin_memory=cfg.data.pin_memory and torch.cuda.is_available(), persistent_workers=workers > 0,
        drop_last=False)


def param_groups(model: RAHF, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: decay / no-decay (1-D params), and the decoder at its own learning rate."""
    dec_lr = cfg.optim.decoder_lr or cfg.optim.lr
    decoder_ids = {id(p) for p in model.parts()["decoder"]}
    groups: dict[tuple, list] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = dec_lr if id(p) in decoder_ids else cfg.optim.lr
        wd = 0.0 if p.ndim < 2 else cfg.optim.weight_decay
        groups.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def lr_lambda(cfg: TrainConfig):
    warm, total, floor = cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def set_threads(cfg: TrainConfig, accelerator: Accelerator) -> None:
    if accelerator.device.type != "cpu":
        return
    n = cfg.train.threads or max(1, (os.cpu_count() or 1) // accelerator.num_processes)
    torch.set_num_threads(n)


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._old = {}

    def install(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


class BadRecords:
    """Records skipped under ``data.on_bad_record=skip``: each is appended once to ``path``
    (``RUN/bad_records.jsonl``: split, uid, where, problem, stage ``manifest``/``load``, step, epoch) when
    first met, counted per split (a record met again in a later epoch counts once), and checked against
    ``data.max_bad_fraction`` of the split's records."""

    def __init__(self, path: Path, max_fraction: float, write: bool, keep_existing: bool):
        self.path, self.max_fraction, self.write = Path(path), max_fraction, write
        self.known: dict[str, dict[str, str]] = {}  # split -> key -> problem
        self.totals: dict[str, int] = {}
        self.epoch_seen: dict[str, dict[str, str]] = {}  # met during the current epoch (listed at its end)
        if write and not keep_existing and self.path.exists():
            self.path.unlink()
        if keep_existing and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    r = json.loads(line)
                    self.known.setdefault(r["split"], {})[self._key(r)] = r["problem"]
                except (ValueError, KeyError, TypeError):
                    continue

    @staticmethod
    def _key(r: dict) -> str:
        return str(r.get("where") or r.get("uid"))

    def add(self, split: str, records: list[dict], stage: str, step: int, epoch: int) -> list[dict]:
        known = self.known.setdefault(split, {})
        seen = self.epoch_seen.setdefault(split, {})
        new = []
        for r in records:
            k = self._key(r)
            seen[k] = f"{r.get('uid') or r.get('where')}: {r['problem']}"
            if k in known:
                continue
            known[k] = r["problem"]
            new.append({"split": split, "uid": r.get("uid"), "where": r.get("where"), "problem": r["problem"],
                        "stage": stage, "step": step, "epoch": epoch})
        if new and self.write:
            with open(self.path, "a", encoding="utf-8") as f:
                for r in new:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        return new

    def count(self, split: str) -> int:
        return len(self.known.get(split, {}))

    def check(self, split: str) -> None:
        n, total = self.count(split), self.totals.get(split, 0)
        if total and n > self.max_fraction * total:
            raise DataError(None, f"{n} of {total} records are bad ({n / total:.1%}), more than "
                                  f"data.max_bad_fraction={self.max_fraction:g} allows; they are listed in {self.path}. "
                                  f"Fix the data (`rahf data validate` lists every problem) or raise the limit",
                            f"split {split!r}")

    def take_epoch(self, split: str) -> dict[str, str]:
        return self.epoch_seen.pop(split, {})

    def summary(self) -> dict[str, dict[str, int]]:
        return {s: {"bad": self.count(s), "total": self.totals.get(s, 0)} for s in sorted(self.known) if self.count(s)}


class SkipEmpty:
    """Iterates an evaluation loader: collects the batches' ``bad_records``, passes on only batches
    that hold examples, and calls ``after_first`` once the first batch has been consumed."""

    def __init__(self, loader, after_first=None):
        self.loader, self.after_first, self.bad = loader, after_first, []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            self.bad.extend(batch.get("bad_records") or [])
            if batch["uids"]:
                yield batch
            if i == 0 and self.after_first is not None:
                self.after_first()


# ----------------------------------------------------------------------------- the job
class Trainer:
    def __init__(self, cfg: TrainConfig, resume: Optional[str] = None, force: bool = False):
        self.cfg = cfg
        self.resume = resume
        self.force = force
        tracker = cfg.tracking.tracker
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=cfg.train.grad_accum,
            log_with=None if tracker == "none" else tracker,
            # tensorboard: RUN_OUTPUT/tensorboard/<run-name>/ (`tensorboard --logdir runs/tensorboard`)
            project_config=ProjectConfiguration(project_dir=cfg.run.output_dir,
                                                logging_dir=os.path.join(cfg.run.output_dir, "tensorboard")),
        )
        acc = self.accelerator
        t = cfg.train
        if t.global_batch_size is not None:  # the config was resolved before the processes were known
            per = acc.num_processes * t.grad_accum
            if t.global_batch_size % per:
                raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by num_processes "
                                  f"({acc.num_processes}) × train.grad_accum ({t.grad_accum}) = {per}")
            t.batch_size = t.global_batch_size // per
        try:
            parse_faults(os.environ.get(FAULT_ENV))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        set_threads(cfg, acc)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        name = cfg.run.name or f"{cfg.model.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        if cfg.run.name is None:
            obj = [name]
            if acc.num_processes > 1:
                from accelerate.utils import broadcast_object_list

                broadcast_object_list(obj)
            name = obj[0]
        self.run_dir = Path(cfg.run.output_dir) / name
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last)
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
            info = {"git_commit": git_commit(), "argv": sys.argv, "num_processes": acc.num_processes,
                    "device": str(acc.device), "torch": torch.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
            (self.run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
        acc.wait_for_everyone()

    # ---- building
    def build(self):
        cfg, acc = self.cfg, self.accelerator
        set_seed(cfg.train.seed)
        ensure_data(cfg, acc)
        if cfg.run.init_from:
            model = RAHF.from_pretrained(cfg.run.init_from)
        else:
            model = RAHF(cfg.model)
            if cfg.model.vision.pretrained or cfg.model.text.pretrained:
                model.load_pretrained_encoders()
        if cfg.train.freeze:
            n = model.freeze(cfg.train.freeze)
            acc.print(f"froze {n:,} parameters ({', '.join(cfg.train.freeze)})")
        if cfg.train.gradient_checkpointing:
            model.set_gradient_checkpointing(True)
        self.collate = RAHFCollator.for_model(model)
        self.bad = BadRecords(self.run_dir / "bad_records.jsonl", cfg.data.max_bad_fraction, acc.is_main_process,
                              keep_existing=bool(self.resume))
        self._pending_bad: list[dict] = []
        self._step_uids: list[str] = []
        self.train_ds = self.open_split(cfg.data.train_split)
        self.eval_ds = (self.open_split(cfg.data.eval_split) if (Path(cfg.data.root) / cfg.data.eval_split).is_dir()
                        else None)
        self.sampler = EpochSampler(len(self.train_ds), cfg.train.seed)
        train_loader = make_loader(self.train_ds, self.collate, cfg.train.batch_size, cfg, sampler=self.sampler)
        eval_loader = (make_loader(self.eval_ds, self.collate, cfg.eval.batch_size, cfg)
                       if self.eval_ds is not None and len(self.eval_ds) else None)
        optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                      eps=cfg.optim.eps, **({"fused": True} if cfg.optim.fused else {}))
        if cfg.train.compile:
            model = torch.compile(model)
        # The scheduler is stepped by us once per optimizer step (not prepared: accelerate would
        # step it once per process).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.model, self.optimizer, self.train_loader = acc.prepare(model, optimizer, train_loader)
        self.eval_loader = acc.prepare(eval_loader) if eval_loader is not None else None
        acc.register_for_checkpointing(self.scheduler)
        self.loss_fn = RAHFLoss(cfg.model.loss)
        self.unwrapped = acc.unwrap_model(self.model, keep_torch_compile=False)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / cfg.train.grad_accum)
        n_params = sum(p.numel() for p in model.parameters())
        acc.print(f"model {cfg.model.preset}/{cfg.model.variant}: {n_params:,} parameters; "
                  f"{len(self.train_ds)} training examples, {acc.num_processes} process(es) on {acc.device}; "
                  f"run directory {self.run_dir}")

    def open_split(self, split: str) -> RAHFTorchDataset:
        """A split as a torch dataset; manifest-level bad records are listed (skip) or raised (error)."""
        cfg, v = self.cfg, self.cfg.model.vision
        ds = open_dataset(cfg.data.root, split, on_bad_record=cfg.data.on_bad_record)
        self.bad.totals[split] = ds.total
        if ds.bad:
            recs = [{"uid": e.uid, "where": e.where, "problem": e.problem} for e in ds.bad]
            self.bad.add(split, recs, "manifest", 0, 0)
            self.bad.take_epoch(split)
            self.accelerator.print(f"{split}: skipping {len(ds.bad)} of {ds.total} manifest record(s) "
                                   f"(data.on_bad_record=skip), listed in {self.bad.path}:")
            for e in ds.bad[:20]:
                self.accelerator.print(f"  {e}")
            if len(ds.bad) > 20:
                self.accelerator.print(f"  ... and {len(ds.bad) - 20} more")
            self.bad.check(split)
        return RAHFTorchDataset(ds, v.img_size, cfg.model.heatmap_size, v.mean, v.std)

    def record_bad(self, split: str, records: list[dict]) -> None:
        """Count records skipped while loading (all processes' records; collective when several)."""
        if self.cfg.data.on_bad_record != "skip":
            return
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            records = [r for part in gather_object([records]) for r in part]
        if records:
            self.bad.add(split, records, "load", self.step, self.epoch)
            self.bad.check(split)

    def end_epoch_report(self, split: str) -> None:
        seen = self.bad.take_epoch(split)
        if not seen:
            return
        self.accelerator.print(f"epoch {self.epoch}: skipped {len(seen)} bad record(s) of split {split!r} "
                               f"({self.bad.count(split)} of {self.bad.totals.get(split, '?')} so far, listed in "
                               f"{self.bad.path}):")
        for line in list(seen.values())[:20]:
            self.accelerator.print(f"  {line}")
        if len(seen) > 20:
            self.accelerator.print(f"  ... and {len(seen) - 20} more")
        self._append_log({"split": split, "step": self.step, "epoch": self.epoch, "bad_records_skipped": len(seen)})

    def log_step(self) -> None:
        """After an optimizer step: ``steps.jsonl`` gets the step's number and its batches' uids (all
        processes), and records skipped meanwhile are counted."""
        uids, bad = self._step_uids, self._pending_bad
        self._step_uids, self._pending_bad = [], []
        acc = self.accelerator
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            parts = gather_object([(uids, bad)])
            uids = [u for p in parts for u in p[0]]
            bad = [b for p in parts for b in p[1]]
        if acc.is_main_process:
            with open(self.run_dir / "steps.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.step, "epoch": self.epoch, "uids": uids}) + "\n")
        if bad and self.cfg.data.on_bad_record == "skip":
            self.bad.add(self.cfg.data.train_split, bad, "load", self.step, self.epoch)
            self.bad.check(self.cfg.data.train_split)

    def _truncate_steps_log(self) -> None:
        """Keep ``steps.jsonl`` lines up to the step resumed from (later steps are run again)."""
        path = self.run_dir / "steps.jsonl"
        if not self.accelerator.is_main_process or not path.is_file():
            return
        keep, dropped = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                ok = json.loads(line)["step"] <= self.step
            except (ValueError, KeyError, TypeError):  # e.g. a line cut by a kill
                ok = False
            if ok:
                keep.append(line)
            else:
                dropped += 1
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        os.replace(tmp, path)
        if dropped:
            self.accelerator.print(f"steps.jsonl: dropped {dropped} line(s) after step {self.step} (not checkpointed; "
                                   f"those steps run again)")

    # ---- state
    def state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "best": self.best, "best_step": self.best_step, "samples": self.samples}

    def save_checkpoint(self) -> None:
        path = self.ckpt.save(self.accelerator, self.state(), to_dict(self.cfg))
        self.accelerator.print(f"checkpoint step {self.step} → {path}")

    def try_resume(self) -> None:
        self.step = self.epoch = self.batch_in_epoch = self.samples = 0
        self.best, self.best_step = None, None
        if not self.resume:
            self._truncate_steps_log()
            return
        path = self.ckpt.find(self.resume)
        if path is None:
            if self.resume == "latest":
                self.accelerator.print("--resume latest: no complete checkpoint yet, starting from scratch")
                self._truncate_steps_log()
                return
            raise FileNotFoundError(f"no checkpoint at {self.resume}")
        state = self.ckpt.load(self.accelerator, path, to_dict(self.cfg), force=self.force)
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best, self.best_step, self.samples = state.get("best"), state.get("best_step"), state.get("samples", 0)
        self.accelerator.print(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")
        self._truncate_steps_log()

    # ---- evaluation
    def evaluate(self, loader, split: str, model=None) -> dict:
        acc = self.accelerator
        step = self.step
        batches = SkipEmpty(loader, after_first=lambda: fault("mid_eval", step))
        metrics = evaluate(model or self.model, batches, gather=acc.gather_for_metrics, decode=self.cfg.eval.decode,
                           max_batches=self.cfg.eval.max_batches, progress=acc.is_local_main_process,
                           autocast=acc.autocast, loss_fn=self.loss_fn)
        self.record_bad(split, batches.bad)
        self.end_epoch_report(split)
        return metrics

    def is_better(self, value: float) -> bool:
        if value is None or not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value > self.best if self.cfg.eval.mode == "max" else value < self.best

    def eval_and_keep_best(self) -> dict:
        acc, cfg = self.accelerator, self.cfg
        metrics = self.evaluate(self.eval_loader, cfg.data.eval_split)
        if cfg.eval.metric not in metrics:
            raise ConfigError(f"eval.metric {cfg.eval.metric!r} is not among the evaluation's keys, e.g. "
                              f"{sorted(metrics)[:8]}")
        value = metrics[cfg.eval.metric]
        acc.log({f"dev/{k}": v for k, v in metrics.items()}, step=self.step)
        self._append_log({"split": cfg.data.eval_split, "step": self.step, **metrics})
        acc.print(f"step {self.step} {cfg.data.eval_split}: {cfg.eval.metric} = {value:.4f} "
                  + " ".join(f"{k.split('/')[-1] if k.startswith('score') else k}={metrics[k]:.3f}"
                             for k in ("score/plcc/overall", "heatmap/cc/implausibility", "keyword/f1") if k in metrics))
        if self.is_better(value):
            self.best, self.best_step = value, self.step
            if acc.is_main_process:
                atomic_save_pretrained(self.unwrapped, self.run_dir / "best",
                                       {"step": self.step, "metric": cfg.eval.metric, "value": value})
                (self.run_dir / "best" / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            acc.wait_for_everyone()
        return metrics

    def _append_log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # ---- the loop
    def train(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        self.build()
        if cfg.tracking.tracker != "none":
            if cfg.tracking.tracker == "wandb" and not os.environ.get("WANDB_API_KEY"):
                os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_DIR", str(self.run_dir))
            kw = {"wandb": {"dir": str(self.run_dir), "name": self.run_dir.name}} if cfg.tracking.tracker == "wandb" else {}
            project = self.run_dir.name if cfg.tracking.tracker == "tensorboard" else cfg.tracking.project
            acc.init_trackers(project, config=_flat(to_dict(cfg)), init_kwargs=kw)
        self.try_resume()
        stop = StopRequest()
        stop.install()
        t_start = time.time()
        total_steps = cfg.train.max_steps
        bar = tqdm(total=total_steps, initial=self.step, desc="train", disable=not acc.is_local_main_process,
                   dynamic_ncols=True)
        self.model.train()
        t_last, samples_last = time.time(), self.samples
        per_step_samples = cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes
        interrupted = False
        over_time = False
        try:
            while self.step < total_steps and not interrupted:
                # accelerate's loader re-sets its sampler's epoch from its own counter on every
                # iteration: set that counter (not just our sampler), also on the skipping loader.
                self.train_loader.set_epoch(self.epoch)
                loader = self.train_loader
                if self.batch_in_epoch:
                    loader = acc.skip_first_batches(self.train_loader, self.batch_in_epoch)
                    if hasattr(loader, "set_epoch"):
                        loader.set_epoch(self.epoch)
                for batch in loader:
                    if batch.get("bad_records"):
                        self._pending_bad.extend(batch["bad_records"])
                    with acc.accumulate(self.model):
                        if batch["uids"]:  # else every record of the batch was bad and skipped
                            with acc.autocast():
                                out = self.model(**model_inputs(batch))
                            losses = self.loss_fn(out, batch)
                            loss = losses["loss"]
                            if fault("nan_loss", self.step + 1):
                                loss = loss * float("nan")
                            if not torch.isfinite(loss):
                                self._nonfinite("loss", batch)
                                self.optimizer.zero_grad(set_to_none=True)
                                self._step_uids = []
                                self.batch_in_epoch += 1
                                continue
                            acc.backward(loss)
                            self._step_uids.extend(batch["uids"])
                        if acc.sync_gradients:
                            if fault("nan_grad", self.step + 1):
                                g = next((p.grad for p in self.model.parameters() if p.grad is not None), None)
                                if g is not None:
                                    g.view(-1)[0] = float("nan")
                            gnorm = None
                            if cfg.optim.grad_clip > 0:
                                gnorm = acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
                            elif cfg.train.mixed_precision != "fp16":  # fp16: the grad scaler skips such steps
                                gnorm = acc.clip_grad_norm_(self.model.parameters(), float("inf"))  # measures only
                            if gnorm is not None and not torch.isfinite(gnorm):
                                self._nonfinite("gradient norm", batch)
                                self.optimizer.zero_grad(set_to_none=True)
                                self._step_uids = []
                                self.batch_in_epoch += 1
                                continue
                            fault("mid_step", self.step + 1)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    self.batch_in_epoch += 1
                    if not acc.sync_gradients:
                        continue
                    self.scheduler.step()
                    self.step += 1
                    self.samples += per_step_samples
                    bar.update(1)
                    self.log_step()
                    if self.step % cfg.train.log_every == 0 or self.step == total_steps:
                        now = time.time()
                        sps = (self.samples - samples_last) / max(1e-9, now - t_last)
                        t_last, samples_last = now, self.samples
                        logs = {f"train/{k}": float(v.detach()) for k, v in losses.items()}
                        logs["train/lr"] = self.scheduler.get_last_lr()[0]
                        logs["train/samples_per_s"] = sps
                        acc.log(logs, step=self.step)
                        bar.set_postfix(loss=f"{logs['train/loss']:.4f}", sps=f"{sps:.1f}")
                        self._append_log({"split": "train", "step": self.step, **logs})
                    if self.eval_loader is not None and cfg.eval.every and self.step % cfg.eval.every == 0:
                        self.eval_and_keep_best()
                    if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                        self.save_checkpoint()
                    if fault("stall", self.step):
                        acc.print(f"{FAULT_ENV}: stalled after step {self.step}; waiting for SIGTERM/SIGINT")
                        t_stall = time.time()
                        while stop.signal is None and time.time() - t_stall < 120:
                            time.sleep(0.05)
                    over_time = cfg.train.time_limit_minutes and (time.time() - t_start) > 60 * cfg.train.time_limit_minutes
                    pause = cfg.train.stop_after_steps and self.step >= cfg.train.stop_after_steps
                    if stop.signal is not None or pause:
                        interrupted = True
                        break
                    if over_time or self.step >= total_steps:
                        break
                else:  # epoch finished
                    if self._pending_bad:
                        self.log_bad_now()
                    self.end_epoch_report(cfg.data.train_split)
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    continue
                # a break inside the epoch: if it was also its last batch, move to the next epoch
                if self.batch_in_epoch >= len(self.train_loader):
                    self.epoch += 1
                    self.batch_in_epoch = 0
                if over_time:
                    acc.print(f"time limit of {cfg.train.time_limit_minutes} min reached at step {self.step}")
                    break
        finally:
            bar.close()
            stop.restore()
        if interrupted and not over_time:
            self.print_bad_summary()
            self.save_checkpoint()
            why = (f"received {signal.Signals(stop.signal).name}" if stop.signal is not None
                   else f"train.stop_after_steps={cfg.train.stop_after_steps}")
            acc.print(f"{why} at step {self.step}: checkpoint written. Resume with the same command plus "
                      f"`--resume latest run.name={self.run_dir.name}`.")
            acc.end_training()
            return {"interrupted": True, "step": self.step}
        return self.finish(time.time() - t_start)

    def log_bad_now(self) -> None:
        bad, self._pending_bad = self._pending_bad, []
        self.record_bad(self.cfg.data.train_split, bad)

    def _nonfinite(self, what: str, batch) -> None:
        msg = (f"non-finite {what} at step {self.step + 1} (epoch {self.epoch}, batch {self.batch_in_epoch}); "
               f"batch uids: {list(batch['uids'])}")
        if self.cfg.train.on_nonfinite == "error":
            raise FloatingPointError(msg)
        self.accelerator.print("skipping step: " + msg)
        self._append_log({"split": "train", "step": self.step, "skipped_nonfinite": msg})

    def print_bad_summary(self) -> None:
        summ = self.bad.summary()
        if summ:
            self.accelerator.print("bad records skipped (data.on_bad_record=skip): " + ", ".join(
                f"{s} {v['bad']} of {v['total']}" for s, v in summ.items()) + f"; listed in {self.bad.path}")

    def finish(self, wall: float) -> dict:
        cfg, acc = self.cfg, self.accelerator
        if self.ckpt.find("latest") is None or self.ckpt.latest_step() != self.step:
            self.save_checkpoint()
        if self.eval_loader is not None and (self.best_step != self.step):
            self.eval_and_keep_best()
        export = self.run_dir / "export"
        best = self.run_dir / "best"
        if acc.is_main_process:
            if best.is_dir():
                if export.exists():
                    shutil.rmtree(export)
                shutil.copytree(best, export)
            else:
                atomic_save_pretrained(self.unwrapped, export, {"step": self.step})
        acc.wait_for_everyone()
        result = {"step": self.step, "best": self.best, "best_step": self.best_step, "wall_seconds": wall,
                  "samples": self.samples, "samples_per_s": self.samples / max(wall, 1e-9)}
        test_dir = Path(cfg.data.root) / cfg.data.test_split
        if cfg.eval.test_at_end and test_dir.is_dir():
            best_model = RAHF.from_pretrained(export).to(acc.device)
            test_ds = self.open_split(cfg.data.test_split)
            loader = acc.prepare(make_loader(test_ds, self.collate, cfg.eval.batch_size, cfg))
            metrics = self.evaluate(loader, cfg.data.test_split, model=best_model)
            metrics = {k: v for k, v in metrics.items() if not k.startswith("loss/")}
            other = {"constrained": "free", "free": "constrained"}.get(cfg.eval.decode)
            if other:  # keyword metrics under the other decoding too, for comparison
                alt = evaluate(best_model, loader, gather=acc.gather_for_metrics, decode=other,
                               autocast=acc.autocast, heatmaps=False)
                metrics.update({k.replace("keyword", f"keyword_{other}", 1): v for k, v in alt.items()
                                if k.startswith("keyword")})
            acc.log({f"test/{k}": v for k, v in metrics.items()}, step=self.step)
            result["test"] = metrics
            if acc.is_main_process:
                (export / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
                acc.print(f"\n{cfg.data.test_split} split, best checkpoint (step {self.best_step}):")
                acc.print(format_tables(metrics))
                if other:
                    acc.print(f"Misaligned keywords with {other} decoding (pooled): precision "
                              f"{100 * metrics[f'keyword_{other}/precision']:.1f}, recall "
                              f"{100 * metrics[f'keyword_{other}/recall']:.1f}, F1 {100 * metrics[f'keyword_{other}/f1']:.1f}")
        result["bad_records"] = self.bad.summary()
        self.print_bad_summary()
        if torch.cuda.is_available():
            result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            import resource

            result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if acc.is_main_process:
            (self.run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
            acc.print(f"done: {self.step} steps in {wall:.0f} s ({result['samples_per_s']:.1f} samples/s); "
                      f"exported to {export}")
        acc.end_training()
        return result


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


# ----------------------------------------------------------------------------- entry points
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file layered over the defaults (default: configs/default.yaml)")
    p.add_argument("--resume", help="'latest' or a checkpoint directory")
    p.add_argument("--force", action="store_true", help="resume even if the checkpoint's config differs")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 data.root=/data/richhf")


def run(args: argparse.Namespace) -> int:
    config_file = args.config
    if config_file is None:
        p = default_config_path()
        config_file = str(p) if p else None
    try:
        cfg = resolve_config(config_file, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(cfg))
        return 0
    try:
        trainer = Trainer(cfg, resume=args.resume, force=args.force)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        result = trainer.train()
    except DataError as e:
        print(f"data error: {e}\n(`rahf data validate {cfg.data.root}` lists every problem; "
              f"data.on_bad_record=skip skips bad records, up to data.max_bad_fraction of a split)", file=sys.stderr)
        return 1
    return 0 if result else 1


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
