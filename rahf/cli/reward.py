"""``rahf cbm fit|apply|experiment``, ``rahf textnorm`` and ``rahf ensemble``.

Models are loaded through :class:`rahf.eval.scorer.RAHFScorer`; the math lives in :mod:`rahf.reward.cbm`,
:mod:`rahf.reward.textnorm` and :mod:`rahf.reward.ensemble`.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path
from typing import Mapping

import numpy as np

from .._extras import require
from ..schema import SCORE_NAMES, load_image, misaligned_words
from .common import (add_batch_size, add_data, add_decode, add_device, add_dtype, add_model_args, decode_mode,
                     scorer_from_args)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _ints(s: str) -> list:
    return [x if x == "all" else int(x) for x in s.split(",") if x]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def _records(root: str, split: str, limit: int | None = None):
    """(entries, image paths) of a split in the package's format."""
    from ..data.format import open_dataset

    ds = open_dataset(root, split)
    n = len(ds) if not limit else min(limit, len(ds))
    return ds.entries[:n], [str(ds.path(i, "image")) for i in range(n)]


def _write_json(path: str | Path, obj) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, default=float) + "\n")


# ----------------------------------------------------------------------------------------------
# rahf cbm fit / apply
# ----------------------------------------------------------------------------------------------
def _checkpoint_rows(args, split: str):
    """Stage-1 attribute rows (+ ground-truth scores) and embeddings of a dataset split."""
    from ..reward.cbm import rahf_attributes

    entries, paths = _records(args.data, split, args.limit)
    scorer = getattr(args, "_scorer", None) or scorer_from_args(args)
    args._scorer = scorer  # loaded once for both splits
    t0 = time.perf_counter()
    decode = decode_mode(args.decode)
    results = scorer.score(paths, [e["prompt"] for e in entries], batch_size=args.batch_size, decode=decode)
    rows = []
    for e, r in zip(entries, results):
        row = {"uid": e["uid"], **rahf_attributes(r)}
        row.update({f"true_{k}": float(v) for k, v in e["scores"].items()})
        rows.append(row)
    emb = scorer.embed(paths, [e["prompt"] for e in entries], batch_size=args.batch_size)
    _log(f"{split}: scored and embedded {len(rows)} records in {time.perf_counter() - t0:.1f} s")
    return rows, np.asarray(emb, dtype=np.float64)


def _target_column(args) -> str:
    return f"true_{args.target}" if args.checkpoint else args.target


def _default_features(rows, args) -> list[str]:
    if args.features:
        return [f for f in args.features.split(",") if f]
    if args.checkpoint:
        from ..reward.cbm import RAHF_ATTRIBUTES

        # the predicted score named like the target would make the bottleneck trivial: leave it out
        return [f for f in RAHF_ATTRIBUTES if f != args.target]
    raise SystemExit("--features is required with --table")


