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


def _default_features(args) -> list[str]:
    if args.features:
        return [f for f in args.features.split(",") if f]
    if args.checkpoint:
        from ..reward.cbm import RAHF_ATTRIBUTES

        # the predicted score named like the target would make the bottleneck trivial: it is the
        # baseline instead
        return [f for f in RAHF_ATTRIBUTES if f != args.target]
    raise SystemExit("--features is required with --table")


def _baselines(args) -> list[str]:
    """Columns reported as baselines beside the aggregator: --baseline, or in checkpoint mode the
    checkpoint's own head for the target (its predicted ``overall`` for target ``overall``; the
    predicted ``overall`` when the target comes from a file and is not a score name)."""
    if args.baseline is not None:
        return [c for c in args.baseline.split(",") if c]
    if args.checkpoint:
        return [args.target if args.target in SCORE_NAMES else "overall"]
    return []


def _join_target(args, fit_rows, eval_rows):
    """Rows with the target column of --target-file joined by uid (rows lacking it dropped and
    counted with --skip-missing), and the column name to read; without a file, the rows as they are."""
    from ..reward.cbm import join_column, read_table

    if not args.target_file:
        return fit_rows, eval_rows, (f"true_{args.target}" if args.checkpoint else args.target), None
    table = read_table(args.target_file)
    counts, out = {}, []
    for name, rows in (("fit", fit_rows), ("eval", eval_rows)):
        try:
            vals, c = join_column(rows, table, args.target, args.uid_column, args.skip_missing, args.target_file)
        except ValueError as e:
            raise SystemExit(f"{name} rows: {e}")
        kept = [{**r, "_target": v} for r, v in zip(rows, vals) if v == v]
        if args.skip_missing and (c["missing"] or c["non_numeric"]):
            _log(f"{name} rows: skipped {c['missing']} without a {args.target!r} value in {args.target_file} and "
                 f"{c['non_numeric']} with a non-numeric one; {len(kept)} left")
        counts[name] = c
        out.append(kept)
    return out[0], out[1], "_target", counts


