"""Every training option has an effect: each test fails when its option is ignored.

The runs use the tiny model shrunk further (one ViT block, one T5 encoder and decoder layer, 64 px
images) on the shared synth fixture, a few optimizer steps each, with no evaluation unless the option
is about evaluation (``data.eval_split`` names a split that does not exist)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook

from rahf import RAHF
from rahf.training.config import resolve_config
from rahf.training.trainer import Trainer

from test_train import weights_digest


def opts(data, out, name, *extra):
    return [f"data.root={data}", f"run.output_dir={out}", f"run.name={name}", "tracking.tracker=none",
            "data.num_workers=0", "data.generate_synth=false", "data.eval_split=no_eval", "model.vision.img_size=64",
            "model.vision.depth=1", "model.text.num_layers=1", "model.text.num_decoder_layers=1",
            "train.batch_size=4", "train.threads=1", "optim.warmup_steps=2", "eval.every=0",
            "eval.test_at_end=false", "checkpoint.every=0", "train.log_every=1", *extra]


def trainer(data, out, name, *extra) -> Trainer:
    return Trainer(resolve_config(None, opts(data, out, name, *extra)))


def built(data, out, name, *extra) -> Trainer:
    t = trainer(data, out, name, *extra)
    t.build()
    return t


def optimizer_param_ids(t: Trainer) -> dict[int, float]:
    """id(parameter) → the initial (peak) learning rate of its optimizer group."""
    return {id(p): g["initial_lr"] for g in t.optimizer.param_groups for p in g["params"]}


class OptimizerSteps:
    """Records every optimizer step's group learning rates (a global step pre-hook: the trainer's own
    optimizer, with nothing of the trainer replaced)."""

    def __enter__(self):
        self.lrs: list[list[float]] = []
        self.handle = register_optimizer_step_pre_hook(
            lambda opt, args, kwargs: self.lrs.append([g["lr"] for g in opt.param_groups]))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class ForwardCalls:
    """Counts the forward calls of modules by class name while gradients are enabled (training forwards
    and the recomputations of gradient checkpointing, not evaluation), counted when a call starts (a
    recomputation may stop once it has what the backward pass needs), and notes their output dtypes."""

    def __init__(self, *class_names: str):
        self.calls: dict[str, int] = {n: 0 for n in class_names}
        self.dtypes: dict[str, set] = {n: set() for n in class_names}

    def _started(self, module, args):
        name = type(module).__name__
        if name in self.calls and torch.is_grad_enabled():
            self.calls[name] += 1

    def _finished(self, module, args, output):
        name = type(module).__name__
        if name in self.dtypes and torch.is_grad_enabled() and isinstance(output, torch.Tensor):
            self.dtypes[name].add(output.dtype)

    def __enter__(self):
        self.handles = [register_module_forward_pre_hook(self._started), register_module_forward_hook(self._finished)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so that the next Accelerator may use another mixed
    precision (accelerate's own test cases do the same between tests)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


# ----------------------------------------------------------------------------- optimizer and schedule
def test_lr_schedule_warmup_cosine_and_floor(synth_root, tmp_path):
    """optim.lr, optim.warmup_steps, optim.min_lr_ratio: the learning rate of every optimizer step is
    the peak × linear warm-up, then the peak × cosine decay to min_lr_ratio at max_steps."""
    peak, warm, total, floor = 4e-3, 3, 9, 0.2
    t = trainer(synth_root, tmp_path, "lr", f"optim.lr={peak}", f"optim.warmup_steps={warm}", f"train.max_steps={total}",
                f"optim.min_lr_ratio={floor}")
    with OptimizerSteps() as seen:
        assert t.train()["step"] == total

    def expected(step: int) -> float:  # step: 0-based optimizer step
        if step < warm:
            return peak * (step + 1) / warm
        progress = (step - warm) / (total - warm)
        return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    assert len(seen.lrs) == total
    for step, lrs in enumerate(seen.lrs):
        assert lrs == pytest.approx([expected(step)] * len(lrs), rel=1e-9), step
    # chosen values by hand: a third of the peak first, the peak at the end of warm-up, half-way down
    # the cosine half-way through the decay
    assert seen.lrs[0][0] == pytest.approx(peak / 3)
    assert seen.lrs[warm][0] == pytest.approx(peak)
    assert seen.lrs[warm + 3][0] == pytest.approx(peak * (floor + (1 - floor) / 2))
    # after the last step the schedule stands at the floor (logged as train/lr)
    last = [json.loads(x) for x in (tmp_path / "lr" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == total and last["train/lr"] == pytest.approx(peak * floor)


def test_decoder_lr_gets_its_own_group(synth_root, tmp_path):
    """optim.decoder_lr: the decoder's parameters (and only they) are in groups at that learning rate."""
    t = built(synth_root, tmp_path, "declr", "optim.lr=1e-3", "optim.decoder_lr=5e-4")
    group_lr = optimizer_param_ids(t)
    decoder = {id(p) for p in t.unwrapped.parts()["decoder"]}
    assert decoder
    for name, p in t.unwrapped.named_parameters():
        assert group_lr[id(p)] == (5e-4 if id(p) in decoder else 1e-3), name
    # the schedule scales both alike
    ratios = {g["lr"] / g["initial_lr"] for g in t.optimizer.param_groups}
    assert len(ratios) == 1
    # unset: one learning rate for all
    t2 = built(synth_root, tmp_path, "declr2", "optim.lr=1e-3")
    assert set(optimizer_param_ids(t2).values()) == {1e-3}