def cmd_cbm_fit(args) -> int:
    from ..reward.cbm import binarize, fit_aggregator, format_curve_table, learning_curve, plot_curves, read_table
    from ..eval.metrics import roc_auc

    require("matplotlib", extra="report", purpose="the learning-curve plot")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    emb_fit = emb_eval = None
    if args.checkpoint:
        if not args.data:
            raise SystemExit("--checkpoint needs --data")
        fit_rows, emb_fit = _checkpoint_rows(args, args.split)
        eval_rows, emb_eval = _checkpoint_rows(args, args.eval_split)
        for name, rows, emb in (("fit", fit_rows, emb_fit), ("eval", eval_rows, emb_eval)):
            with open(out / f"attributes_{name}.jsonl", "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
            np.save(out / f"embeddings_{name}.npy", emb)
    elif args.table:
        rows = read_table(args.table)
        if args.eval_table:
            fit_rows, eval_rows = rows, read_table(args.eval_table)
            if args.embeddings:
                emb_fit, emb_eval = np.load(args.embeddings), np.load(args.eval_embeddings)
        else:
            perm = np.random.default_rng(args.seed).permutation(len(rows))
            n_eval = max(1, int(round(args.holdout * len(rows))))
            ev, fi = perm[:n_eval], perm[n_eval:]
            fit_rows, eval_rows = [rows[i] for i in fi], [rows[i] for i in ev]
            if args.embeddings:
                E = np.load(args.embeddings)
                emb_fit, emb_eval = E[fi], E[ev]
    else:
        raise SystemExit("give --checkpoint CK --data DIR, or --table FILE")
    feats = _default_features(fit_rows, args)
    col = _target_column(args)
    X = np.array([[float(r[f]) for f in feats] for r in fit_rows])
    Xe = np.array([[float(r[f]) for f in feats] for r in eval_rows])
    yv = np.array([float(r[col]) for r in fit_rows])
    yev = np.array([float(r[col]) for r in eval_rows])
    thr = args.threshold
    if thr is None and set(np.unique(np.r_[yv, yev])) <= {0.0, 1.0}:
        y, ye, t = yv.astype(int), yev.astype(int), 0.5
    else:
        y, t = binarize(yv, thr or "median")
        ye, _ = binarize(yev, t)
    target = {"name": args.target, "threshold": t, "rule": ">="}
    agg = fit_aggregator(X, y, feats, l2=args.l2, target=target)
    auc = roc_auc(agg.decision_function(Xe), ye)
    agg.metrics = {"roc_auc_eval": auc, "n_fit": int(y.size), "n_eval": int(ye.size),
                   "positive_rate_fit": float(y.mean()), "positive_rate_eval": float(ye.mean())}
    agg.save(out / "aggregator.json")
    curve = learning_curve(X, y, Xe, ye, emb_fit, emb_eval, budgets=args.budgets, seeds=args.seeds,
                           l2_cbm=args.l2, l2_coarse=args.l2_coarse, seed=args.seed)
    _write_json(out / "learning_curve.json", curve)
    plot_curves(curve, out / "learning_curve.png", title=f"target {args.target} >= {t:.3g}: aggregator vs coarse")
    lines = [f"target: {args.target} >= {t:.4g} (positive rate fit {y.mean():.2f}, eval {ye.mean():.2f}); "
             f"{y.size} fit rows, {ye.size} eval rows", "",
             "| attribute | weight (standardised) |", "|---|---|"]
    lines += [f"| {f} | {w:+.3f} |" for f, w in agg.ranked_weights()]
    lines += ["", f"aggregator ROC-AUC (all fit rows, eval): {auc:.3f}", "", format_curve_table(curve)]
    report = "\n".join(lines)
    (out / "report.md").write_text(report + "\n")
    print(report)
    print(f"\nwrote {out}/aggregator.json, learning_curve.json/.png, report.md")
    return 0


def cmd_cbm_apply(args) -> int:
    from ..reward.cbm import Aggregator, read_table

    agg = Aggregator.load(args.model)
    if args.table:
        rows = read_table(args.table)
    elif args.checkpoint and args.data:
        rows, _ = _checkpoint_rows(args, args.split)
    else:
        raise SystemExit("give --table FILE, or --checkpoint CK --data DIR")
    logit = agg.decision_function(rows)
    prob = 1.0 / (1.0 + np.exp(-logit))
    f = open(args.out, "w") if args.out else sys.stdout
    try:
        for r, z, p in zip(rows, logit, prob):
            o = {k: r[k] for k in ("uid", "id") if k in r}
            o.update({"cbm_logit": float(z), "cbm_prob": float(p)})
            f.write(json.dumps(o) + "\n")
    finally:
        if f is not sys.stdout:
            f.close()
    _log(f"scored {len(rows)} rows" + (f" -> {args.out}" if args.out else ""))
    return 0


# ----------------------------------------------------------------------------------------------
# rahf cbm experiment
# ----------------------------------------------------------------------------------------------
def cmd_cbm_experiment(args) -> int:
    from ..reward.cbm import (SYNTH_ATTRIBUTES, TREES, controlled_experiment, format_interval_table, image_features,
                              plot_curves, regenerate_synth, synth_attributes, verdicts)
    from ..data.format import read_manifest

    require("matplotlib", extra="report", purpose="the experiment plot")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tree = TREES[args.tree]
    data = {}
    for split in (args.train_split, args.eval_split):
        entries = read_manifest(Path(args.data) / split)[: args.limit or None]
        t0 = time.perf_counter()
        recs = regenerate_synth(args.data, split, entries)
        attrs = {n: np.array([synth_attributes(r, args.aesthetics_threshold)[n] for r in recs]) for n in SYNTH_ATTRIBUTES}
        if args.checkpoint:
            scorer = getattr(args, "_scorer", None) or scorer_from_args(args)
            args._scorer = scorer
            feats = np.asarray(scorer.embed([r.image for r in recs], [r.prompt for r in recs],
                                            batch_size=args.batch_size), dtype=np.float64)
        else:
            feats = np.stack([image_features(r.image) for r in recs])
        data[split] = (feats, attrs)
        _log(f"{split}: {len(recs)} records, features {feats.shape[1]}-d, {time.perf_counter() - t0:.1f} s")
    (F, A), (Fe, Ae) = data[args.train_split], data[args.eval_split]
    res = {"features": "scorer.embed" if args.checkpoint else "image_features",
           "attribute_rates": {n: float(A[n].mean()) for n in A}, "axes": {}}
    parts = []
    for axis, budgets in (("images", args.budgets), ("cost", args.cost_budgets)):
        if not budgets:
            continue
        t0 = time.perf_counter()
        r = controlled_experiment(F, A, Fe, Ae, tree, budgets=budgets, seeds=args.seeds, l2_features=args.l2_features,
                                  l2_cbm=args.l2, seed=args.seed, training=args.training, capacity=args.capacity,
                                  hidden=args.hidden, axis=axis, attribute_cost=args.attribute_cost,
                                  replicates=args.replicates)
        _log(f"{axis} axis: {time.perf_counter() - t0:.1f} s")
        res["axes"][axis] = r
        res.update({k: r[k] for k in ("sets", "positive_rate", "tree")})
        if axis == "images":
            plot_curves(r, out / "experiment.png", title=f"tree: {tree.text}")
        lines = verdicts(r)
        title = ("labelled images (the same rows for every model)" if axis == "images" else
                 f"labelling cost (a coarse label costs 1, an attribute label {args.attribute_cost:g}; n = images used)")
        parts.append(f"### ROC-AUC by {title}; mean over draws [paired bootstrap 95% interval]\n\n"
                     + format_interval_table(r) + "\n\nverdict (only where the interval of the difference excludes 0):\n"
                     + ("\n".join("- " + v for v in lines) if lines else "- none: every CBM is within noise of coarse"))
    head = (f"target tree ({tree.name}): {tree.text}\npositive rate fit {res['positive_rate']['fit']:.2f}, eval "
            f"{res['positive_rate']['eval']:.2f}; features: {res['features']}; {args.seeds} draws per budget; "
            f"stage-2 training: {args.training}; stage 1 and coarse: {args.capacity}"
            + (f" ({args.hidden} hidden units)" if args.capacity == "mlp" else "") + "\nattribute sets: "
            + "; ".join(f"{k} = {','.join(v)}" for k, v in res["sets"].items()))
    _write_json(out / "experiment.json", res)
    text = head + "\n\n" + "\n\n".join(parts)
    (out / "experiment.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {out}/experiment.json, experiment.png, experiment.md")
    return 0


# ----------------------------------------------------------------------------------------------
# rahf textnorm / rahf ensemble
# ----------------------------------------------------------------------------------------------
def _generator(args):
    from ..reward.textnorm import FileContrasts, SwapContrast

    if args.contrast_file:
        return FileContrasts(args.contrast_file)
    if args.generator:
        mod, _, name = args.generator.partition(":")
        return getattr(importlib.import_module(mod), name or "generate")
    kinds = [k for k in args.kinds.split(",") if k]
    return SwapContrast(args.vocab, kinds=kinds, max_contrasts=args.max_contrasts, seed=args.seed)


def _contrast_rewards(scorer, images, prompts, contrasts, score: str, batch_size: int):
    """(N,) rewards of the prompts and (N, K) of their contrasts (NaN padding)."""
    from ..reward.textnorm import pad_contrasts

    flat_img, flat_p = [], []
    for im, p, cs in zip(images, prompts, contrasts):
        for q in [p, *cs]:
            flat_img.append(im)
            flat_p.append(q)
    res = scorer.score(flat_img, flat_p, batch_size=batch_size, decode=None)
    vals = np.array([float(r.scores[score] if hasattr(r, "scores") else r["scores"][score]) for r in res])
    raw, con, pos = np.empty(len(prompts)), [], 0
    for i, cs in enumerate(contrasts):
        raw[i] = vals[pos]
        con.append(vals[pos + 1: pos + 1 + len(cs)])
        pos += 1 + len(cs)
    return raw, pad_contrasts(con)


def _load_pairs(args, split: str):
    """Pairs of a split: entries, images, prompts, labels (1 = aligned), contrast sets restricted by
    ``--fixed-k`` (``[]`` for excluded pairs) and the mask of kept pairs."""
    from ..reward.textnorm import contrast_sets, restrict_contrasts

    entries, paths = _records(args.data, split, args.limit)
    prompts = [e["prompt"] for e in entries]
    labels = np.array([int(not misaligned_words(e["tagged_prompt"])) for e in entries])  # 1 = aligned
    images = [load_image(p, e["uid"]) for p, e in zip(paths, entries)]
    contrasts, keep = restrict_contrasts(contrast_sets(prompts, _generator(args), [e["uid"] for e in entries]),
                                         args.fixed_k)
    _log(f"{split}: {len(prompts)} pairs, {int(keep.sum())} with contrasts, {int((~keep).sum())} excluded "
         f"({'fewer than ' + str(args.fixed_k) if args.fixed_k else 'none'} contrasts)")
    return {"split": split, "entries": entries, "images": images, "prompts": prompts, "labels": labels,
            "contrasts": contrasts, "keep": keep}


def _splits(args) -> list[str]:
    return [args.split] if not args.dev_split or args.dev_split == "none" else [args.dev_split, args.split]


def _counts(d) -> dict:
    k = d["keep"]
    return {"pairs": int(k.size), "kept": int(k.sum()), "excluded": int((~k).sum()),
            "positives_kept": int(d["labels"][k].sum()),
            "contrasts_per_kept_pair": float(np.mean([len(c) for c, x in zip(d["contrasts"], k) if x])) if k.any() else 0.0}


def cmd_textnorm(args) -> int:
    from ..eval.metrics import ranking_metrics
    from ..reward.textnorm import format_metric_table, select_tau, textnorm

    splits = _splits(args)
    if len(splits) == 1 and len(args.tau) != 1:
        raise SystemExit("without --dev-split give one --tau (tau is chosen on the dev split, not on the test split)")
    data = {s: _load_pairs(args, s) for s in splits}
    scorer = scorer_from_args(args)
    for d in data.values():
        t0 = time.perf_counter()
        d["raw"], d["con"] = _contrast_rewards(scorer, d["images"], d["prompts"], d["contrasts"], args.score,
                                               args.batch_size)
        _log(f"{d['split']}: scored {len(d['prompts'])} pairs + {sum(map(len, d['contrasts']))} contrasts in "
             f"{time.perf_counter() - t0:.1f} s")
    ks = args.ks
    dev, test = (data[splits[0]], data[splits[-1]]) if len(splits) == 2 else (None, data[splits[0]])
    for d in data.values():
        if not d["keep"].any():
            raise SystemExit(f"{d['split']}: no pair has contrasts; nothing to normalise")
    if dev is not None:
        tau, sweep = select_tau(dev["raw"], dev["con"], dev["labels"], args.tau, args.select_metric, ks)
    else:
        tau, sweep = float(args.tau[0]), {}
    k = test["keep"]
    tn = textnorm(test["raw"], test["con"], tau)
    rows = {f"raw {args.score} (all pairs)": ranking_metrics(test["raw"], test["labels"], ks),
            f"raw {args.score} (kept pairs)": ranking_metrics(test["raw"][k], test["labels"][k], ks),
            f"textnorm tau={tau:g} (kept pairs)": ranking_metrics(tn[k], test["labels"][k], ks)}
    c = _counts(test)
    head = (f"test split {test['split']!r}: {c['pairs']} pairs, {c['kept']} kept ({c['positives_kept']} aligned = "
            f"positive class), {c['excluded']} excluded for lack of contrasts; {c['contrasts_per_kept_pair']:.1f} "
            f"contrasts per kept pair; score {args.score!r}; tau {tau:g} "
            + (f"chosen on {dev['split']!r} by {args.select_metric}" if dev is not None else "given"))
    text = head + "\n\n" + format_metric_table(rows)
    if sweep:
        text += f"\n\ntau sweep on the dev split ({_counts(dev)['kept']} kept pairs):\n\n" + format_metric_table(
            {f"tau={t:g}": m for t, m in sweep.items()})
    print(text)
    result = {"checkpoint": args.checkpoint, "data": args.data, "split": test["split"],
              "dev_split": dev["split"] if dev is not None else None, "score": args.score, "tau": tau,
              "select_metric": args.select_metric, "fixed_k": args.fixed_k, "counts": c,
              "dev_counts": _counts(dev) if dev is not None else None,
              "dev_sweep": {f"{t:g}": m for t, m in sweep.items()}, "metrics": rows}
    if args.out:
        _write_json(args.out, result)
        _log(f"wrote {args.out}")
    if args.examples:
        p = Path(args.examples)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "w") as f:
            for i, e in enumerate(test["entries"]):
                cr = test["con"][i][~np.isnan(test["con"][i])]
                f.write(json.dumps({"uid": e["uid"], "prompt": test["prompts"][i], "label": int(test["labels"][i]),
                                    "included": bool(k[i]), "raw": float(test["raw"][i]),
                                    "textnorm": float(tn[i]) if k[i] else None, "tau": tau,
                                    "contrasts": test["contrasts"][i], "contrast_rewards": cr.tolist()}) + "\n")
        _log(f"wrote {p}")
    return 0