def _column(rows, name: str, what: str) -> np.ndarray:
    try:
        return np.array([float(r[name]) for r in rows])
    except KeyError:
        raise SystemExit(f"{what} column {name!r} is missing (rows have: {sorted(rows[0])[:20]})") from None
    except (TypeError, ValueError) as e:
        bad = next(r for r in rows if not _is_number(r.get(name)))
        raise SystemExit(f"{what} column {name!r} is not numeric in row "
                         f"{bad.get('uid', bad.get('id', '?'))!r}: {bad.get(name)!r}") from e


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def cmd_cbm_fit(args) -> int:
    from scipy.stats import pearsonr

    from ..eval.metrics import roc_auc
    from ..reward.cbm import (binarize, bootstrap_weights, correlated_pairs, fit_aggregator, format_curve_table,
                              learning_curve, paired_bootstrap, plot_curves, read_table)

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
    if emb_fit is not None:  # embeddings travel with their rows through the target join
        for r, e in zip(fit_rows, emb_fit):
            r["_emb"] = e
        for r, e in zip(eval_rows, emb_eval):
            r["_emb"] = e
    fit_rows, eval_rows, col, join_counts = _join_target(args, fit_rows, eval_rows)
    if emb_fit is not None:
        emb_fit = np.stack([r.pop("_emb") for r in fit_rows])
        emb_eval = np.stack([r.pop("_emb") for r in eval_rows])
    feats = _default_features(args)
    X = np.stack([_column(fit_rows, f, "attribute") for f in feats], 1)
    Xe = np.stack([_column(eval_rows, f, "attribute") for f in feats], 1)
    yv, yev = _column(fit_rows, col, "target"), _column(eval_rows, col, "target")
    thr = args.threshold
    if thr is None and set(np.unique(np.r_[yv, yev])) <= {0.0, 1.0}:
        y, ye, t = yv.astype(int), yev.astype(int), 0.5
    else:
        y, t = binarize(yv, thr or "median")
        ye, _ = binarize(yev, t)
    if y.min() == y.max() or ye.min() == ye.max():
        raise SystemExit(f"target {args.target} >= {t:.4g} leaves one class in the fit or eval rows")
    target = {"name": args.target, "threshold": t, "rule": ">="}
    if args.target_file:
        target["file"] = str(args.target_file)
    agg = fit_aggregator(X, y, feats, l2=args.l2, target=target)
    z_eval = agg.decision_function(Xe)
    auc = roc_auc(z_eval, ye)
    continuous = len(np.unique(yev)) > 2
    metrics = {"roc_auc_eval": auc, "n_fit": int(y.size), "n_eval": int(ye.size),
               "positive_rate_fit": float(y.mean()), "positive_rate_eval": float(ye.mean())}
    if continuous:
        metrics["plcc_eval"] = float(pearsonr(z_eval, yev)[0])
    if join_counts:
        metrics["target_join"] = join_counts
    # baselines on the same held-out rows, with paired intervals of the aggregator's difference
    base_cols = _baselines(args)
    scores = {"aggregator": z_eval[None]}
    base_plcc = {}
    for b in base_cols:
        v = _column(eval_rows, b, "baseline")
        scores[b] = v[None]
        if continuous:
            base_plcc[b] = float(pearsonr(v, yev)[0])
    iv = paired_bootstrap(scores, ye, reference="aggregator", replicates=args.replicates, seed=args.seed)
    metrics["baselines"] = {b: {"roc_auc_eval": iv["models"][b]["mean"],
                                "roc_auc_interval": [iv["models"][b]["lo"], iv["models"][b]["hi"]],
                                "minus_aggregator": iv["diff"][b],
                                **({"plcc_eval": base_plcc[b]} if b in base_plcc else {})} for b in base_cols}
    metrics["roc_auc_interval"] = [iv["models"]["aggregator"]["lo"], iv["models"]["aggregator"]["hi"]]
    if args.weight_replicates:
        agg.weight_intervals = bootstrap_weights(X, y, agg, replicates=args.weight_replicates, seed=args.seed)
    pairs = correlated_pairs(X, feats, args.corr_threshold)
    metrics["correlated_pairs"] = [{"a": a, "b": b, "r": r} for a, b, r in pairs]
    agg.metrics = metrics
    agg.save(out / "aggregator.json")
    curve = learning_curve(X, y, Xe, ye, emb_fit, emb_eval, budgets=args.budgets, seeds=args.seeds,
                           l2_cbm=args.l2, l2_coarse=args.l2_coarse, seed=args.seed)
    _write_json(out / "learning_curve.json", curve)
    plot_curves(curve, out / "learning_curve.png", title=f"target {args.target} >= {t:.3g}: aggregator vs coarse")
    wi = agg.weight_intervals.get("weights", {})
    lines = [f"target: {args.target} >= {t:.4g}" + (f" (joined by {args.uid_column} from {args.target_file})"
                                                     if args.target_file else "")
             + f"; positive rate fit {y.mean():.2f}, eval {ye.mean():.2f}; {y.size} fit rows, "
             f"{ye.size} eval rows", ""]
    if join_counts and any(c["missing"] or c["non_numeric"] for c in join_counts.values()):
        lines += ["skipped (no target value / non-numeric): " + ", ".join(
            f"{k} {c['missing']} / {c['non_numeric']}" for k, c in join_counts.items()), ""]
    lines += ["| attribute | weight (standardised) | " + (f"bootstrap 95% interval ({args.weight_replicates} "
                                                         "resamples of the fit rows) |" if wi else ""),
              "|---|---|" + ("---|" if wi else "")]
    lines += [f"| {f} | {w:+.3f} |" + (f" [{wi[f]['lo']:+.3f}, {wi[f]['hi']:+.3f}] |" if wi else "")
              for f, w in agg.ranked_weights()]
    if pairs:
        lines += ["", f"warning: strongly correlated attributes (|r| > {args.corr_threshold:g} on the fit rows); "
                      "their weights are not individually interpretable (they can trade off, even flip sign):"]
        lines += [f"- {a} ~ {b}: r = {r:+.3f}" for a, b, r in pairs]
        for a, b, r in pairs:
            _log(f"warning: attributes {a} and {b} are correlated (r = {r:+.3f}); their weights are not "
                 "individually interpretable")
    lines += ["", f"held-out ROC-AUC ({ye.size} eval rows; paired bootstrap 95% intervals over eval rows)", "",
              "| model | ROC-AUC | − aggregator |" + (" PLCC |" if continuous else ""),
              "|---|---|---|" + ("---|" if continuous else ""),
              f"| aggregator (all fit rows) | {auc:.3f} [{metrics['roc_auc_interval'][0]:.3f}, "
              f"{metrics['roc_auc_interval'][1]:.3f}] | |"
              + (f" {metrics['plcc_eval']:.3f} |" if continuous else "")]
    for b, m in metrics["baselines"].items():
        d = m["minus_aggregator"]
        lines.append(f"| baseline: {b} | {m['roc_auc_eval']:.3f} [{m['roc_auc_interval'][0]:.3f}, "
                     f"{m['roc_auc_interval'][1]:.3f}] | {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] |"
                     + (f" {m['plcc_eval']:.3f} |" if continuous else ""))
    lines += ["", format_curve_table(curve)]
    report = "\n".join(lines)
    (out / "report.md").write_text(report + "\n")
    print(report)
    print(f"\nwrote {out}/aggregator.json, learning_curve.json/.png, report.md")
    return 0


