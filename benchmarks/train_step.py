"""Training-step throughput: samples/s, peak memory, FLOP/sample and MFU of one preset at one batch size.

    python benchmarks/train_step.py [--preset paper] [--batch-size 2] [--steps 3] [--dtype fp32|bf16]
        [--head repro|light|preset ...] [--device cpu|cuda] [--threads 2] [--json out.json]
        [--busy-loops 1 [--threads 2 -1] [--env - OMP_WAIT_POLICY=PASSIVE]]

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

Under load (CPU): ``--busy-loops N`` times each ``--env`` × ``--threads`` setting idle and beside N
single-threaded busy loops, in blocks of ``--steps`` steps run round-robin (see :func:`load_benchmark`;
``--threads -1`` is the trainer's adaptive count, ``train.threads=0``, started afresh in each block).
The training job's thread setting was chosen with::

    python benchmarks/train_step.py --preset tiny --batch-size 32 --optim fused --busy-loops 1 \
        --threads 2 -1 --steps 24 --repeats 2 [--env - OMP_WAIT_POLICY=PASSIVE]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
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


# ----------------------------------------------------------------------------- under load (--busy-loops)
BUSY_LOOP = "while True: pass"
OPENMP_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # read once, when torch loads OpenMP


def start_busy_loops(n: int) -> list[subprocess.Popen]:
    """``n`` single-threaded CPU-bound processes (``python -c "while True: pass"``)."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(n)]
    time.sleep(0.5 if procs else 0)  # let the scheduler spread them
    return procs


