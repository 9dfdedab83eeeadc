"""Can a vision encoder learn shapes? Train it directly to classify the drawn shape of one-object synth
scenes and print held-out accuracy as training goes, for each ``model.vision.stem``.

    python benchmarks/shape_probe.py [--stems patch conv] [--steps 400] [--train 2000] [--test 400]
        [--threads 1] [--lr 1e-3] [--preset tiny] [--set vision.depth=6 ...] [--json out.json]

This is the check to run before a prompt-reading experiment: object, count and relation swaps can only
be learned by a model whose image tokens tell shapes apart. Each stem builds the preset's ViT
(``RAHF(config).vision``, random initialisation) and a linear classifier on its mean-pooled patch tokens,
trained with AdamW (batch 32, 50 warm-up steps, no decay) on the train split's one-object scenes
(``rahf.data.synth.make_record(..., easy_fraction=1.0)``; the label is the shape actually drawn, so
scenes drawn with a wrong shape are labelled by what they show) and evaluated on the dev split's. The
scenes are made in memory (no files); seeds are fixed, so two runs on one machine print the same
accuracies. Chance is about 0.2 (five shapes).
"""

from __future__ import annotations

import argparse
import time

import torch

from common import machine_info, print_table, setup_threads, write_json

from rahf.configtools import overrides_to_dict
from rahf.data import synth
from rahf.data.torch_data import image_to_tensor
from rahf.lexicon import SHAPES
from rahf.model.config import RAHFConfig
from rahf.model.rahf_model import RAHF


def scenes(split: str, n: int, size: int, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for i in range(n):
        rec = synth.make_record(0, split, i, size, easy_fraction=1.0)
        xs.append(image_to_tensor(rec.image, size, mean, std))
        ys.append(SHAPES.index(rec.scene.drawn[0].shape))  # one group: what was drawn, right or wrong
    return torch.stack(xs), torch.tensor(ys)


def run(cfg: RAHFConfig, xtr, ytr, xte, yte, steps: int, lr: float, every: int) -> tuple[list[dict], float]:
    torch.manual_seed(0)
    vision = RAHF(cfg).vision
    prefix = getattr(vision, "num_prefix_tokens", 1)
    head = torch.nn.Linear(vision.num_features, len(SHAPES))
    params = list(vision.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def logits(x):
        return head(vision.forward_features(x)[:, prefix:].mean(1))

    g = torch.Generator().manual_seed(0)
    curve, t_train = [], 0.0
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / 50)
        idx = torch.randint(len(ytr), (32,), generator=g)
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(logits(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        t_train += time.perf_counter() - t0
        if step % every == 0 or step == steps:
            vision.eval()
            with torch.no_grad():
                acc = torch.cat([logits(xte[i:i + 64]).argmax(1) for i in range(0, len(yte), 64)]).eq(yte)
            vision.train()
            curve.append({"step": step, "train_loss": round(loss.item(), 3), "test_acc": round(acc.float().mean().item(), 3)})
            print(f"  {cfg.vision.stem}: step {step} loss {loss.item():.3f} held-out accuracy {curve[-1]['test_acc']:.3f}",
                  flush=True)
    return curve, t_train / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stems", nargs="+", default=["patch", "conv"])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", nargs="*", default=[], help="model config overrides, e.g. vision.depth=6")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--test", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    a = p.parse_args()
    threads = setup_threads(a.threads)
    base = RAHFConfig.preset(a.preset, **overrides_to_dict(a.set))
    v = base.vision
    t0 = time.perf_counter()
    xtr, ytr = scenes("train", a.train, v.img_size, v.mean, v.std)
    xte, yte = scenes("dev", a.test, v.img_size, v.mean, v.std)
    print(f"{len(ytr)} train / {len(yte)} held-out one-object scenes in {time.perf_counter() - t0:.0f} s; "
          f"held-out majority class {torch.bincount(yte).max().item() / len(yte):.3f}; {threads} thread(s)", flush=True)
    rows, curves = [], {}
    for stem in a.stems:
        cfg = base.replace(vision={"stem": stem})
        curve, sec = run(cfg, xtr, ytr, xte, yte, a.steps, a.lr, a.every)
        curves[stem] = curve
        rows.append({"stem": stem, "steps": a.steps, "best": max(c["test_acc"] for c in curve),
                     "final": curve[-1]["test_acc"], "ms_step": round(1000 * sec, 1)})
    print_table(rows, [("stem", "stem", ""), ("steps", "steps", "d"), ("best", "held-out acc (best)", ".3f"),
                       ("final", "held-out acc (final)", ".3f"), ("ms_step", "ms/step (batch 32)", ".1f")])
    write_json(a.json, {"machine": machine_info(torch.device("cpu")), "threads": threads, "args": vars(a),
                        "rows": rows, "curves": curves})


if __name__ == "__main__":
    main()