def _settings(items) -> dict:
    out = {}
    for it in items or []:
        k, sep, v = it.partition("=")
        if not sep or not k:
            raise SystemExit(f"--set takes ATTRIBUTE=VALUE, got {it!r}")
        if v != "mean":
            try:
                v = float(v)
            except ValueError:
                raise SystemExit(f"--set {it!r}: the value must be a number or 'mean'") from None
        out[k] = v
    return out


def cmd_cbm_apply(args) -> int:
    from scipy.special import expit

    from ..reward.cbm import Aggregator, read_table

    agg = Aggregator.load(args.model)
    settings = _settings(args.set)
    unknown = [k for k in settings if k not in agg.features]
    if unknown:
        raise SystemExit(f"--set {unknown}: not attributes of {args.model} ({', '.join(agg.features)})")
    if args.table:
        rows = read_table(args.table)
    elif args.checkpoint and args.data:
        rows, _ = _checkpoint_rows(args, args.split)
    else:
        raise SystemExit("give --table FILE, or --checkpoint CK --data DIR")
    X = agg._matrix(rows)
    contrib = agg.contributions(X)
    logit = contrib.sum(1) + agg.bias
    prob = expit(logit)
    if settings:
        logit_after = agg.decision_function(agg.intervene(X, settings))
        prob_after = expit(logit_after)
    f = open(args.out, "w") if args.out else sys.stdout
    try:
        for i, r in enumerate(rows):
            o = {k: r[k] for k in ("uid", "id") if k in r}
            o.update({"cbm_logit": float(logit[i]), "cbm_prob": float(prob[i]), "cbm_intercept": float(agg.bias),
                      "contributions": {n: float(c) for n, c in zip(agg.features, contrib[i])}})
            if settings:
                o.update({"intervention": settings, "cbm_prob_before": float(prob[i]),
                          "cbm_prob_after": float(prob_after[i]), "cbm_prob_change": float(prob_after[i] - prob[i]),
                          "cbm_logit_after": float(logit_after[i])})
            f.write(json.dumps(o) + "\n")
    finally:
        if f is not sys.stdout:
            f.close()
    msg = f"scored {len(rows)} rows" + (f" -> {args.out}" if args.out else "")
    if settings:
        d = prob_after - prob
        msg += (f"; intervention {settings}: mean probability {prob.mean():.3f} -> {prob_after.mean():.3f} "
                f"(change per row mean {d.mean():+.3f}, min {d.min():+.3f}, max {d.max():+.3f})")
    _log(msg)
    return 0