def stop_busy_loops(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait()


def parse_env(spec: str) -> dict[str, str]:
    """``-`` (the OpenMP defaults) or ``VAR=VALUE[,VAR=VALUE...]``."""
    if spec in ("-", "default", ""):
        return {}
    out = {}
    for item in spec.split(","):
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise SystemExit(f"--env: {item!r} is not VAR=VALUE")
        out[k.strip()] = v.strip()
    return out


def threads_label(n: int) -> str:
    return "auto" if n < 0 else str(n or os.cpu_count())


def serve_worker(args) -> int:
    """``--worker``: build the first configuration, then answer one JSON command per stdin line:
    ``{"threads": N, "steps": K}`` → ``{"times": [...]}``: K timed steps at N threads, or (N < 0) a
    fresh run of the trainer's adaptive thread count (``train.threads=0``), which starts at all
    cores and adapts from its own step times."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to stderr
    device = torch.device("cpu")
    h, v, c, cl, o = args.head[0], args.variant[0], args.compile[0], args.channels_last[0], args.optim[0]
    a = argparse.Namespace(**{**vars(args), "compile": bool(c), "channels_last": bool(cl), "optim": o})
    runner = Runner("worker", build_config(args.preset, h, v), a, device)
    warmed = set()
    for line in sys.stdin:
        cmd = json.loads(line)
        n = cmd["threads"]
        torch.set_num_threads(n if n > 0 else os.cpu_count() or 1)
        if n not in warmed:
            for _ in range(args.warmup):
                runner.step()
            warmed.add(n)
        controller = None
        if n < 0:
            from rahf.training.threads import AdaptiveThreads

            controller = AdaptiveThreads(os.cpu_count() or 1)
            controller.apply()
        times = []
        for _ in range(cmd["steps"]):
            t = runner.step()
            times.append(t)
            if controller is not None:
                controller.observe(t)
        protocol.write(json.dumps({"times": times}) + "\n")
    return 0


class Worker:
    """A worker process with its own OpenMP environment (parent side of :func:`serve_worker`)."""

    def __init__(self, env_spec: str, argv: list[str]):
        self.label = env_spec if env_spec not in ("", "default") else "-"
        env = {k: v for k, v in os.environ.items() if k not in OPENMP_ENV}
        env.update(parse_env(env_spec))
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv, "--worker"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def run(self, threads: int, steps: int) -> list[float]:
        self.proc.stdin.write(json.dumps({"threads": threads, "steps": steps}) + "\n")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.label} exited with status {self.proc.wait()}")
        return json.loads(line)["times"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def load_benchmark(args, argv: list[str]) -> int:
    """Samples/s of each (``--env``, ``--threads``) setting idle and beside ``--busy-loops`` busy loops.

    Every setting runs in a worker process of its own environment; the parent runs blocks of
    ``--steps`` steps round-robin (for each repeat: every setting idle, then every setting with the
    busy loops running), so that a shared machine's other load hits every setting alike. A block is
    like a short training run: samples/s is the block's samples over its time (probe steps of the
    adaptive setting included). Reported per setting: samples/s idle and loaded (all blocks), the
    median step time, loaded ÷ idle, and both ÷ the first setting's idle samples/s."""
    worker_argv = [a for a in argv if a != "--worker"]
    workers = [Worker(e, worker_argv) for e in args.env]
    settings = [(w, n) for w in workers for n in args.threads]
    times = {(w.label, n, loaded): [] for w, n in settings for loaded in (False, True)}
    print(f"{args.preset}, batch {args.batch_size}: {len(settings)} setting(s), {args.repeats} repeat(s) of "
          f"{args.steps} step(s) idle and beside {args.busy_loops} busy loop(s)", flush=True)
    try:
        for rep in range(args.repeats):
            for loaded in (False, True):
                procs = start_busy_loops(args.busy_loops if loaded else 0)
                try:
                    for w, n in settings:
                        times[(w.label, n, loaded)] += w.run(n, args.steps)
                finally:
                    stop_busy_loops(procs)
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            print(f"  repeat {rep + 1}/{args.repeats} done (1-min load {load:.2f})", flush=True)
    finally:
        for w in workers:
            w.close()
    rows = []
    for w, n in settings:
        idle, busy = times[(w.label, n, False)], times[(w.label, n, True)]
        rows.append({"env": w.label, "threads": threads_label(n),
                     "idle_samples_per_s": args.batch_size * len(idle) / sum(idle),
                     "loaded_samples_per_s": args.batch_size * len(busy) / sum(busy),
                     "idle_median_step_s": statistics.median(idle), "loaded_median_step_s": statistics.median(busy),
                     "steps_idle": idle, "steps_loaded": busy})
    first = rows[0]["idle_samples_per_s"]
    for r in rows:
        r["loaded_over_idle"] = r["loaded_samples_per_s"] / r["idle_samples_per_s"]
        r["idle_vs_first"] = r["idle_samples_per_s"] / first
        r["loaded_vs_first"] = r["loaded_samples_per_s"] / first
    print()
    print_table(rows, [("env", "environment", ""), ("threads", "threads", ""),
                       ("idle_samples_per_s", "idle samples/s", ".1f"), ("loaded_samples_per_s", "loaded samples/s", ".1f"),
                       ("idle_median_step_s", "idle median s/step", ".3f"),
                       ("loaded_median_step_s", "loaded median s/step", ".3f"),
                       ("loaded_over_idle", "loaded/idle", ".2f"), ("idle_vs_first", "idle ÷ row 1 idle", ".2f"),
                       ("loaded_vs_first", "loaded ÷ row 1 idle", ".2f")])
    write_json(args.json, {"benchmark": "train_step_under_load", "args": vars(args),
                           "machine": machine_info(torch.device("cpu")), "rows": rows})
    return 0


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
                   help="AdamW implementation(s) (foreach: torch's default; fused: one kernel per parameter, "
                        "also on CPU, as the trainer uses (optim.fused); fused-in-backward: "
                        "each parameter stepped in its gradient hook, no clipping)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, nargs="+", default=[0],
                   help="torch threads on CPU (0: all cores); several values and -1 (the trainer's adaptive "
                        "count) only with --busy-loops")
    p.add_argument("--busy-loops", type=int, default=None, metavar="N",
                   help="CPU, tiny-model scale: time every --env × --threads setting idle and beside N "
                        "single-threaded busy loops (`python -c 'while True: pass'`), round-robin; prints idle "
                        "and loaded samples/s and their ratio")
    p.add_argument("--env", nargs="+", default=["-"],
                   help="with --busy-loops: OpenMP environments, one worker process each: '-' (the defaults) or "
                        "VAR=VALUE[,VAR=VALUE], e.g. OMP_WAIT_POLICY=PASSIVE")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--target-len", type=int, default=40)
    p.add_argument("--gemm-n", type=int, default=0, help="matmul size of the peak measurement (0: auto)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (and MFU)")
    p.add_argument("--find-max-batch", action="store_true", help="also search the largest batch that fits")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.worker:
        return serve_worker(args)
    if args.busy_loops is not None:
        if args.device != "cpu":
            raise SystemExit("--busy-loops measures CPU contention: use --device cpu")
        return load_benchmark(args, list(sys.argv[1:] if argv is None else argv))
    if len(args.threads) > 1 or args.threads[0] < 0:
        raise SystemExit("several --threads values, or -1, only with --busy-loops")

    device = torch.device(args.device)
    if device.type == "cpu":
        setup_threads(args.threads[0])
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
