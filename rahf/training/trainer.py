"""The training job: ``accelerate launch train.py [--config X.yaml] [key=value ...]`` (or ``rahf train``).

Order of start-up (fixed): config → run directory → data (generated if the default synth set is
absent) → model (``run.init_from`` weights, else pretrained encoders if configured, else random) →
freezing (before wrapping) → optimizer/scheduler → ``accelerator.prepare`` → ``--resume``.

Run directory: ``config.yaml``, ``run_info.json``, ``metrics.jsonl`` (train/eval logs),
``steps.jsonl`` (one line per optimizer step: step, epoch, the uids of its batches; on resume, lines
after the checkpoint's step are dropped, since those steps are run again), ``bad_records.jsonl``
(``data.on_bad_record=skip``: every skipped record once, with its problem), ``checkpoints/``,
``best/``, ``export/``, ``result.json``.

The pieces live beside this module: :mod:`.optim` (AdamW and the schedule), :mod:`.checkpoint`
(checkpoint I/O), :mod:`.bad_records`, :mod:`.loop_utils` (data order, loaders, signals),
:mod:`.run_log`, :mod:`.caps` (time limit, early stops), :mod:`.threads` (CPU threads) and
:mod:`.faults` (the ``RAHF_FAULT`` testing hook).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, gather_object, send_to_device, set_seed
from tqdm.auto import tqdm

from .._extras import require
from ..configtools import ConfigError, dump_yaml, to_dict
from ..data.format import DataError, open_dataset, read_dataset_info
from ..data.torch_data import RAHFCollator, RAHFTorchDataset
from ..data.tokens import truncation_lines
from ..eval.evaluate import measurement, metrics_document, model_inputs, other_decode, run_evaluation, write_metrics
from ..model.card import write_model_card
from ..model.loss import RAHFLoss
from ..model.pretrained import check_random_init
from ..model.rahf_model import RAHF
from .bad_records import BadRecords
from .caps import EarlyStop, TimeLimit, stopped_early_field
from .checkpoint import CheckpointManager, Checkpointed, atomic_save_pretrained, full_model, write_training_info
from .config import TrainConfig, add_arguments, default_config_path, resolve_config
from .faults import FAULT_ENV, fault, parse_faults
from .loop_utils import EpochSampler, StepDecision, StopRequest, decide_together, make_loader
from .optim import build_optimizer
from .run_log import RunLog
from .threads import thread_controller

__all__ = ["Trainer", "add_arguments", "ensure_data", "main", "make_loader", "run"]


def ensure_data(cfg: TrainConfig, accelerator: Accelerator) -> None:
    """Generate the synth dataset at ``data.root`` when it is absent and generation is allowed."""
    root = Path(cfg.data.root)
    present = (root / cfg.data.train_split / "manifest.jsonl").is_file()
    if not present and cfg.data.generate_synth:
        if accelerator.is_main_process:
            from ..data.synth import generate

            s = cfg.data.synth
            accelerator.print(f"generating synth data at {root} (train {s.train}, dev {s.dev}, test {s.test}, {s.size} px)")
            grouped = s.prompts_per_image > 1
            generate(root, train=0 if grouped else s.train, dev=s.dev, test=s.test, size=s.size, seed=s.seed,
                     easy_fraction=s.easy_fraction)
            if grouped:  # each training scene under its own prompt and one-word-swap variants (exact labels)
                from ..data.synth_variants import grouped_generate

                grouped_generate(root, cfg.data.train_split, s.train, s.prompts_per_image, s.size, s.seed,
                                 pick=s.variant_pick, easy_fraction=s.easy_fraction)
        accelerator.wait_for_everyone()
    elif not present:
        raise FileNotFoundError(f"no dataset at {root} (missing {cfg.data.train_split}/manifest.jsonl); "
                                f"convert one with `rahf data convert-richhf` or set data.generate_synth=true")


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: Optional[str] = None, force: bool = False):
        self.cfg = cfg
        self.resume = resume
        self.force = force
        tracker = cfg.tracking.tracker
        if tracker != "none":  # accelerate drops a tracker whose library is missing without a word
            require(tracker, extra="train", purpose=f"tracking.tracker={tracker}")
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=cfg.train.grad_accum,
            log_with=None if tracker == "none" else tracker,
            # tensorboard: RUN_OUTPUT/tensorboard/<run-name>/ (`tensorboard --logdir runs/tensorboard`)
            project_config=ProjectConfiguration(project_dir=cfg.run.output_dir,
                                                logging_dir=os.path.join(cfg.run.output_dir, "tensorboard")),
            # several processes: a collective that waits longer raises instead of hanging
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s))],
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
        self.threads = thread_controller(cfg.train.threads, cfg.train.deterministic, acc)
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
        self.log = RunLog(self.run_dir, acc.is_main_process)
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
            self.log.write_info(num_processes=acc.num_processes, device=str(acc.device))
        acc.wait_for_everyone()
        self.stopped_early: Optional[EarlyStop] = None

    # ---- building
    def build(self):
        cfg, acc = self.cfg, self.accelerator
        if not cfg.run.init_from:
            check_random_init(cfg.model)  # before any data or weights are touched
        set_seed(cfg.train.seed)
        ensure_data(cfg, acc)
        if cfg.run.init_from:
            model = RAHF.from_pretrained(cfg.run.init_from)
            # the loaded model's architecture and image preprocessing (size, mean/std, heatmap size) rule the
            # data; the training config's loss weights apply
            def norm(x):
                return tuple(x) if isinstance(x, (list, tuple)) else x

            differ = [f"{k}: {getattr(cfg.model.vision, k)} -> {getattr(model.config.vision, k)}"
                      for k in ("img_size", "mean", "std")
                      if norm(getattr(cfg.model.vision, k)) != norm(getattr(model.config.vision, k))]
            if differ:
                acc.print(f"run.init_from: the data follow the loaded model's vision settings ({'; '.join(differ)})")
            model.config.loss = cfg.model.loss
            cfg.model = model.config
        else:  # the checkpoints' T5 architecture and image mean/std, when pretrained encoders are configured
            model = RAHF.from_pretrained_encoders(cfg.model)
            cfg.model = model.config
        if cfg.train.freeze:
            n = model.freeze(cfg.train.freeze)
            acc.print(f"froze {n:,} parameters ({', '.join(cfg.train.freeze)})")
        if cfg.train.gradient_checkpointing:
            model.set_gradient_checkpointing(True)
        self.collate = RAHFCollator.for_model(model)
        self.bad = BadRecords(self.run_dir / "bad_records.jsonl", cfg.data.max_bad_fraction, accelerator=acc,
                              log=self.log.metrics, skip=cfg.data.on_bad_record == "skip",
                              keep_existing=bool(self.resume))
        self._step_uids: list[str] = []
        self.losses: dict = {}  # the last batch's losses (logged at log steps)
        self._flags: dict = {}  # this process's flags for the current optimizer step (decide_together)
        self._nonfinite: Optional[tuple] = None  # where this process met a non-finite value: (what, epoch, batch, uids)
        self._standin = None  # a one-example batch: the forward pass of an empty micro-batch (several processes)
        self.decision: Optional[StepDecision] = None  # the last step's decision, common to every process
        self.took_step = False
        self.fp16_skipped = 0  # fp16: steps whose update the gradient scaler skipped (an overflow)
        self._stop: Optional[StopRequest] = None
        self._limit: Optional[TimeLimit] = None
        self._compute_s = 0.0  # the current optimizer step's computation time so far
        self.train_ds = self.open_split(cfg.data.train_split, scene=cfg.model.scene_head)
        # token limits are never silent: how many prompts / targets the collator will cut (training.json)
        self.token_lengths = {cfg.data.train_split: self.collate.split_truncation(self.train_ds.split)}
        for line in truncation_lines(cfg.data.train_split, self.token_lengths[cfg.data.train_split]):
            acc.print(line)
        self.eval_ds = (self.open_split(cfg.data.eval_split, stored_maps=True)
                        if (Path(cfg.data.root) / cfg.data.eval_split).is_dir() else None)
        group = cfg.data.group_variants
        if cfg.data.curriculum:  # easy scenes first (rahf.training.curriculum)
            from .curriculum import CurriculumEpochSampler, easy_indices

            uids = [e["uid"] for e in self.train_ds.split.entries]
            self.sampler = CurriculumEpochSampler(easy_indices(cfg.data.root, cfg.data.train_split, uids),
                                                  cfg.data.curriculum, cfg.train.seed)
        elif group or (group is None and cfg.data.synth.prompts_per_image > 1):  # an image's prompts in one batch
            from .grouping import GroupedEpochSampler, group_indices

            self.sampler = GroupedEpochSampler(group_indices([e["uid"] for e in self.train_ds.split.entries]),
                                               cfg.train.seed)
        else:
            self.sampler = EpochSampler(len(self.train_ds), cfg.train.seed)
        train_loader = make_loader(self.train_ds, self.collate, cfg.train.batch_size, cfg, sampler=self.sampler)
        eval_loader = (make_loader(self.eval_ds, self.collate, cfg.eval.batch_size, cfg)
                       if self.eval_ds is not None and len(self.eval_ds) else None)
        optimizer, self.scheduler = build_optimizer(model, cfg)
        if cfg.train.compile:
            model = torch.compile(model)
        self.model, self.optimizer, self.train_loader = acc.prepare(model, optimizer, train_loader)
        self.eval_loader = acc.prepare(eval_loader) if eval_loader is not None else None
        self.loss_fn = RAHFLoss(cfg.model.loss)
        self.unwrapped = acc.unwrap_model(self.model, keep_torch_compile=False)
        self.checkpointed = Checkpointed(model=self.unwrapped, optimizer=self.optimizer, scheduler=self.scheduler,
                                         wrapped=self.model)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / cfg.train.grad_accum)
        self.samples_per_step = cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes
        n_params = sum(p.numel() for p in model.parameters())
        acc.print(f"model {cfg.model.preset}/{cfg.model.variant}: {n_params:,} parameters; "
                  f"{len(self.train_ds)} training examples, {acc.num_processes} process(es) on {acc.device}; "
                  f"run directory {self.run_dir}")

    def open_split(self, split: str, stored_maps: bool = False, scene: bool = False) -> RAHFTorchDataset:
        """A split as a torch dataset; manifest-level bad records are listed (skip) or raised (error).
        ``stored_maps``: keep the maps at their stored size (evaluation: heatmap metrics are computed there).
        ``scene``: items carry the scene head's targets (a synth split; ConfigError otherwise)."""
        cfg, v = self.cfg, self.cfg.model.vision
        ds = open_dataset(cfg.data.root, split, on_bad_record=cfg.data.on_bad_record)
        self.bad.opened(split, ds)
        if scene and read_dataset_info(cfg.data.root).get("source") != "synth":
            raise ConfigError(f"model.scene_head: {cfg.data.root} is not a synth dataset: scene targets exist only for "
                              f"the generator's scenes; set model.scene_head=false to train on other data "
                              f"(configs/default.yaml turns it on for the embedded synth data; configs/paper.yaml "
                              f"and --config none do not)")
        return RAHFTorchDataset(ds, v.img_size, None if stored_maps else cfg.model.heatmap_size, v.mean, v.std,
                                scene_grid=cfg.model.grid_size if scene else None)

    def start_tracking(self) -> None:
        cfg = self.cfg
        if cfg.tracking.tracker == "none":
            return
        if cfg.tracking.tracker == "wandb" and not os.environ.get("WANDB_API_KEY"):
            os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(self.run_dir))
        kw = {"wandb": {"dir": str(self.run_dir), "name": self.run_dir.name}} if cfg.tracking.tracker == "wandb" else {}
        project = self.run_dir.name if cfg.tracking.tracker == "tensorboard" else cfg.tracking.project
        self.accelerator.init_trackers(project, config=_flat(to_dict(cfg)), init_kwargs=kw)

    # ---- the loop
    def train(self) -> dict:
        """Build, resume, then run optimizer steps until ``train.max_steps``, a cap (the time limit) or a
        pause (signal, ``train.stop_after_steps``). Finished or capped: evaluate and export
        (:meth:`finish`); paused: checkpoint and return ``{"interrupted": True, "step": N}``."""
        cfg, acc = self.cfg, self.accelerator
        self.build()
        self.start_tracking()
        self.try_resume()
        limit = TimeLimit(cfg.train.time_limit_minutes)
        self.bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc="train",
                        disable=not acc.is_local_main_process, dynamic_ncols=True)
        self._speed = (time.time(), self.samples)
        self.model.train()
        paused = False
        with StopRequest() as stop:
            self._stop, self._limit = stop, limit
            try:
                while self.step < cfg.train.max_steps:
                    for batch in self.epoch_batches():
                        if not self.collectively(self.train_batch, batch):
                            continue  # a micro-batch of an accumulated step
                        if self.took_step:  # not a skipped one
                            self.after_step()
                            if fault("stall", self.step):
                                self.stall(stop)
                        # the time limit and signals, as every process decided together at this step
                        if self.decision.ranks["time_limit"]:
                            self.stopped_early = limit.stop(self.step, cfg.train.max_steps)
                            if acc.num_processes > 1:
                                acc.print(f"the time limit was reached on {self.decision.who('time_limit')}: "
                                          f"every process stops after step {self.step}")
                        paused = bool(self.decision.ranks["signal"]) or 0 < cfg.train.stop_after_steps <= self.step
                        if paused or self.stopped_early or self.step >= cfg.train.max_steps:
                            break
                    else:  # the epoch ran to its end
                        self.end_epoch()
                        continue
                    if self.batch_in_epoch >= len(self.train_loader):  # stopped at the epoch's last batch
                        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    break
            finally:
                self.bar.close()
        if self.stopped_early:  # a cap: evaluate and export what was trained, and say so
            acc.print(f"warning: {self.stopped_early.message} ({self.stopped_early.setting}); "
                      f"checkpointing, evaluating and exporting what was trained")
        elif paused:
            return self.pause(self.signal_name())
        return self.finish(limit.elapsed())

    def epoch_batches(self):
        """The rest of the current epoch's batches, from the saved position after a resume."""
        # accelerate's loader re-sets its sampler's epoch from its own counter on every iteration: set
        # that counter (not just our sampler), also on the skipping loader.
        self.train_loader.set_epoch(self.epoch)
        if not self.batch_in_epoch:
            return self.train_loader
        loader = self.accelerator.skip_first_batches(self.train_loader, self.batch_in_epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.epoch)
        return loader

    def train_batch(self, batch) -> bool:
        """Forward and backward of one batch under gradient accumulation; at the accumulation boundary the
        step's decision (:meth:`end_step`). Returns whether the batch ended an optimizer step, taken or
        skipped (:attr:`took_step`)."""
        acc = self.accelerator
        t0 = time.perf_counter()
        if fault("bad_batch", self.step + 1):
            batch = _spoiled(batch)
        self.bad.pending.extend(batch.get("bad_records") or [])
        with acc.accumulate(self.model):
            if batch["uids"]:
                self.forward_backward(batch)
            else:  # every record was bad
                self._flags["empty_batch"] = True
                if acc.num_processes > 1:
                    self.join_backward()
            boundary = acc.sync_gradients
            if boundary:
                self.took_step = self.end_step()
        self.batch_in_epoch += 1
        self._compute_s += time.perf_counter() - t0
        return boundary

    def collectively(self, fn, *args):
        """``fn(*args)``; with several processes, a collective that fails (``train.collective_timeout_s``
        passed: another process died or is stuck) raises an error naming this rank and the step."""
        try:
            return fn(*args)
        except RuntimeError as e:
            acc = self.accelerator
            if acc.num_processes == 1 or isinstance(e, FloatingPointError):
                raise
            raise RuntimeError(f"rank {acc.process_index}: a collective of step {self.step + 1} failed; another "
                               f"process died or is stuck (train.collective_timeout_s="
                               f"{self.cfg.train.collective_timeout_s:g} s): {e}") from e

    def forward_backward(self, batch) -> None:
        acc = self.accelerator
        with acc.autocast():
            out = self.model(**model_inputs(batch))
        self.losses = self.loss_fn(out, batch)
        loss = self.losses["loss"]
        if fault("nan_loss", self.step + 1):
            loss = loss * float("nan")
        if not torch.isfinite(loss):  # decided at the step's end, together; meanwhile join the all-reduce
            self._flags["nonfinite_loss"] = True
            self._nonfinite = self._nonfinite or ("loss", self.epoch, self.batch_in_epoch, list(batch["uids"]))
            loss = self.zero_loss()
        acc.backward(loss)
        self._step_uids.extend(batch["uids"])

    def zero_loss(self) -> torch.Tensor:
        """A loss whose gradient is zero for every trained parameter: a process with nothing to add
        still runs the backward pass, so that it joins the gradient all-reduce of the others."""
        return torch.stack([p.sum() for p in self.model.parameters() if p.requires_grad]).sum() * 0.0

    def join_backward(self) -> None:
        """An empty micro-batch on one of several processes: the forward pass of a stand-in example (the
        forward's collectives) and a zero-loss backward (the gradient all-reduce); it adds no gradient,
        as an empty micro-batch adds none on one process."""
        acc = self.accelerator
        if self._standin is None:
            for i in range(len(self.train_ds)):
                b = self.collate([self.train_ds[i]])
                if b["uids"]:
                    self._standin = send_to_device(b, acc.device)
                    break
            else:
                raise DataError(None, "no record of the training split loads", f"split {self.cfg.data.train_split!r}")
        with acc.autocast():
            self.model(**model_inputs(self._standin))
        acc.backward(self.zero_loss())

    def grad_norm(self) -> Optional[torch.Tensor]:
        """Clip (``optim.grad_clip``) or just measure the gradient norm (fp16: after unscaling)."""
        acc, cfg = self.accelerator, self.cfg
        if fault("nan_grad", self.step + 1):
            g = next((p.grad for p in self.model.parameters() if p.grad is not None), None)
            if g is not None:
                g.view(-1)[0] = float("nan")
        return acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))

    def end_step(self) -> bool:
        """The accumulation boundary: this process's flags (an empty micro-batch, a non-finite loss or
        gradient norm, a signal, the time limit) go into one all-reduce, and every process takes the
        same branch: update, skip (``train.on_nonfinite=skip``), raise (``error``), or let the fp16
        gradient scaler skip an overflow. Returns whether the step counts (not a skipped one)."""
        acc, cfg = self.accelerator, self.cfg
        if not self._flags.get("nonfinite_loss"):
            gnorm = self.grad_norm()
            if gnorm is not None and not torch.isfinite(gnorm):
                self._flags["nonfinite_grad"] = True
                self._nonfinite = ("gradient norm", self.epoch, self.batch_in_epoch, list(self._step_uids))
            fault("mid_step", self.step + 1)
        if self._limit is not None and fault("clock_jump", self.step + 1):
            self._limit.jump()
        flags, self._flags = self._flags, {}
        flags["signal"] = self._stop.signal if self._stop is not None and self._stop.signal is not None else 0
        flags["time_limit"] = self._limit is not None and self._limit.exceeded()
        d = self.decision = decide_together(flags, acc.process_index, acc.num_processes, acc.device)
        nonfinite, self._nonfinite = self._nonfinite, None
        if d.ranks["empty_batch"] and acc.num_processes > 1:
            self.log.metrics({"split": "train", "step": self.step + 1, "empty_batch_ranks": d.ranks["empty_batch"]})
        fp16 = acc.scaler is not None  # mixed_precision=fp16 with a gradient scaler (not on CPU)
        action = d.action(cfg.train.on_nonfinite, fp16=fp16)
        if action in ("error", "skip"):
            return self.skip_nonfinite(d, nonfinite)
        if action == "scaler" and not flags.get("nonfinite_grad"):
            # another rank overflowed: skip here too and lower the scale alike
            scaler = acc.scaler
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
            skipped = True
        else:
            self.optimizer.step()
            skipped = fp16 and self.optimizer.step_was_skipped
        self.optimizer.zero_grad(set_to_none=True)
        if skipped:  # the step counts (as the schedule does), its update was not made
            self.fp16_skipped += 1
            where = f" on {d.who('nonfinite_grad')}" if d.ranks["nonfinite_grad"] else ""
            acc.print(f"step {self.step + 1}: fp16 gradient overflow{where}; the gradient scaler skipped the update "
                      f"and lowered its scale ({self.fp16_skipped} so far)")
            self.log.metrics({"split": "train", "step": self.step + 1, "train/fp16_skipped": self.fp16_skipped})
        return True

    def skip_nonfinite(self, d: StepDecision, nonfinite: Optional[tuple]) -> bool:
        """``train.on_nonfinite``: ``error`` raises FloatingPointError naming the step, the rank(s) and (on
        a rank that met it) the batch; ``skip`` drops the step's gradients on every rank and logs it.
        Returns False (no update)."""
        flag = "nonfinite_loss" if d.ranks["nonfinite_loss"] else "nonfinite_grad"
        what = "loss" if flag == "nonfinite_loss" else "gradient norm"
        msg = f"non-finite {what} at step {self.step + 1}"
        if self.accelerator.num_processes > 1:
            msg += f" on {d.who(flag)}"
        if nonfinite is not None and nonfinite[0] == what:
            _, epoch, batch_index, uids = nonfinite
            msg += f" (epoch {epoch}, batch {batch_index}); batch uids: {uids}"
        if self.cfg.train.on_nonfinite == "error":
            raise FloatingPointError(msg)
        self.accelerator.print("skipping step: " + msg)
        self.log.metrics({"split": "train", "step": self.step, "skipped_nonfinite": msg, "ranks": d.ranks[flag]})
        self.optimizer.zero_grad(set_to_none=True)
        self._step_uids = []
        return False

    def signal_name(self) -> Optional[str]:
        """The signal that paused the run (any rank's), e.g. ``SIGTERM``; None if none did."""
        d = self.decision
        if d is None or not d.ranks["signal"]:
            return None
        import signal

        name = signal.Signals(max(d.values["signal"])).name
        return name if self.accelerator.num_processes == 1 else f"{name} on {d.who('signal')}"

    def after_step(self) -> None:
        """An optimizer step was taken: schedule, count, log, evaluate and checkpoint when due."""
        cfg = self.cfg
        self.scheduler.step()
        self.step += 1
        self.samples += self.samples_per_step
        self.bar.update(1)
        self.adapt_threads()
        self.log_step()
        if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
            self.log_train()
        if self.eval_loader is not None and cfg.eval.every and self.step % cfg.eval.every == 0:
            self.eval_and_keep_best()
        if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
            self.save_checkpoint()

    def adapt_threads(self) -> None:
        """Give the step's computation time to the thread controller (``train.threads=0`` on CPU)."""
        compute_s, self._compute_s = self._compute_s, 0.0
        if self.threads is None:
            return
        change = self.threads.observe(compute_s)
        if change:
            self.accelerator.print(f"step {self.step}: {change}")
            self.log.metrics({"split": "train", "step": self.step, "threads": self.threads.current})

    def end_epoch(self) -> None:
        """The epoch's last batch was consumed: count the records it skipped since the last step, list
        them, and move to the next epoch."""
        self.bad.loaded(self.cfg.data.train_split, self.bad.take_pending(), self.step, self.epoch)
        self.bad.end_epoch(self.cfg.data.train_split, self.step, self.epoch)
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def stall(self, stop: StopRequest) -> None:
        """The ``stall`` fault: wait (up to 120 s) for SIGTERM/SIGINT."""
        self.accelerator.print(f"{FAULT_ENV}: stalled after step {self.step}; waiting for SIGTERM/SIGINT")
        t_stall = time.time()
        while stop.signal is None and time.time() - t_stall < 120:
            time.sleep(0.05)

    def pause(self, signal_name: Optional[str]) -> dict:
        """A signal or ``train.stop_after_steps``: checkpoint and exit, to be resumed."""
        acc = self.accelerator
        self.bad.print_summary()
        self.save_checkpoint()
        why = f"received {signal_name}" if signal_name else f"train.stop_after_steps={self.cfg.train.stop_after_steps}"
        acc.print(f"{why} at step {self.step}: checkpoint written. Resume with the same command plus "
                  f"`--resume latest run.name={self.run_dir.name}`.")
        acc.end_training()
        return {"interrupted": True, "step": self.step}

    # ---- logs
    def log_step(self) -> None:
        """After an optimizer step: ``steps.jsonl`` gets the step's number and its batches' uids (all
        processes), and records skipped meanwhile are counted."""
        uids, bad = self._step_uids, self.bad.take_pending()
        self._step_uids = []
        acc = self.accelerator
        if acc.num_processes > 1:
            parts = gather_object([(uids, bad)])
            uids = [u for p in parts for u in p[0]]
            bad = [b for p in parts for b in p[1]]
        self.log.step(self.step, self.epoch, uids)
        self.bad.loaded(self.cfg.data.train_split, bad, self.step, self.epoch, gathered=True)

    def log_train(self) -> None:
        """The step's losses, learning rate and samples/s since the last such record."""
        now = time.time()
        t_last, samples_last = self._speed
        sps = (self.samples - samples_last) / max(1e-9, now - t_last)
        self._speed = (now, self.samples)
        logs = {f"train/{k}": float(v.detach()) for k, v in self.losses.items()}
        logs["train/lr"] = self.scheduler.get_last_lr()[0]
        logs["train/samples_per_s"] = sps
        self.accelerator.log(logs, step=self.step)
        self.bar.set_postfix(loss=f"{logs.get('train/loss', math.nan):.4f}", sps=f"{sps:.1f}")
        self.log.metrics({"split": "train", "step": self.step, **logs})

    # ---- state
    def state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "best": self.best, "best_step": self.best_step, "samples": self.samples}

    def save_checkpoint(self) -> None:
        path = self.ckpt.save(self.accelerator, self.checkpointed, self.state(), to_dict(self.cfg))
        self.accelerator.print(f"checkpoint step {self.step} → {path}")

    def try_resume(self) -> None:
        self.step = self.epoch = self.batch_in_epoch = self.samples = 0
        self.best, self.best_step = None, None
        path = self.ckpt.find(self.resume) if self.resume else None
        if self.resume and path is None:
            if self.resume != "latest":
                raise FileNotFoundError(f"no checkpoint at {self.resume}")
            self.accelerator.print("--resume latest: no complete checkpoint yet, starting from scratch")
        if path is not None:
            state = self.ckpt.load(self.accelerator, path, self.checkpointed, to_dict(self.cfg), force=self.force)
            self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
            self.best, self.best_step, self.samples = state.get("best"), state.get("best_step"), state.get("samples", 0)
            self.accelerator.print(f"resumed from {path} at step {self.step} (epoch {self.epoch}, "
                                   f"batch {self.batch_in_epoch})")
        dropped = self.log.truncate_steps(self.step)
        if dropped:
            self.accelerator.print(f"steps.jsonl: dropped {dropped} line(s) after step {self.step} (not checkpointed; "
                                   f"those steps run again)")

    # ---- evaluation
    def evaluate(self, loader, split: str, model=None, decode_also: Optional[str] = None, loss: bool = True,
                 examples: bool = False):
        """One evaluation (:func:`rahf.eval.evaluate.run_evaluation`) with ``eval.decode``; returns the
        :class:`rahf.eval.evaluate.Evaluation`. ``loss``: also the mean losses; ``decode_also``: another
        decoding's keyword metrics (``keyword_<mode>/…``); ``examples``: per-example results too."""
        acc = self.accelerator
        ev = run_evaluation(model or self.model, _AfterFirst(loader, lambda: fault("mid_eval", self.step)),
                            gather_object=gather_object if acc.num_processes > 1 else None,
                            decode=self.cfg.eval.decode, decode_also=decode_also, max_batches=self.cfg.eval.max_batches,
                            progress=acc.is_local_main_process, autocast=acc.autocast,
                            loss_fn=self.loss_fn if loss else None, examples=examples)
        self.bad.loaded(split, ev.bad_records, self.step, self.epoch, gathered=True)  # every process's, each once
        self.bad.end_epoch(split, self.step, self.epoch)
        return ev

    def measured(self, ev, split: str, checkpoint: Path) -> dict:
        """The ``measured`` block of a metrics.json this run writes (how ``ev`` was measured)."""
        cfg = self.cfg
        return measurement(ev, split=split, dataset=cfg.data.root, checkpoint=checkpoint,
                           batch_size=cfg.eval.batch_size, max_batches=cfg.eval.max_batches,
                           mixed_precision=cfg.train.mixed_precision, num_processes=self.accelerator.num_processes,
                           on_bad_record=cfg.data.on_bad_record, model_heatmap_size=cfg.model.heatmap_size)

    def is_better(self, value: float) -> bool:
        if value is None or not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value > self.best if self.cfg.eval.mode == "max" else value < self.best

    def eval_and_keep_best(self) -> dict:
        acc, cfg = self.accelerator, self.cfg
        ev = self.evaluate(self.eval_loader, cfg.data.eval_split)
        metrics = ev.metrics
        if cfg.eval.metric not in metrics:
            raise ConfigError(f"eval.metric {cfg.eval.metric!r} is not among the evaluation's keys, e.g. "
                              f"{sorted(metrics)[:8]}")
        value = metrics[cfg.eval.metric]
        acc.log({f"dev/{k}": v for k, v in metrics.items()}, step=self.step)
        self.log.metrics({"split": cfg.data.eval_split, "step": self.step, **metrics_document(metrics, ev.unavailable)})

        def show(k: str) -> str:
            return f"n/a ({ev.unavailable[k]})" if k in ev.unavailable else f"{metrics[k]:.{4 if k == cfg.eval.metric else 3}f}"

        acc.print(f"step {self.step} {cfg.data.eval_split}: {cfg.eval.metric} = {show(cfg.eval.metric)} "
                  + " ".join(f"{k.split('/')[-1] if k.startswith('score') else k}={show(k)}"
                             for k in ("score/plcc/overall", "heatmap/cc/implausibility", "keyword/f1") if k in metrics))
        if self.is_better(value):  # an unavailable (NaN) value never is
            self.best, self.best_step = value, self.step
            whole = full_model(acc, self.model, self.unwrapped)  # FSDP: gathered (every process), else the model
            if acc.is_main_process:
                best = self.run_dir / "best"
                atomic_save_pretrained(whole, best, {"step": self.step, "metric": cfg.eval.metric, "value": value},
                                       training=self.training_info(self.step))
                write_metrics(best / "metrics.json", metrics, ev.unavailable, self.measured(ev, cfg.data.eval_split, best))
                write_model_card(best)
            acc.wait_for_everyone()
        return metrics

    # ---- the end
    def training_info(self, weights_step: int) -> dict:
        """``training.json`` of an exported model: the step its weights are from, the run's steps and
        limit, the keep-best metric, and whether a cap stopped the run early."""
        cfg = self.cfg
        return {"run": self.run_dir.name, "step": weights_step, "run_steps": self.step,
                "max_steps": cfg.train.max_steps, "samples": self.samples,
                "best": {"metric": cfg.eval.metric, "mode": cfg.eval.mode, "value": self.best, "step": self.best_step},
                "token_lengths": self.token_lengths,
                "stopped_early": stopped_early_field(self.stopped_early)}

    def finish(self, wall: float) -> dict:
        """Checkpoint, evaluate and keep the best (if not done at this step), export the best (else the
        last) weights, measure them on the test split, write ``result.json`` and print the summary line."""
        cfg, acc = self.cfg, self.accelerator
        if self.ckpt.find("latest") is None or self.ckpt.latest_step() != self.step:
            self.save_checkpoint()
        if self.eval_loader is not None and (self.best_step != self.step):
            self.eval_and_keep_best()
        export = self.run_dir / "export"
        best = self.run_dir / "best"
        whole = None if best.is_dir() else full_model(acc, self.model, self.unwrapped)
        if acc.is_main_process:
            if best.is_dir():
                if export.exists():
                    shutil.rmtree(export)
                shutil.copytree(best, export)
                write_training_info(export, self.training_info(self.best_step))
            else:
                atomic_save_pretrained(whole, export, {"step": self.step},
                                       training=self.training_info(self.step))
        acc.wait_for_everyone()
        result = {"step": self.step, "max_steps": cfg.train.max_steps,
                  "stopped_early": stopped_early_field(self.stopped_early), "best": self.best,
                  "best_step": self.best_step, "wall_seconds": wall, "samples": self.samples,
                  "samples_per_s": self.samples / max(wall, 1e-9)}
        if self.threads is not None:
            result["threads"] = self.threads.summary()
        test_dir = Path(cfg.data.root) / cfg.data.test_split
        if cfg.eval.test_at_end and test_dir.is_dir():
            best_model = RAHF.from_pretrained(export).to(acc.device)
            test_ds = self.open_split(cfg.data.test_split, stored_maps=True)
            loader = acc.prepare(make_loader(test_ds, self.collate, cfg.eval.batch_size, cfg))
            # keyword metrics under another decoding too, for comparison (keyword_<other>/...): a model with a
            # word head reports its word-head tags beside the decoder's, any other model free beside constrained
            also = other_decode(cfg.eval.decode, word_head=best_model.word_head is not None)
            ev = self.evaluate(loader, cfg.data.test_split, model=best_model, decode_also=also, loss=False)
            metrics = ev.metrics
            cf_records = cfg.eval.counterfactual_records
            if cf_records != 0 and acc.is_main_process:  # does the model read the prompt? (one-word swaps)
                from ..eval.counterfactual import counterfactual_metrics

                metrics.update(counterfactual_metrics(best_model, test_ds.split, cf_records,
                                                      batch_size=cfg.eval.batch_size,
                                                      decode=cfg.eval.decode or "constrained"))
            acc.log({f"test/{k}": v for k, v in metrics.items()}, step=self.step)
            result["test"] = metrics_document(metrics, ev.unavailable)  # null + reason where unavailable
            if acc.is_main_process:
                measured = self.measured(ev, cfg.data.test_split, export)
                measured["counterfactual_records"] = cf_records
                write_metrics(export / "metrics.json", metrics, ev.unavailable, measured)
                acc.print(f"\n{cfg.data.test_split} split, best checkpoint (step {self.best_step}):")
                acc.print(ev.tables())
                if cf_records != 0:
                    from ..eval.counterfactual import format_counterfactual

                    acc.print(format_counterfactual(metrics))
        if acc.is_main_process:
            if self.stopped_early and (export / "metrics.json").is_file():
                doc = json.loads((export / "metrics.json").read_text())
                doc["stopped_early"] = stopped_early_field(self.stopped_early)
                (export / "metrics.json").write_text(json.dumps(doc, indent=2) + "\n")
            write_model_card(export)
        result["bad_records"] = self.bad.summary()
        self.bad.print_summary()
        if torch.cuda.is_available():
            result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            import resource

            result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if acc.is_main_process:
            (self.run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
            done = (f"{self.step} steps in {wall:.0f} s ({result['samples_per_s']:.1f} samples/s); "
                    f"exported to {export}")
            if self.stopped_early:
                acc.print(f"warning: {self.stopped_early.message} ({self.stopped_early.setting}), not finished: {done}")
            else:
                acc.print(f"done: {done}")
        acc.end_training()
        return result


class _AfterFirst:
    """An evaluation loader that calls ``hook`` once its first batch has been consumed (the
    ``mid_eval`` fault point)."""

    def __init__(self, loader, hook):
        self.loader, self.hook = loader, hook

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            yield batch
            if i == 0:
                self.hook()


def _spoiled(batch: dict) -> dict:
    """The ``bad_batch`` fault: the batch as if none of its records had loaded."""
    bad = list(batch.get("bad_records") or [])
    bad += [{"uid": u, "where": u, "problem": f"{FAULT_ENV}: bad_batch"} for u in batch["uids"]]
    return {"uids": [], "bad_records": bad, "empty": True}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


# ----------------------------------------------------------------------------- entry points
def run(args: argparse.Namespace) -> int:
    config_file = args.config
    if config_file is None:
        p = default_config_path()
        config_file = str(p) if p else None
    elif config_file == "none":  # the package's defaults alone, no YAML layer
        config_file = None
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
    except ConfigError as e:  # found while building (e.g. pretrained weights that do not fit)
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"data error: {e}\n(`rahf data validate {cfg.data.root}` lists every problem; "
              f"data.on_bad_record=skip skips bad records, up to data.max_bad_fraction of a split)", file=sys.stderr)
        return 1
    return 0 if result else 1


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
