"""The training job's configuration: defaults ⊕ YAML file ⊕ dotted command-line overrides.

The defaults are the embedded job's (the tiny model on 3000/200/300 synth records of 128 px); a YAML
file lists only what differs from them (``configs/default.yaml`` nearly nothing).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ..configtools import ConfigError, build, load_yaml, merge, overrides_to_dict, to_dict
from ..schema import DECODE_MODES
from ..data.synth import SynthConfig
from ..model.config import RAHFConfig, preset_settings


@dataclass
class DataConfig:
    root: str = "data/synth"
    train_split: str = "train"
    eval_split: str = "dev"
    test_split: str = "test"
    generate_synth: bool = True  # generate synth data at data.root if it holds no dataset
    synth: SynthConfig = field(default_factory=SynthConfig)  # what is generated (the generator's defaults)
    num_workers: int = 1
    pin_memory: bool = True
    on_bad_record: Literal["error", "skip"] = "error"
    max_bad_fraction: float = 0.01
    # shuffle the train split by image (records "<uid>~<k>" next to "<uid>"), so a batch holds an image
    # under all its prompts (rahf.training.grouping); on by default when synth.prompts_per_image > 1
    group_variants: Optional[bool] = None
    # the share of easy (one-object) records per epoch, the last value kept (e.g. [1.0, 1.0, 0.5, 0.3]);
    # empty: off. Needs a synth train split with easy scenes (data.synth.easy_fraction > 0);
    # rahf.training.curriculum
    curriculum: list[float] = field(default_factory=list)


@dataclass
class OptimConfig:
    lr: float = 2e-3
    decoder_lr: Optional[float] = None  # None: same as lr
    # the randomly initialised parts (heatmap/score heads, the vision→text projection: rahf.training.optim);
    # None: same as lr (the default job trains everything from scratch); with pretrained encoders a
    # higher rate than the backbone's (e.g. 10×) lets the new parts catch up
    head_lr: Optional[float] = None
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 disables
    fused: bool = True  # fused AdamW kernel (CPU and CUDA); false: the foreach implementation


@dataclass
class TrainLoopConfig:
    batch_size: int = 32  # per process
    global_batch_size: Optional[int] = None  # set: batch_size = this / (processes × grad_accum), must divide
    grad_accum: int = 1
    max_steps: int = 1200  # optimizer steps
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    freeze: list[str] = field(default_factory=list)  # parts: vision, projection, embeddings, text_encoder, decoder, heads
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the model (opt-in; first steps pay the compilation)
    # torch threads per process on CPU; 0: cores / processes, halved while that is faster (a CPU shared
    # with other work; one process and train.deterministic=false only: rahf.training.threads)
    threads: int = 0
    log_every: int = 10
    deterministic: bool = False
    on_nonfinite: Literal["error", "skip"] = "error"
    time_limit_minutes: float = 0.0  # 0: none; a cap: stop, checkpoint, eval, export, marked stopped_early
    stop_after_steps: int = 0  # 0: none; checkpoint and exit after this step (resume later; schedule unchanged)
    # several processes: a collective (gradient all-reduce, the per-step decision) waiting longer than this
    # raises instead of hanging (a rank that died or is stuck)
    collective_timeout_s: float = 300.0


@dataclass
class EvalConfig:
    every: int = 400  # optimizer steps; 0: only at the end
    batch_size: int = 64
    metric: str = "summary/mean"  # keep-best metric (any key printed by rahf eval)
    mode: Literal["max", "min"] = "max"
    decode: Optional[str] = "constrained"  # constrained | free | word_head (needs model.word_head) | None
    max_batches: Optional[int] = None
    test_at_end: bool = True
    # the counterfactual block (rahf.eval.counterfactual) of the test evaluation: this many records
    # (each with up to 4 one-word swaps); 0 = off, null = the whole split
    counterfactual_records: Optional[int] = None


@dataclass
class CheckpointConfig:
    every: int = 400  # optimizer steps; 0 disables periodic checkpoints
    keep_last: int = 2


@dataclass
class TrackingConfig:
    tracker: Literal["wandb", "tensorboard", "none"] = "wandb"
    project: str = "rahf"


@dataclass
class RunConfig:
    name: Optional[str] = None  # default: <model preset>-<timestamp>
    output_dir: str = "runs"
    init_from: Optional[str] = None  # a save_pretrained directory to start from (weights only)


@dataclass
class TrainConfig:
    model: RAHFConfig = field(default_factory=RAHFConfig)  # the tiny preset
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)


def resolve_config(config_file: Optional[str] = None, overrides: Optional[list[str]] = None) -> TrainConfig:
    """defaults ⊕ YAML ⊕ overrides. ``model.preset`` (in either layer) picks the model's base preset
    before the model's other keys apply; a named ``model.head_style`` sets both heads, and head keys
    apply on top (see :mod:`rahf.model.config`). Unknown keys raise :class:`ConfigError` naming the
    closest."""
    layers = [load_yaml(config_file)] if config_file else []
    layers.append(overrides_to_dict(overrides or []))
    merged: dict = {}
    for layer in layers:
        merged = merge(merged, layer)
    model_layer = merged.pop("model", {}) or {}
    if not isinstance(model_layer, dict):
        raise ConfigError("model: expected a mapping")
    base = to_dict(TrainConfig())
    default_model = base.pop("model")
    model = preset_settings(model_layer.get("preset", default_model["preset"]), model_layer)
    cfg = build(TrainConfig, base, merged, {"model": model})
    check_config(cfg)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """Impossible combinations, caught before any data is touched."""
    cfg.model.validate()
    t = cfg.train
    for name, v in (("train.batch_size", t.batch_size), ("train.grad_accum", t.grad_accum),
                    ("train.max_steps", t.max_steps), ("eval.batch_size", cfg.eval.batch_size)):
        if v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    for name, v in (("optim.lr", cfg.optim.lr), ("optim.decoder_lr", cfg.optim.decoder_lr),
                    ("optim.head_lr", cfg.optim.head_lr)):
        if v is not None and v <= 0:
            raise ConfigError(f"{name} must be > 0, got {v}")
    for name, v in (("eval.every", cfg.eval.every), ("checkpoint.every", cfg.checkpoint.every),
                    ("optim.warmup_steps", cfg.optim.warmup_steps), ("optim.grad_clip", cfg.optim.grad_clip),
                    ("data.num_workers", cfg.data.num_workers), ("train.threads", t.threads),
                    ("train.stop_after_steps", t.stop_after_steps)):
        if v < 0:
            raise ConfigError(f"{name} must be >= 0, got {v}")
    if t.collective_timeout_s <= 0:
        raise ConfigError(f"train.collective_timeout_s must be > 0, got {t.collective_timeout_s}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    if t.global_batch_size is not None:
        # accelerate launch / torchrun set WORLD_SIZE; the trainer checks again with the real count
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        per = world * t.grad_accum
        if t.global_batch_size < 1 or t.global_batch_size % per:
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by num_processes "
                              f"({world}) × train.grad_accum ({t.grad_accum}) = {per}")
        t.batch_size = t.global_batch_size // per
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise ConfigError("data.max_bad_fraction must be in [0, 1]")
    if cfg.eval.decode is not None and cfg.eval.decode not in DECODE_MODES:
        raise ConfigError(f"eval.decode must be one of {', '.join(DECODE_MODES)} or null, got {cfg.eval.decode!r}")
    if cfg.eval.decode == "word_head" and not cfg.model.word_head:
        raise ConfigError("eval.decode=word_head needs model.word_head=true")
    from ..model.rahf_model import FREEZABLE

    for part in t.freeze:
        if part not in FREEZABLE:
            raise ConfigError(f"train.freeze: unknown part {part!r}; choose from {list(FREEZABLE)}")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.keep_last must be >= 1")


def default_config_path() -> Optional[Path]:
    """``configs/default.yaml`` next to the working directory or the source tree, if present."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        p = base / "configs" / "default.yaml"
        if p.is_file():
            return p
    return None


def add_arguments(p) -> None:
    """The training command's arguments (``train.py`` and ``rahf train``); no torch import."""
    p.add_argument("--config", help="YAML file layered over the defaults (default: configs/default.yaml; "
                                    "'none': the package defaults alone)")
    p.add_argument("--resume", help="'latest' or a checkpoint directory")
    p.add_argument("--force", action="store_true", help="resume even if the checkpoint's config differs")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 data.root=/data/richhf")