def _member_rewards(args, spec: str, data: Mapping[str, dict]):
    """(name, {split: (raw (N,), contrast (N, K))}) of one ensemble member: a reward table (JSONL by
    uid) or a checkpoint scored here."""
    from ..reward.ensemble import read_reward_table
    from ..reward.textnorm import pad_contrasts

    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec.rstrip("/")).name or spec, spec
    out = {}
    if path.endswith((".jsonl", ".json", ".ndjson")):
        table = read_reward_table(path)
        for s, d in data.items():
            uids = [e["uid"] for e in d["entries"]]
            missing = [u for u in uids if u not in table]
            if missing:
                raise SystemExit(f"member {name} ({path}) has no reward for {len(missing)} pairs of {s}, e.g. "
                                 f"{missing[0]!r}")
            raw = np.array([table[u][0] for u in uids])
            con = pad_contrasts([table[u][1] or [] for u in uids])
            out[s] = (raw, con)
    else:
        scorer = scorer_from_args(args, path)
        for s, d in data.items():
            t0 = time.perf_counter()
            cs = [[] for _ in d["contrasts"]] if args.no_textnorm else d["contrasts"]
            out[s] = _contrast_rewards(scorer, d["images"], d["prompts"], cs, args.score, args.batch_size)
            _log(f"{name} = {path}: scored {s} in {time.perf_counter() - t0:.1f} s")
        del scorer
    return name, out