def test_freeze_keeps_parts_fixed_and_out_of_the_optimizer(synth_root, tmp_path):
    """train.freeze: frozen parameters are not in the optimizer and do not change over training steps;
    the others do."""
    start = {k: v.clone() for k, v in built(synth_root, tmp_path, "start").unwrapped.state_dict().items()}
    t = trainer(synth_root, tmp_path, "frozen", "train.freeze=[vision, decoder]", "train.max_steps=3", "optim.lr=1e-2")
    t.train()
    model = t.unwrapped
    frozen = {id(p) for part in ("vision", "decoder") for p in model.parts()[part]}
    in_optimizer = optimizer_param_ids(t)
    changed = []
    for name, p in model.named_parameters():
        if id(p) in frozen:
            assert not p.requires_grad and id(p) not in in_optimizer, name
            assert torch.equal(p.detach(), start[name]), f"frozen {name} changed"
        else:
            assert id(p) in in_optimizer, name
            changed.append(not torch.equal(p.detach(), start[name]))
    assert sum(changed) > 0.9 * len(changed)  # nearly every trainable tensor moved (a few get no gradient)
    # the exported weights agree
    exported = load_file(str(tmp_path / "frozen" / "export" / "model.safetensors"))
    assert torch.equal(exported["vision.patch_embed.proj.weight"], start["vision.patch_embed.proj.weight"])


def test_init_from_starts_from_the_given_weights(synth_root, tmp_path):
    """run.init_from: the model starts with the given checkpoint's weights, not a fresh initialisation."""
    cfg = resolve_config(None, opts(synth_root, tmp_path, "src"))
    torch.manual_seed(1234)  # other weights than the trainer's seeded initialisation
    src = RAHF(cfg.model)
    with torch.no_grad():
        src.projection.bias.fill_(0.125)  # a value no initialisation gives
    src.save_pretrained(tmp_path / "src_ckpt")
    saved = src.state_dict()
    t = built(synth_root, tmp_path, "init", f"run.init_from={tmp_path / 'src_ckpt'}")
    got = t.unwrapped.state_dict()
    assert got.keys() == saved.keys()
    for k in saved:
        assert torch.equal(got[k], saved[k]), k
    fresh = built(synth_root, tmp_path, "fresh").unwrapped.state_dict()
    assert not torch.equal(fresh["projection.bias"], saved["projection.bias"])


def test_init_from_reads_the_data_as_the_loaded_model_does(synth_root, tmp_path, capsys):
    """run.init_from: images are normalised with the loaded model's mean/std (not the config's), the
    training config's loss weights apply, and the export carries both."""
    cfg = resolve_config(None, opts(synth_root, tmp_path, "src2", "model.vision.mean=[0.1,0.2,0.3]",
                                    "model.vision.std=[0.9,0.8,0.7]"))
    RAHF(cfg.model).save_pretrained(tmp_path / "src2_ckpt")
    t = trainer(synth_root, tmp_path, "init2", f"run.init_from={tmp_path / 'src2_ckpt'}", "model.loss.score=3.5",
                "train.max_steps=1")
    t.train()
    assert "the data follow the loaded model's vision settings (mean: " in capsys.readouterr().out
    assert (t.train_ds.mean, t.train_ds.std) == ((0.1, 0.2, 0.3), (0.9, 0.8, 0.7))
    assert t.loss_fn.cfg.score == 3.5
    exported = RAHF.from_pretrained(tmp_path / "init2" / "export").config
    assert tuple(exported.vision.mean) == (0.1, 0.2, 0.3) and exported.loss.score == 3.5


# ----------------------------------------------------------------------------- execution options
def test_bf16_mixed_precision_runs_linears_in_bf16(synth_root, tmp_path, fresh_accelerate):
    """train.mixed_precision=bf16: the training forward runs under bf16 autocast (a Linear's output is
    bf16), the weights stay float32."""
    t = trainer(synth_root, tmp_path, "bf16", "train.mixed_precision=bf16", "train.max_steps=1")
    with ForwardCalls("Linear") as seen:
        assert t.train()["step"] == 1
    assert seen.calls["Linear"] > 0 and seen.dtypes["Linear"] == {torch.bfloat16}
    assert {p.dtype for p in t.unwrapped.parameters()} == {torch.float32}
    # without the option the same forward is float32
    reset_accelerate()
    t = trainer(synth_root, tmp_path, "fp32", "train.max_steps=1")
    with ForwardCalls("Linear") as seen:
        t.train()
    assert seen.dtypes["Linear"] == {torch.float32}


