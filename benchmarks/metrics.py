"""Throughput of the per-map heatmap metrics (rahf.metrics) vs a straightforward AUC-Judd loop.

    python benchmarks/metrics.py [--n 1000] [--sizes 384 512] [--ref-n 20] [--json out.json]

Maps are random soft disks: the ground truth is 1-3 disks with a soft edge and zeros elsewhere
(so F = the disks); the prediction is a shifted, smoothly decaying version plus small uniform
noise, so its values are continuous (AUC-Judd thresholds are distinct). Maps are generated in
chunks (generation not timed); each metric's time per chunk is the minimum over --repeat runs. The reference is the textbook per-threshold loop: for each distinct
value t of p on F, count p >= t over all pixels (numpy); it is timed on the first --ref-n maps
and its rate extrapolated. Reports maps/s per metric, the speed-up of AUC-Judd over the
reference and the maximum absolute difference between the two.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import numpy as np
import torch

from rahf.metrics import HEATMAP_METRICS, auc_judd, cc, heatmap_metrics, kld, mse, nss, sim

FUNCS = {"mse": mse, "cc": cc, "kld": kld, "sim": sim, "nss": nss, "auc_judd": auc_judd}


def soft_disk_maps(n: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred, gt), each (n, size, size) float32 in [0, 1]."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    gt = torch.zeros(n, size, size)
    pred = torch.zeros(n, size, size)
    k = torch.randint(1, 4, (n,), generator=gen)
    for d in range(3):
        on = (d < k).float()[:, None, None]
        cy, cx = (torch.rand(2, n, 1, 1, generator=gen) * size)
        r = (0.03 + 0.07 * torch.rand(n, 1, 1, generator=gen)) * size
        amp = 0.5 + 0.5 * torch.rand(n, 1, 1, generator=gen)
        dist = torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        gt = torch.maximum(gt, on * amp * ((r - dist) / (0.3 * r)).clamp(0, 1))
        sy, sx = torch.randn(2, n, 1, 1, generator=gen) * 0.2 * r
        dist_p = torch.sqrt((yy - cy - sy) ** 2 + (xx - cx - sx) ** 2)
        pred = torch.maximum(pred, on * amp * torch.sigmoid((r - dist_p) / (0.2 * r)))
    pred = (0.97 * pred + 0.03 * torch.rand(n, size, size, generator=gen)).clamp(0, 1)
    return pred, gt


def auc_judd_loop(p: np.ndarray, g: np.ndarray) -> float:
    """Reference: one pass over all pixels per threshold (tie-aware definition)."""
    p = np.asarray(p, dtype=np.float64).ravel()
    F = np.asarray(g).ravel() > 0
    K, N = int(F.sum()), p.size
    if K == 0 or K == N:
        return float("nan")
    tpr, fpr = [0.0], [0.0]
    for t in np.unique(p[F])[::-1]:
        above = p >= t
        tp = np.count_nonzero(above & F)
        tpr.append(tp / K)
        fpr.append((np.count_nonzero(above) - tp) / (N - K))
    tpr.append(1.0)
    fpr.append(1.0)
    return float(np.trapezoid(tpr, fpr))


def bench_size(size: int, n: int, ref_n: int, chunk: int, seed: int, repeat: int) -> dict:
    gen = torch.Generator().manual_seed(seed + size)
    times = {m: 0.0 for m in (*HEATMAP_METRICS, "all")}
    ref_maps = None
    mean_k = 0.0
    done = 0
    warm_p, warm_g = soft_disk_maps(2, size, gen)
    heatmap_metrics(warm_p, warm_g)  # warm-up
    while done < n:
        b = min(chunk, n - done)
        p, g = soft_disk_maps(b, size, gen)
        mean_k += float((g > 0).flatten(1).sum(1).double().sum())
        for m, fn in (*FUNCS.items(), ("all", heatmap_metrics)):
            best = math.inf
            for _ in range(repeat):  # min over repeats: robust to other load on the machine
                t0 = time.perf_counter()
                fn(p, g)
                best = min(best, time.perf_counter() - t0)
            times[m] += best
        if ref_maps is None:
            ref_maps = (p[:ref_n].clone(), g[:ref_n].clone())
        done += b
    p, g = ref_maps
    ours = auc_judd(p, g).numpy()
    t0 = time.perf_counter()
    ref = np.array([auc_judd_loop(p[i].numpy(), g[i].numpy()) for i in range(len(p))])
    t_ref = time.perf_counter() - t0
    distinct = all(np.unique(p[i][g[i] > 0].numpy()).size == int((g[i] > 0).sum()) for i in range(len(p)))
    rates = {m: n / t for m, t in times.items()}
    ref_rate = len(p) / t_ref
    return {
        "size": size,
        "n": n,
        "mean_gt_pixels": mean_k / n,
        "maps_per_s": rates,
        "reference_auc_judd_maps_per_s": ref_rate,
        "reference_n": len(p),
        "reference_seconds": t_ref,
        "speedup_auc_judd": rates["auc_judd"] / ref_rate,
        "max_abs_diff_auc_judd": float(np.nanmax(np.abs(ours - ref))),
        "reference_thresholds_distinct": bool(distinct),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="maps per size")
    ap.add_argument("--sizes", type=int, nargs="+", default=[384, 512])
    ap.add_argument("--ref-n", type=int, default=20, help="maps timed with the reference loop")
    ap.add_argument("--chunk", type=int, default=50, help="maps generated and evaluated per call")
    ap.add_argument("--repeat", type=int, default=3, help="timing = min over this many runs per chunk")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [bench_size(s, args.n, min(args.ref_n, args.n), args.chunk, args.seed, args.repeat) for s in args.sizes]

    cols = (*HEATMAP_METRICS, "all")
    print(f"maps/s (min of {args.repeat} runs per chunk of {args.chunk}), {args.threads} threads, {args.n} maps per size (torch {torch.__version__}, numpy {np.__version__})")
    print("| size | " + " | ".join(cols) + " | ref AUC loop | AUC speed-up | max |Δ AUC| |")
    print("|---" * (len(cols) + 4) + "|")
    for r in results:
        cells = [f"{r['maps_per_s'][c]:.0f}" for c in cols]
        print(f"| {r['size']}² | " + " | ".join(cells)
              + f" | {r['reference_auc_judd_maps_per_s']:.2f} | {r['speedup_auc_judd']:.0f}× "
              f"| {r['max_abs_diff_auc_judd']:.1e} |")
    for r in results:
        print(f"{r['size']}²: mean GT pixels {r['mean_gt_pixels']:.0f}; reference on {r['reference_n']} maps "
              f"took {r['reference_seconds']:.1f} s; thresholds distinct: {r['reference_thresholds_distinct']}")
    out = {"threads": args.threads, "repeat": args.repeat, "chunk": args.chunk, "n": args.n, "torch": torch.__version__, "numpy": np.__version__,
           "machine": platform.machine(), "processor": platform.processor(), "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
