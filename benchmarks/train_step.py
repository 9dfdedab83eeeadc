"""Training-step throughput: samples/s, peak memory, FLOP/sample and MFU of one preset at one batch size.

    python benchmarks/train_step.py [--preset paper] [--batch-size 2] [--steps 3] [--dtype fp32|bf16]
        [--head repro|light|preset ...] [--device cpu|cuda] [--threads 2] [--json out.json]

A step is what the trainer does: forward (under bf16 autocast with ``--dtype bf16``) → RAHFLoss →
backward → gradient clipping (1.0) → AdamW step → zero_grad. Inputs are random tensors built directly
(random token ids in the preset's vocabulary, random images and soft maps; no tokenizer, no data).

FLOPs per sample: torch.utils.flop_counter.FlopCounterMode over one forward+loss+backward (the
optimizer's element-wise work is not counted), broken down by module. MFU = achieved FLOP/s over a
GEMM peak measured in the same run on the same device and dtype (an n×n fp32/bf16 matmul).

Several ``--head`` values (or ``--variant``/``--compile`` lists) build one model each and time them
round-robin (A/B/A/B, best of ``--repeats``), so that a shared machine's contention hits all of them
alike. Peak memory: with one configuration, the process's peak (CPU: VmHWM over the steps, which
includes weights and optimizer state; CUDA: max_memory_allocated). With several, each row's peak is
estimated as its own state (parameters + gradients + AdamW moments) plus the transient peak over the
memory in use before its steps, since the other models' memory is resident too.

``--find-max-batch`` (CUDA) doubles the batch from ``--batch-size`` until out of memory and reports
the largest that fits (one step each).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (PeakMemory, autocast, count_flops, gemm_peak, machine_info, print_table,  # noqa: E402
                               setup_threads, sync, write_json)
from rahf.model import RAHF  # noqa: E402
from rahf.model.config import HEAD_STYLES, RAHFConfig  # noqa: E402
from rahf.model.loss import RAHFLoss  # noqa: E402
from rahf.schema import MAP_NAMES, TASKS  # noqa: E402

FLOP_GROUPS = {
    "vision": ("vision", "projection"),
    "t5 encoder": ("t5.encoder",),
    "decoder": ("t5.decoder", "t5.lm_head"),
    "heatmap heads": ("heatmap_heads", "heatmap_head"),
    "score heads": ("score_heads", "score_head"),
}


def build_config(preset: str, head: str, variant: str) -> RAHFConfig:
    over = {"variant": variant}
    if head != "preset":
        over.update(HEAD_STYLES[head])
    cfg = RAHFConfig.preset(preset, **over)
    if cfg.text.vocab_size is None:  # the tiny preset takes its vocabulary from the built-in tokenizer
        cfg = RAHFConfig.preset(preset, **{**over, "text": {"vocab_size": 4096}})
    return cfg


def make_batch(cfg: RAHFConfig, batch: int, prompt_len: int, target_len: int, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    V, S, H = cfg.text.vocab_size, cfg.vision.img_size, cfg.heatmap_size
    b = {
        "pixel_values": torch.randn(batch, 3, S, S, generator=g),
        "input_ids": torch.randint(2, V, (batch, prompt_len), generator=g),
        "attention_mask": torch.ones(batch, prompt_len, dtype=torch.long),
        "labels": torch.randint(2, V, (batch, target_len), generator=g),
        "scores": torch.rand(batch, 4, generator=g),
    }
    for m in MAP_NAMES:
        b[f"{m}_map"] = torch.rand(batch, H, H, generator=g).pow(8)  # mostly near zero, some high
    if cfg.variant == "augmented_prompt":
        b["task_ids"] = torch.randint(2, V, (len(TASKS), 4), generator=g)
        b["task_mask"] = torch.ones(len(TASKS), 4, dtype=torch.long)
    return {k: v.to(device) for k, v in b.items()}


MODEL_KEYS = ("pixel_values", "input_ids", "attention_mask", "labels", "task_ids", "task_mask")


class _NoOpOptimizer:
    """Stands in for the optimizer when the per-parameter optimizers step inside backward."""

    def __init__(self, opts):
        self.opts = opts

    def step(self):
        pass

    def zero_grad(self, set_to_none=True):
        pass


class Runner:
    """One configuration: model, optimizer, loss, batch; ``step()`` is one training step."""

    def __init__(self, name: str, cfg: RAHFConfig, args, device):
        self.name, self.cfg, self.args, self.device = name, cfg, args, device
        torch.manual_seed(0)
        self.model = RAHF(cfg).to(device)
        self.model.train()
        self.model.set_channels_last(args.channels_last)
        if args.grad_ckpt:
            self.model.set_gradient_checkpointing(True)
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.in_backward = args.optim == "fused-in-backward"
        if self.in_backward:
            # one fused AdamW per parameter, stepped as soon as its gradient is accumulated, which is
            # then freed: the step never holds all gradients at once (no global gradient clipping)
            opts = {p: torch.optim.AdamW([p], lr=1e-5, weight_decay=0.01 if p.ndim >= 2 else 0.0, fused=True)
                    for p in self.model.parameters()}

            def hook(p):
                opts[p].step()
                opts[p].zero_grad(set_to_none=True)

            for p in self.model.parameters():
                p.register_post_accumulate_grad_hook(hook)
            self.opt = _NoOpOptimizer(opts)
        else:
            kw = {"fused": True} if args.optim == "fused" else {"foreach": args.optim == "foreach"}
            self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                          {"params": no_decay, "weight_decay": 0.0}], lr=1e-5, **kw)
        self.loss_fn = RAHFLoss(cfg.loss)
        self.batch = make_batch(cfg, args.batch_size, args.prompt_len, args.target_len, device)
        self.inputs = {k: self.batch[k] for k in MODEL_KEYS if k in self.batch}
        self.fwd = torch.compile(self.model) if args.compile else self.model
        self.times: list[float] = []
        self.mem = None
        self.n_params = sum(p.numel() for p in self.model.parameters())

    def forward_backward(self) -> torch.Tensor:
        with autocast(self.device, self.args.dtype):
            out = self.fwd(**self.inputs)
        loss = self.loss_fn(out, self.batch)["loss"]
        loss.backward()
        return loss.detach()

    def step(self) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        loss = self.forward_backward()
        if not self.in_backward:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{self.name}: non-finite loss")
        return time.perf_counter() - t0

    def state_bytes(self) -> int:
        """Parameters + gradients + AdamW moments (the memory a step holds besides activations)."""
        n = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return 4 * n

    def count(self) -> tuple[int, int, dict]:
        """(forward+backward FLOPs, forward FLOPs, forward FLOPs by module group) of one step's batch.
        The breakdown is of the forward pass: FlopCounterMode's module attribution of backward ops is
        not reliable, and backward costs ≈ 2× forward per module that has trainable weights."""
        from torch.utils.flop_counter import FlopCounterMode

        model, batch, inputs = self.fwd, self.batch, self.inputs
        self.fwd = self.model  # count the eager graph (FlopCounterMode and compile do not mix well)
        # every op is per-sample, so FLOPs/sample do not depend on the batch: count one sample (cheaper)
        self.batch = {k: v if k in ("task_ids", "task_mask") else v[:1] for k, v in batch.items()}
        self.inputs = {k: self.batch[k] for k in MODEL_KEYS if k in self.batch}
        try:
            fc = FlopCounterMode(display=False)
            with fc:
                self.forward_backward()
            self.opt.zero_grad(set_to_none=True)
            total = int(fc.get_total_flops())

            def fwd():
                with torch.no_grad(), autocast(self.device, self.args.dtype):
                    self.loss_fn(self.model(**self.inputs), self.batch)

            fwd_total, per = count_flops(fwd, "RAHF", FLOP_GROUPS)
        finally:
            self.fwd, self.batch, self.inputs = model, batch, inputs
        return total, fwd_total, per

    def head_gflops(self) -> dict:
        """Forward GFLOP per image of one heatmap head and one score head."""
        from torch.utils.flop_counter import FlopCounterMode

        m = self.model
        hh = m.heatmap_heads[MAP_NAMES[0]] if hasattr(m, "heatmap_heads") else m.heatmap_head
        sh = next(iter(m.score_heads.values())) if hasattr(m, "score_heads") else m.score_head
        x = torch.randn(1, self.cfg.text.d_model, m.grid, m.grid, device=self.device)
        out = {}
        for k, h in (("heatmap_head_gflop_fwd", hh), ("score_head_gflop_fwd", sh)):
            fc = FlopCounterMode(display=False)
            with torch.no_grad(), fc:
                h(x)
            out[k] = fc.get_total_flops() / 1e9
        out["heatmap_head_params_m"] = sum(p.numel() for p in hh.parameters()) / 1e6
        out["score_head_params_m"] = sum(p.numel() for p in sh.parameters()) / 1e6
        return out


def find_max_batch(cfg, args, device, start: int, limit: int = 4096) -> int:
    """Doubling search: the largest batch (start·2^k) for which one training step fits in memory."""
    best, b = 0, start
    while b <= limit:
        r = None
        try:
            a = argparse.Namespace(**{**vars(args), "batch_size": b, "compile": False,
                                      "channels_last": bool(args.channels_last[0]), "optim": args.optim[0]})
            r = Runner("probe", cfg, a, device)
            r.step()
            best = b
            print(f"  batch {b}: fits", flush=True)
        except torch.OutOfMemoryError:
            print(f"  batch {b}: out of memory", flush=True)
            break
        finally:
            del r
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        b *= 2
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="paper")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (AdamW state, allocator, compile)")
    p.add_argument("--repeats", type=int, default=1, help="round-robin repeats over the configurations")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast (weights stay fp32)")
    p.add_argument("--head", nargs="+", default=["preset"], choices=["preset", *HEAD_STYLES],
                   help="head style(s): the preset's own, or a named style from rahf.model.config.HEAD_STYLES")
    p.add_argument("--variant", nargs="+", default=["multi_head"], choices=("multi_head", "augmented_prompt"))
    p.add_argument("--compile", nargs="+", type=int, default=[0], choices=(0, 1), help="torch.compile the model")
    p.add_argument("--channels-last", nargs="+", type=int, default=[1], choices=(0, 1),
                   help="heads on channels-last activations (1, the model's default) or NCHW (0)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing of ViT and T5")
    p.add_argument("--optim", nargs="+", choices=("foreach", "fused", "loop", "fused-in-backward"),
                   default=["foreach"],
                   help="AdamW implementation(s) (foreach: torch's default, as the trainer uses; fused: one "
                        "kernel per parameter, also on CPU; fused-in-backward: "
                        "each parameter stepped in its gradient hook, no clipping)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: all cores)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--target-len", type=int, default=40)
    p.add_argument("--gemm-n", type=int, default=0, help="matmul size of the peak measurement (0: auto)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (and MFU)")
    p.add_argument("--find-max-batch", action="store_true", help="also search the largest batch that fits")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        setup_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    combos = [(h, v, c, cl, o) for h in args.head for v in args.variant for c in args.compile
              for cl in args.channels_last for o in args.optim]
    runners = []
    for h, v, c, cl, o in combos:
        cfg = build_config(args.preset, h, v)
        name = (f"{args.preset}/{h}/{v}" + ("/compile" if c else "") + ("" if cl else "/nchw")
                + ("" if o == "foreach" else f"/{o}"))
        a = argparse.Namespace(**{**vars(args), "compile": bool(c), "channels_last": bool(cl), "optim": o})
        runners.append(Runner(name, cfg, a, device))
        print(f"built {name}: {runners[-1].n_params / 1e6:.1f} M parameters, heatmap {cfg.heatmap_size}²", flush=True)

    single = len(runners) == 1
    for r in runners:  # warm-up (and peak memory)
        with PeakMemory(device) as pm:
            for _ in range(args.warmup):
                r.step()
            if single:  # also time here: a single configuration needs no round-robin
                for _ in range(args.steps):
                    r.times.append(r.step())
        r.mem = pm  # (with several configurations, the warm-up's peak also holds the new AdamW state: not used)
    for _ in range(max(args.repeats if not single else args.repeats - 1, 0 if single else 1)):
        for r in runners:
            with PeakMemory(device) as pm:
                for _ in range(args.steps):
                    r.times.append(r.step())
            r.transient = max(getattr(r, "transient", 0), pm.delta)
            print(f"  {r.name}: best {min(r.times):.3f} s/step", flush=True)

    peak = gemm_peak(device, torch.bfloat16 if args.dtype == "bf16" else torch.float32, args.gemm_n)
    print(f"GEMM peak ({peak['dtype']}, n={peak['n']}): {peak['flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)

    rows = []
    for r in runners:
        t = min(r.times)
        row = {"config": r.name, "batch_size": args.batch_size, "dtype": args.dtype, "step_s": t,
               "step_s_median": sorted(r.times)[len(r.times) // 2], "samples_per_s": args.batch_size / t,
               "params_m": r.n_params / 1e6, "heatmap_size": r.cfg.heatmap_size}
        if single:
            row["peak_mem_gb"] = r.mem.peak / 1e9
            row["peak_mem_delta_gb"] = r.mem.delta / 1e9
        else:
            row["peak_mem_gb"] = (r.state_bytes() + r.transient) / 1e9
            row["peak_mem_estimated"] = True
        row.update(r.head_gflops())
        if not args.no_flops:
            total, fwd_total, per = r.count()
            row["gflop_per_sample"] = total / 1e9
            row["gflop_per_sample_fwd"] = fwd_total / 1e9
            row["gflop_per_sample_fwd_by_module"] = {k: v / 1e9 for k, v in per.items()}
            row["achieved_gflop_s"] = total * args.batch_size / t / 1e9
            row["mfu"] = total * args.batch_size / t / peak["flops_per_s"]
        rows.append(row)

    print()
    print_table(rows, [("config", "config", ""), ("step_s", "s/step", ".3f"), ("samples_per_s", "samples/s", ".3f"),
                       ("peak_mem_gb", "peak GB", ".2f"), ("gflop_per_sample", "GFLOP/sample", ".1f"),
                       ("achieved_gflop_s", "GFLOP/s", ".1f"), ("mfu", "MFU", ".1%"),
                       ("heatmap_head_gflop_fwd", "GFLOP/head/img fwd", ".2f")])
    if not args.no_flops:
        print("\nForward GFLOP per sample by module (a training step costs ≈ 3× forward):")
        groups = list(rows[0]["gflop_per_sample_fwd_by_module"])
        print_table([{"config": r["config"], "total": r["gflop_per_sample_fwd"], **r["gflop_per_sample_fwd_by_module"]}
                     for r in rows], [("config", "config", ""), ("total", "forward", ".2f")]
                    + [(g, g, ".2f") for g in groups])
    result = {"benchmark": "train_step", "args": vars(args), "machine": machine_info(device), "gemm_peak": peak,
              "rows": rows}
    if args.find_max_batch and device.type != "cuda":
        print("\n--find-max-batch: skipped on CPU (nothing runs out of memory there; it only swaps)")
    elif args.find_max_batch:
        for r in runners:
            del r.model, r.opt, r.fwd
        runners.clear()
        gc.collect()
        cfg = build_config(args.preset, args.head[0], args.variant[0])
        print("\nlargest batch that fits (doubling):")
        result["max_batch"] = find_max_batch(cfg, args, device, args.batch_size)
        print(f"max batch: {result['max_batch']}")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