# ----------------------------------------------------------------------------------------------
# rahf cbm experiment
# ----------------------------------------------------------------------------------------------
def cmd_cbm_experiment(args) -> int:
    from ..reward.cbm import (TREES, controlled_experiment, default_synth_cache_dir, format_interval_table,
                              plot_curves, synth_arrays, verdicts)
    from ..data.format import open_dataset

    require("matplotlib", extra="report", purpose="the experiment plot")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tree = TREES[args.tree]
    cache = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_synth_cache_dir(args.data)
    data = {}
    for split in (args.train_split, args.eval_split):
        ds = open_dataset(args.data, split)
        entries = ds.entries[: args.limit or None]
        t0 = time.perf_counter()
        feats, attrs, status = synth_arrays(args.data, split, entries, args.aesthetics_threshold,
                                            features=not args.checkpoint, cache_dir=cache)
        if args.checkpoint:  # the stored images are the rendered ones: embed them, no re-render needed
            scorer = getattr(args, "_scorer", None) or scorer_from_args(args)
            args._scorer = scorer
            feats = np.asarray(scorer.embed([str(ds.path(i, "image")) for i in range(len(entries))],
                                            [e["prompt"] for e in entries], batch_size=args.batch_size),
                               dtype=np.float64)
        data[split] = (feats, attrs)
        _log(f"{split}: {len(entries)} records, features {feats.shape[1]}-d, {time.perf_counter() - t0:.1f} s "
             f"(cache {status}{': ' + str(cache) if cache else ''})")
    (F, A), (Fe, Ae) = data[args.train_split], data[args.eval_split]
    l2_features = args.l2_features if args.l2_features is not None else (0.1 if args.capacity == "mlp" else 1.0)
    res = {"features": "scorer.embed" if args.checkpoint else "image_features", "l2_features": l2_features,
           "attribute_rates": {n: float(A[n].mean()) for n in A}, "axes": {}}
    parts = []
    for axis, budgets in (("images", args.budgets), ("cost", args.cost_budgets)):
        if not budgets:
            continue
        t0 = time.perf_counter()
        r = controlled_experiment(F, A, Fe, Ae, tree, budgets=budgets, seeds=args.seeds, l2_features=l2_features,
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
            + (f" ({args.hidden} hidden units)" if args.capacity == "mlp" else "") + f", L2 {l2_features:g}"
            + "\nattribute sets: "
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
    f.add_argument("--target", default="overall",
                   help="target: a score name (checkpoint mode), a column of --table, or a column of --target-file")
    f.add_argument("--target-file", default=None,
                   help="JSONL/CSV with the target column (--target) per uid, joined to the rows by --uid-column")
    f.add_argument("--uid-column", default="uid", help="the join key of --target-file (default uid)")
    f.add_argument("--skip-missing", action="store_true",
                   help="drop and count rows whose uid has no (numeric) value in --target-file instead of failing")
    f.add_argument("--baseline", default=None,
                   help="comma-separated score columns reported beside the aggregator on the same eval rows "
                        "(default with --checkpoint: the checkpoint's own head for the target; '' for none)")
    f.add_argument("--replicates", type=int, default=1000, help="bootstrap replicates of the eval-row intervals")
    f.add_argument("--weight-replicates", type=int, default=200,
                   help="bootstrap refits for the weights' 95%% intervals (0: skip)")
    f.add_argument("--corr-threshold", type=float, default=0.8,
                   help="warn about attribute pairs with |correlation| above this on the fit rows")
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
    a.add_argument("--set", action="append", metavar="ATTRIBUTE=VALUE",
                   help="concept intervention: fix an attribute (raw units, or 'mean') and write the reward "
                        "before and after; repeatable")
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
    e.add_argument("--l2-features", type=float, default=None,
                   help="L2 of the models on features (coarse, stage 1); default 1 for linear, 0.1 for mlp "
                        "(5-fold CV of the coarse model on a synth train split; at 1 the MLP collapses)")
    e.add_argument("--aesthetics-threshold", type=float, default=0.55)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--cache-dir", default=None,
                   help="where the re-rendered records' attributes and image features are cached (default "
                        "DATA/.cache/cbm if writable, else ~/.cache/rahf/cbm)")
    e.add_argument("--no-cache", action="store_true", help="re-render every record, write no cache")
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
