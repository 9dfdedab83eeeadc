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
    from ..reward.cbm import (SYNTH_ATTRIBUTES, TREES, controlled_experiment, format_curve_table, image_features,
                      plot_curves, regenerate_synth, synth_attributes)
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
    res = controlled_experiment(F, A, Fe, Ae, tree, budgets=args.budgets, seeds=args.seeds,
                                l2_features=args.l2_features, l2_cbm=args.l2, seed=args.seed, training=args.training)
    res["features"] = "scorer.embed" if args.checkpoint else "image_features"
    res["attribute_rates"] = {n: float(A[n].mean()) for n in A}
    _write_json(out / "experiment.json", res)
    plot_curves(res, out / "experiment.png", title=f"tree: {tree.text}")
    table = format_curve_table(res)
    head = (f"target tree ({tree.name}): {tree.text}\npositive rate fit {res['positive_rate']['fit']:.2f}, eval "
            f"{res['positive_rate']['eval']:.2f}; features: {res['features']}; {args.seeds} draws per budget; "
            f"stage-2 training: {args.training}\nattribute sets: " +
            "; ".join(f"{k} = {','.join(v)}" for k, v in res["sets"].items()))
    # the concept-bottleneck paper's qualitative check (its Fig. 3), on budgets with at least 2 draws averaged and the largest
    c = res["curves"]
    ks = res["budgets"]
    mean = {m: np.nanmean([c[m][k]["mean"] for k in ks]) for m in c}
    verdict = {"right_beats_coarse": bool(mean["cbm-right"] > mean["coarse"]),
               "mismatched_below_coarse": bool(mean["cbm-mismatched"] < mean["coarse"]),
               "mismatched_below_right": bool(mean["cbm-mismatched"] < mean["cbm-right"])}
    res["check"] = {"mean_auc_over_budgets": mean, **verdict}
    _write_json(out / "experiment.json", res)
    text = (head + "\n\n" + table + "\n\nmean ROC-AUC over budgets: " +
            ", ".join(f"{m} {v:.3f}" for m, v in mean.items()) + "\ncheck: " +
            ", ".join(f"{k}={v}" for k, v in verdict.items()))
    (out / "experiment.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {out}/experiment.json, experiment.png, experiment.md")
    return 0


# ----------------------------------------------------------------------------------------------
# rahf textnorm / rahf ensemble
# ----------------------------------------------------------------------------------------------
def _generator(args):
    from ..reward.textnorm import RuleContrast, Vocabulary, default_vocabulary

    if args.generator:
        mod, _, name = args.generator.partition(":")
        fn = getattr(importlib.import_module(mod), name or "generate")
        return fn
    vocab = Vocabulary.load(args.vocab) if args.vocab else default_vocabulary()
    kinds = [k for k in args.kinds.split(",") if k]
    return RuleContrast(vocab, kinds=kinds, max_contrasts=args.max_contrasts, seed=args.seed)


def _contrast_rewards(scorer, images, prompts, contrasts, score: str, batch_size: int):
    """(N,) rewards of the prompts and (N, K) of their contrasts (NaN padding)."""
    flat_img, flat_p, owner = [], [], []
    for i, (im, p, cs) in enumerate(zip(images, prompts, contrasts)):
        for q in [p, *cs]:
            flat_img.append(im)
            flat_p.append(q)
            owner.append(i)
    res = scorer.score(flat_img, flat_p, batch_size=batch_size, decode=None)
    vals = np.array([float(r.scores[score] if hasattr(r, "scores") else r["scores"][score]) for r in res])
    K = max((len(c) for c in contrasts), default=0)
    raw = np.empty(len(prompts))
    con = np.full((len(prompts), max(K, 1)), np.nan)
    pos = 0
    for i, cs in enumerate(contrasts):
        raw[i] = vals[pos]
        con[i, : len(cs)] = vals[pos + 1: pos + 1 + len(cs)]
        pos += 1 + len(cs)
    return raw, con


def _load_pairs(args):
    from ..reward.textnorm import contrast_sets

    entries, paths = _records(args.data, args.split, args.limit)
    prompts = [e["prompt"] for e in entries]
    labels = np.array([int(not misaligned_words(e["tagged_prompt"])) for e in entries])  # 1 = aligned
    images = [load_image(p, e["uid"]) for p, e in zip(paths, entries)]
    contrasts = contrast_sets(prompts, _generator(args))
    return entries, images, prompts, labels, contrasts