def cmd_ensemble(args) -> int:
    from ..reward.ensemble import ensemble_report, ensemble_rewards, select_lambda
    from ..reward.textnorm import format_metric_table, select_tau, textnorm

    splits = _splits(args)
    if len(splits) == 1 and (len(args.lam) != 1 or len(args.tau) != 1):
        raise SystemExit("without --dev-split give one --lam and one --tau (they are chosen on the dev split)")
    data = {s: _load_pairs(args, s) for s in splits}
    names, per = [], {s: ([], []) for s in splits}
    for spec in args.members:
        name, r = _member_rewards(args, spec, data)
        if name in names:
            raise SystemExit(f"two members named {name!r}: name them NAME=PATH")
        names.append(name)
        for s in splits:
            per[s][0].append(r[s][0])
            per[s][1].append(r[s][1])
    stacked = {}
    for s in splits:
        K = max(c.shape[1] for c in per[s][1])
        con = np.stack([np.pad(c, ((0, 0), (0, K - c.shape[1])), constant_values=np.nan) for c in per[s][1]])
        keep = np.ones(con.shape[1], bool) if args.no_textnorm else (~np.isnan(con)).any(axis=2).all(axis=0)
        stacked[s] = (np.stack(per[s][0]), con, keep)
    dev, test = (splits[0], splits[-1]) if len(splits) == 2 else (None, splits[0])
    for s in splits:
        if not stacked[s][2].any():
            raise SystemExit(f"{s}: no pair has contrasts from every member")
    # per-member tau and lambda on dev (kept pairs only)
    choice: dict = {}
    if dev is not None:
        R, C, k = stacked[dev]
        y = data[dev]["labels"][k]
        if not args.no_textnorm:
            choice["tau"] = [select_tau(R[m, k], C[m, k], y, args.tau, args.select_metric, args.ks)[0]
                             for m in range(len(names))]
        choice["lambda"] = select_lambda(R[:, k], y, args.lam, args.select_metric, args.ks)[0]
        if not args.no_textnorm:
            T = np.stack([textnorm(R[m, k], C[m, k], choice["tau"][m]) for m in range(len(names))])
            choice["lambda_textnorm"] = select_lambda(T, y, args.lam, args.select_metric, args.ks)[0]
    else:
        choice = {"tau": [args.tau[0]] * len(names), "lambda": args.lam[0], "lambda_textnorm": args.lam[0]}
    R, C, k = stacked[test]
    y = data[test]["labels"][k]
    rw = ensemble_rewards(R[:, k], None if args.no_textnorm else C[:, k], tau=choice.get("tau", 1.0),
                          lams=sorted({choice["lambda"], choice.get("lambda_textnorm", choice["lambda"])}), names=names)
    lt = choice.get("lambda_textnorm")
    keys = [*names, "mean", f"mean-{choice['lambda']:g}std"]
    if not args.no_textnorm:
        keys += [n + "+textnorm" for n in names] + ["mean+textnorm", f"mean-{lt:g}std+textnorm"]
    rows = ensemble_report({key: rw[key] for key in keys}, y, args.ks)
    head = (f"test split {test!r}: {int(k.size)} pairs, {int(k.sum())} kept ({int(y.sum())} aligned), "
            f"{int((~k).sum())} excluded (a member without contrasts); score {args.score!r}; members "
            + ", ".join(f"{n}={s.partition('=')[2] or s}" for n, s in zip(names, args.members))
            + (f"\nchosen on {dev!r} by {args.select_metric}: " if dev is not None else "\ngiven: "))
    head += f"lambda {choice['lambda']:g}" + ("" if args.no_textnorm else
                                            f", lambda (textnorm) {lt:g}, tau " +
                                            ", ".join(f"{n} {t:g}" for n, t in zip(names, choice["tau"])))
    print(head + "\n\n" + format_metric_table(rows))
    if args.out:
        _write_json(args.out, {"members": args.members, "names": names, "score": args.score, "split": test,
                               "dev_split": dev, "choice": choice, "n": int(k.size), "kept": int(k.sum()),
                               "positives": int(y.sum()), "metrics": rows})
        _log(f"wrote {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------
# argparse
# ----------------------------------------------------------------------------------------------
def _limit_arg(p) -> None:
    p.add_argument("--limit", type=int, default=0, help="use only the first N records of each split (0: all)")


def _model_args(p, required: bool = False) -> None:
    add_model_args(p, required=required)
    _limit_arg(p)


def _contrast_args(p) -> None:
    add_data(p, split="test", split_help="split the results are reported on (default test)")
    p.add_argument("--dev-split", default="dev", help="split on which tau (and lambda) are chosen (default dev; "
                   "'none': use the single --tau/--lam given)")
    p.add_argument("--score", default="alignment", choices=list(SCORE_NAMES),
                   help="the RAHF score used as reward r(x, y) (default alignment)")
    p.add_argument("--max-contrasts", type=int, default=8, help="word swaps per prompt (0: every allowed swap)")
    p.add_argument("--fixed-k", type=int, default=None,
                   help="keep only pairs with at least K contrasts and use their first K (default: every pair "
                        "with at least one)")
    p.add_argument("--kinds", default="colour,object,count,size,relation", help="swap kinds (rahf.swaps)")
    p.add_argument("--vocab", default="default", choices=["default", "synth"],
                   help="swap vocabulary: default (synth + common words of natural prompts) or synth")
    p.add_argument("--contrast-file", default=None,
                   help='JSONL, one line per prompt: {"uid" and/or "prompt", "contrasts": [...]} (replaces the swaps)')
    p.add_argument("--generator", default=None, help="module:function, a callable prompt -> list of contrastive prompts")
    p.add_argument("--select-metric", default="auroc", help="ranking metric that chooses tau/lambda on --dev-split")
    p.add_argument("--ks", type=_ints, default=[10, 50], help="k of AP@k, comma-separated (default 10,50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the metrics as JSON here")


def register(subparsers) -> None:
    cbm = subparsers.add_parser("cbm", help="concept-bottleneck reward aggregation (fit, apply, experiment)")
    sub = cbm.add_subparsers(dest="cbm_command", metavar="SUBCOMMAND")

    f = sub.add_parser("fit", help="fit a logistic aggregator from fine-grained attributes to a coarse target")
    _model_args(f)
    add_data(f, required=False, split="dev", help="dataset directory (with --checkpoint); fit on --split (default "
                                                  "dev: not the checkpoint's train split)")
    f.add_argument("--eval-split", default="test")
    f.add_argument("--table", help="JSONL/CSV of attribute rows instead of a checkpoint")
    f.add_argument("--eval-table", help="held-out JSONL/CSV (default: --holdout of --table)")
    f.add_argument("--holdout", type=float, default=0.3)
    f.add_argument("--embeddings", help=".npy (rows aligned with --table) for the coarse baseline")
    f.add_argument("--eval-embeddings", help=".npy aligned with --eval-table")
    f.add_argument("--features", help="comma-separated attribute columns (default: RAHF attributes minus the target)")
    f.add_argument("--target", default="overall", help="target: a score name (checkpoint mode) or a column")
    f.add_argument("--threshold", default=None, help="binarise target >= this number or 'median' (default median; "
                   "a 0/1 column is used as is)")
    add_decode(f)
    f.add_argument("--budgets", type=_ints, default=[25, 50, 100, 200, 400, "all"])
    f.add_argument("--seeds", type=int, default=5)
    f.add_argument("--l2", type=float, default=1e-2, help="aggregator L2 (standardised inputs)")
    f.add_argument("--l2-coarse", type=float, default=1.0, help="coarse model L2 (standardised embeddings)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", required=True, help="output directory")
    f.set_defaults(func=cmd_cbm_fit)

    a = sub.add_parser("apply", help="score rows with a saved aggregator")
    _model_args(a)
    a.add_argument("--model", required=True, help="aggregator.json from 'rahf cbm fit'")
    a.add_argument("--table", help="JSONL/CSV rows with the aggregator's feature columns")
    add_data(a, required=False, help="dataset directory (with --checkpoint)")
    add_decode(a)
    a.add_argument("--out", help="output JSONL (default stdout)")
    a.set_defaults(func=cmd_cbm_apply)

    e = sub.add_parser("experiment", help="the concept-bottleneck paper's controlled experiment on synth data (known attributes)")
    _model_args(e)
    add_data(e, with_split=False, help="a synth dataset directory (rahf data synth)")
    e.add_argument("--out", required=True)
    e.add_argument("--tree", default="image", choices=["image", "feedback"])
    e.add_argument("--train-split", default="train")
    e.add_argument("--eval-split", default="test")
    e.add_argument("--budgets", type=_ints, default=[25, 100, 400, "all"], help="image budgets")
    e.add_argument("--seeds", type=int, default=5)
    e.add_argument("--cost-budgets", type=_ints, default=[100, 400, 1600],
                   help="labelling-cost budgets (a coarse label costs 1; empty: skip the cost axis)")
    e.add_argument("--attribute-cost", type=float, default=1.0, help="cost of one attribute label (default 1)")
    e.add_argument("--training", default="sequential", choices=["sequential", "independent"],
                   help="stage 2 on stage 1's out-of-fold probabilities (sequential) or on true attributes")
    e.add_argument("--capacity", default="linear", choices=["linear", "mlp"], help="stage 1 and coarse model")
    e.add_argument("--hidden", type=int, default=32, help="hidden units of the mlp capacity")
    e.add_argument("--replicates", type=int, default=500, help="bootstrap replicates")
    e.add_argument("--l2", type=float, default=1e-2, help="stage-2 L2")
    e.add_argument("--l2-features", type=float, default=1.0, help="L2 of the models on features (coarse, stage 1)")
    e.add_argument("--aesthetics-threshold", type=float, default=0.55)
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=cmd_cbm_experiment)

    t = subparsers.add_parser("textnorm", help="raw vs TextNorm-calibrated reward on aligned/misaligned pairs")
    _model_args(t, required=True)
    _contrast_args(t)
    t.add_argument("--tau", type=_floats, default=[0.01, 0.05, 0.1, 1.0],
                   help="candidate temperatures, comma-separated, chosen on --dev-split")
    t.add_argument("--examples", default=None, help="write per-pair raw and normalised rewards (JSONL) here")
    t.set_defaults(func=cmd_textnorm)

    en = subparsers.add_parser("ensemble", help="several reward models: mean and mean - lambda*std, raw and TextNorm")
    en.add_argument("--members", "--checkpoints", nargs="+", required=True, metavar="[NAME=]MEMBER", dest="members",
                    help="checkpoint directories, Hugging Face Hub repo ids (org/name[@revision]) or reward tables "
                         '(.jsonl: {"uid", "reward", "contrast_rewards"} per pair, any model)')
    add_device(en)
    add_dtype(en)
    add_batch_size(en)
    _limit_arg(en)
    _contrast_args(en)
    en.add_argument("--tau", type=_floats, default=[0.01, 0.05, 0.1, 1.0],
                    help="candidate temperatures; one is chosen per member on --dev-split")
    en.add_argument("--lam", type=_floats, default=[0.0, 0.5, 1.0],
                    help="candidate uncertainty penalties, chosen on --dev-split")
    en.add_argument("--no-textnorm", action="store_true", help="raw rewards only (no contrast scoring)")
    en.set_defaults(func=cmd_ensemble)