@pytest.mark.parametrize("enabled", [True, False])
def test_gradient_checkpointing_recomputes_blocks_in_backward(synth_root, tmp_path, enabled):
    """train.gradient_checkpointing: the encoders' flags are set and each ViT block and T5 layer runs twice
    per training step (again in the backward pass); without it, once. (transformers checkpoints a T5
    block's inner forward, so its first sub-layer is counted.)"""
    steps = 2
    t = trainer(synth_root, tmp_path, f"gc{enabled}", f"train.gradient_checkpointing={str(enabled).lower()}",
                f"train.max_steps={steps}")
    with ForwardCalls("Block", "T5LayerSelfAttention") as seen:
        t.train()
    model = t.unwrapped
    assert model.vision.grad_checkpointing is enabled
    flag = "is_activation_checkpointing" if hasattr(model.t5, "is_activation_checkpointing") else "is_gradient_checkpointing"
    assert getattr(model.t5, flag) is enabled
    n_vit, n_t5 = len(model.vision.blocks), model.config.text.num_layers + model.config.text.num_decoder_layers
    per_step = 2 if enabled else 1
    assert seen.calls == {"Block": per_step * steps * n_vit, "T5LayerSelfAttention": per_step * steps * n_t5}


@pytest.mark.slow  # importing torch's compiler stack takes seconds
def test_compile_wraps_the_trained_model(synth_root, tmp_path):
    """train.compile: the model the trainer steps is torch.compile's module around the model it saves
    (checkpoints keep plain parameter names). Compilation itself happens at the first forward and takes
    minutes on CPU, so no step is run here."""
    from torch._dynamo.eval_frame import OptimizedModule

    t = built(synth_root, tmp_path, "compiled", "train.compile=true")
    assert isinstance(t.model, OptimizedModule) and t.model._orig_mod is t.unwrapped
    assert not isinstance(t.unwrapped, OptimizedModule)
    assert not isinstance(built(synth_root, tmp_path, "plain").model, OptimizedModule)


def test_time_limit_stops_early_and_says_so(synth_root, tmp_path):
    """train.time_limit_minutes: a run past its limit stops before max_steps, still exports, and records
    the early stop in result.json and the export's training.json."""
    t = trainer(synth_root, tmp_path, "capped", "train.time_limit_minutes=0.0001", "train.max_steps=50")
    result = t.train()
    assert 1 <= result["step"] < 50
    stop = json.loads((tmp_path / "capped" / "result.json").read_text())["stopped_early"]
    assert stop["reason"] == "time limit" and stop["step"] == result["step"] and stop["max_steps"] == 50
    assert stop["setting"] == "train.time_limit_minutes=0.0001"
    training = json.loads((tmp_path / "capped" / "export" / "training.json").read_text())
    assert training["stopped_early"]["step"] == result["step"]  # (tests/test_caps.py: every record of it)


# ----------------------------------------------------------------------------- evaluation and keep-best
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["min", "max"])
def test_eval_every_and_mode_keep_the_best_checkpoint(synth_root, tmp_path, mode):
    """eval.every: the dev split is evaluated every N steps; eval.mode with a loss as eval.metric: the
    kept (best/) and exported weights are those of the step with the lowest (min) or highest (max) value."""
    steps, every = 6, 2
    args = [a for a in opts(synth_root, tmp_path, mode, f"train.max_steps={steps}", f"eval.every={every}",
                            "eval.metric=loss/loss", f"eval.mode={mode}", f"checkpoint.every={every}",
                            "checkpoint.keep_last=10", "eval.decode=null", "eval.batch_size=16", "optim.lr=1e-2")
            if not a.startswith("data.eval_split")]
    result = Trainer(resolve_config(None, args)).train()
    run = tmp_path / mode
    dev = {r["step"]: r["loss/loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
           if r["split"] == "dev"}
    assert sorted(dev) == [2, 4, 6]
    assert len(set(dev.values())) == 3  # distinct values: min and max pick different steps
    pick = min if mode == "min" else max
    best_step = pick(dev, key=dev.get)
    assert result["best_step"] == best_step and result["best"] == pytest.approx(dev[best_step])
    kept = weights_digest(run / "best" / "model.safetensors")
    assert kept == weights_digest(run / "checkpoints" / f"step_{best_step:06d}" / "model.safetensors")
    assert weights_digest(run / "export" / "model.safetensors") == kept
    assert json.loads((run / "export" / "training.json").read_text())["step"] == best_step