def cmd_textnorm(args) -> int:
    from ..eval.metrics import ranking_metrics
    from ..reward.textnorm import format_metric_table, textnorm

    entries, images, prompts, labels, contrasts = _load_pairs(args)
    scorer = scorer_from_args(args)
    t0 = time.perf_counter()
    raw, con = _contrast_rewards(scorer, images, prompts, contrasts, args.score, args.batch_size)
    _log(f"scored {len(prompts)} pairs + {sum(map(len, contrasts))} contrasts in {time.perf_counter() - t0:.1f} s")
    ks = args.ks
    rows = {f"raw {args.score}": ranking_metrics(raw, labels, ks)}
    for tau in args.tau:
        rows[f"textnorm tau={tau:g}"] = ranking_metrics(textnorm(raw, con, tau), labels, ks)
    table = format_metric_table(rows)
    n_c = [len(c) for c in contrasts]
    head = (f"{len(prompts)} pairs ({int(labels.sum())} aligned = positive class), score {args.score!r}, "
            f"{np.mean(n_c):.1f} contrasts per prompt (min {min(n_c)}, max {max(n_c)})")
    print(head + "\n\n" + table)
    result = {"checkpoint": args.checkpoint, "data": args.data, "split": args.split, "score": args.score,
              "n": len(prompts), "positives": int(labels.sum()), "contrasts_per_prompt": float(np.mean(n_c)),
              "metrics": rows, "examples": [{"prompt": p, "contrasts": c} for p, c in zip(prompts[:3], contrasts[:3])]}
    if args.out:
        _write_json(args.out, result)
        _log(f"wrote {args.out}")
    return 0


def cmd_ensemble(args) -> int:
    from ..reward.ensemble import ensemble_report, ensemble_rewards
    from ..reward.textnorm import format_metric_table

    entries, images, prompts, labels, contrasts = _load_pairs(args)
    raws, cons, names = [], [], []
    for i, ck in enumerate(args.checkpoints):
        scorer = scorer_from_args(args, ck)
        t0 = time.perf_counter()
        if args.no_textnorm:
            res = scorer.score(images, prompts, batch_size=args.batch_size, decode=None)
            raws.append(np.array([float(r.scores[args.score]) for r in res]))
        else:
            r, c = _contrast_rewards(scorer, images, prompts, contrasts, args.score, args.batch_size)
            raws.append(r)
            cons.append(c)
        names.append(f"m{i}")
        _log(f"m{i} = {ck}: scored in {time.perf_counter() - t0:.1f} s")
        del scorer
    rewards = ensemble_rewards(np.stack(raws), None if args.no_textnorm else np.stack(cons), tau=args.tau,
                               lams=args.lam, names=names)
    rows = ensemble_report(rewards, labels, args.ks)
    table = format_metric_table(rows)
    head = (f"{len(prompts)} pairs ({int(labels.sum())} aligned), score {args.score!r}, {len(names)} models "
            + ", ".join(f"{n}={c}" for n, c in zip(names, args.checkpoints))
            + ("" if args.no_textnorm else f"; TextNorm tau={args.tau:g}"))
    print(head + "\n\n" + table)
    if args.out:
        _write_json(args.out, {"checkpoints": args.checkpoints, "names": names, "score": args.score,
                               "tau": args.tau, "lams": args.lam, "n": len(prompts),
                               "positives": int(labels.sum()), "metrics": rows})
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
    add_data(p)
    p.add_argument("--score", default="alignment", choices=list(SCORE_NAMES),
                   help="the RAHF score used as reward r(x, y) (default alignment)")
    p.add_argument("--max-contrasts", type=int, default=8, help="contrastive prompts per prompt (0: all)")
    p.add_argument("--kinds", default="colour,count,object,size,relation", help="swap kinds of the rule generator")
    p.add_argument("--vocab", default=None, help="JSON vocabulary extending the synth one "
                   '({"colours": [...], "nouns": {"cat": "cats"}, "numerals": [...], "sizes": [...], "relations": [...]})')
    p.add_argument("--generator", default=None, help="module:function, a callable prompt -> list of contrastive prompts")
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
    e.add_argument("--budgets", type=_ints, default=[25, 50, 100, 200, 400, "all"])
    e.add_argument("--seeds", type=int, default=5)
    e.add_argument("--training", default="independent", choices=["independent", "sequential"])
    e.add_argument("--l2", type=float, default=1e-2, help="stage-2 L2")
    e.add_argument("--l2-features", type=float, default=1.0, help="L2 of the models on features (coarse, stage 1)")
    e.add_argument("--aesthetics-threshold", type=float, default=0.55)
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=cmd_cbm_experiment)

    t = subparsers.add_parser("textnorm", help="raw vs TextNorm-calibrated reward on aligned/misaligned pairs")
    _model_args(t, required=True)
    _contrast_args(t)
    t.add_argument("--tau", type=_floats, default=[0.01, 0.05, 0.1, 1.0], help="temperatures, comma-separated")
    t.set_defaults(func=cmd_textnorm)

    en = subparsers.add_parser("ensemble", help="several checkpoints: mean and mean - lambda*std, raw and TextNorm")
    en.add_argument("--checkpoints", nargs="+", required=True, metavar="CHECKPOINT",
                    help="checkpoint directories or Hugging Face Hub repo ids (org/name[@revision])")
    add_device(en)
    add_dtype(en)
    add_batch_size(en)
    _limit_arg(en)
    _contrast_args(en)
    en.add_argument("--tau", type=float, default=0.05)
    en.add_argument("--lam", type=_floats, default=[0.5, 1.0], help="uncertainty penalties, comma-separated")
    en.add_argument("--no-textnorm", action="store_true", help="raw rewards only (no contrast scoring)")
    en.set_defaults(func=cmd_ensemble)
