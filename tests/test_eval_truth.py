"""One evaluation truth: the trainer, ``rahf eval`` and the scorer measure the same numbers the same way.

A tiny model is trained for a few steps with the real Trainer; ``rahf eval`` on its export must
reproduce export/metrics.json (every key within 1e-6), and the scorer, ``rahf eval`` and the
trainer's evaluation must give the same scores and tagged prompts. Heatmap metrics are measured at
the stored ground-truth size, also for batches whose maps differ in size.
"""

import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rahf import RAHF, RAHFConfig, RAHFScorer
from rahf.cli import main
from rahf.cli.train import eval_settings
from rahf.data.format import open_dataset
from rahf.data.torch_data import RAHFCollator, RAHFTorchDataset
from rahf.eval.evaluate import (HEATMAP_METRIC_SIZE, _loss_batch, map_metric_values, read_metrics, run_evaluation,
                                summary_metric)
from rahf.eval.metrics import heatmap_metrics
from rahf.eval.predict import DEFAULT_DECODE, predict_batch, resize_to
from rahf.schema import MAP_NAMES, SCORE_NAMES
from rahf.training.config import resolve_config
from rahf.training.trainer import Trainer, make_loader

SHRINK = ["model.vision.depth=1", "model.text.num_layers=1", "model.text.num_decoder_layers=1", "train.threads=1"]
MEASURED_KEYS = {"package_version", "checkpoint", "dataset", "split", "examples", "decode", "decode_also",
                 "heatmap_metric_size", "ground_truth_map_sizes", "model_heatmap_size", "batch_size", "max_batches",
                 "mixed_precision", "num_processes", "on_bad_record", "counterfactual_records"}


@pytest.fixture(scope="module")
def trained(synth_root, tmp_path_factory):
    """A tiny model trained for 4 steps by the real Trainer (dev evaluation at step 2 and 4, test
    evaluation of the export at the end, batch size 5 so the last test batch is uneven)."""
    out = tmp_path_factory.mktemp("runs")
    cfg = resolve_config(None, [f"data.root={synth_root}", f"run.output_dir={out}", "run.name=truth",
                                "tracking.tracker=none", "data.num_workers=0", "train.batch_size=8",
                                "eval.batch_size=5", "optim.warmup_steps=1", "optim.lr=2e-3", "train.max_steps=4",
                                "eval.every=2", "checkpoint.every=0", *SHRINK])
    trainer = Trainer(cfg)
    result = trainer.train()
    return trainer, result, out / "truth"


@pytest.fixture(scope="module")
def again(trained, tmp_path_factory):
    """``rahf eval`` on the export with nothing but the checkpoint (settings from its metrics.json),
    writing metrics.json, per-example predictions and the report."""
    _, _, run = trained
    d = tmp_path_factory.mktemp("again")
    assert main(["eval", "--checkpoint", str(run / "export"), "--num-workers", "0", "--out", str(d / "metrics.json"),
                 "--predictions", str(d / "predictions.jsonl"), "--report", str(d / "report")]) == 0
    return d


def _numeric(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k not in ("unavailable", "measured")}


@pytest.mark.slow
def test_rahf_eval_reproduces_training_metrics(trained, again, synth_root):
    trainer, result, run = trained
    export = run / "export"
    doc = json.loads((export / "metrics.json").read_text())
    measured = doc["measured"]
    assert set(measured) == MEASURED_KEYS
    assert measured["split"] == "test" and measured["examples"] == 16 and measured["batch_size"] == 5
    assert measured["decode"] == DEFAULT_DECODE == "constrained" and measured["decode_also"] == "free"
    assert measured["heatmap_metric_size"] == HEATMAP_METRIC_SIZE
    assert measured["ground_truth_map_sizes"] == [[128, 128]] and measured["model_heatmap_size"] == 64
    assert measured["dataset"] == str(synth_root.resolve()) and measured["checkpoint"] == str(export.resolve())
    # unavailable metrics are null with a reason, never a bare NaN
    for k, v in _numeric(doc).items():
        assert v is None or math.isfinite(v), k
        assert (v is None) == (k in doc["unavailable"]), k
    assert {"keyword_free/f1", "keyword_free_per_prompt/f1", "keyword/f1", "summary/mean"} <= set(doc)
    assert not any(k.startswith("loss/") for k in doc)
    # rahf eval with nothing but the checkpoint measures the same numbers the same way
    rerun = json.loads((again / "metrics.json").read_text())
    assert rerun["measured"] == measured
    assert _numeric(rerun).keys() == _numeric(doc).keys()
    for k, v in _numeric(doc).items():
        w = rerun[k]
        assert (v is None) == (w is None), (k, v, w)
        if v is not None:
            # counterfactual/within_* correlate alignment differences of ~1e-3 between one image's prompts,
            # which amplifies float32 thread-count effects of the forward pass; every other key: 1e-6
            tol = 1e-4 if k.startswith("counterfactual/within") else 1e-6
            assert abs(v - w) <= tol, (k, v, w)
    assert rerun["unavailable"] == doc["unavailable"]
    # the job's in-memory result holds the same numbers
    assert result["test"] == {k: v for k, v in doc.items() if k != "measured"}
    # the report shows the evaluation just computed: its metrics.json is the same document
    html = (again / "report" / "index.html").read_text()
    assert json.loads((again / "report" / "metrics.json").read_text()) == rerun
    assert "Best by implausibility CC" in html and html.count("data:image/png;base64,") >= 1 + 2 * 5
    for why in rerun["unavailable"].values():  # unavailable metrics say why, as the printed tables do
        assert f"n/a ({why})" in html


@pytest.mark.slow
def test_decode_both_gives_the_training_keys_and_flags_override(trained, synth_root, tmp_path):
    _, _, run = trained
    export = run / "export"
    doc = json.loads((export / "metrics.json").read_text())
    out = tmp_path / "both.json"
    assert main(["eval", "--checkpoint", str(export), "--data", str(synth_root), "--split", "test", "--decode", "both",
                 "--batch-size", "7", "--max-batches", "1", "--num-workers", "0", "--out", str(out)]) == 0
    both = json.loads(out.read_text())
    assert _numeric(both).keys() == _numeric(doc).keys()
    m = both["measured"]
    assert (m["batch_size"], m["examples"], m["max_batches"], m["decode"], m["decode_also"]) == (7, 7, 1, "constrained", "free")
    # a flag overrides the recorded setting: free decoding alone
    out = tmp_path / "free.json"
    assert main(["eval", "--checkpoint", str(export), "--decode", "free", "--max-batches", "1", "--num-workers", "0",
                 "--out", str(out)]) == 0
    free = json.loads(out.read_text())
    assert free["measured"]["decode"] == "free" and free["measured"]["decode_also"] is None
    assert free["measured"]["examples"] == 5 and "keyword/f1" in free and not any(k.startswith("keyword_free") for k in free)


def test_eval_settings_defaults_and_overrides():
    ns = dict(data=None, split=None, batch_size=None, decode=None, mixed_precision=None, max_batches=None)
    rec = {"dataset": "/d", "split": "dev", "batch_size": 5, "decode": "free", "decode_also": "constrained",
           "mixed_precision": "bf16", "max_batches": 3, "on_bad_record": "skip"}
    st = eval_settings(argparse.Namespace(**ns), rec)
    assert st == {"data": "/d", "split": "dev", "batch_size": 5, "max_batches": 3, "decode": "free",
                  "decode_also": "constrained", "mixed_precision": "bf16", "on_bad_record": "skip",
                  "counterfactual_records": None}
    st = eval_settings(argparse.Namespace(**{**ns, "decode": "both", "max_batches": 0, "split": "test"}), rec)
    assert (st["decode"], st["decode_also"], st["max_batches"], st["split"]) == ("free", "constrained", None, "test")
    st = eval_settings(argparse.Namespace(**{**ns, "data": "/x"}), {})  # nothing recorded: the defaults
    assert (st["decode"], st["decode_also"], st["batch_size"], st["split"]) == ("constrained", None, 32, "test")
    assert eval_settings(argparse.Namespace(**{**ns, "data": "/x", "decode": "both"}), {})["decode_also"] == "free"
    with pytest.raises(SystemExit, match="--data"):
        eval_settings(argparse.Namespace(**ns), {})


@pytest.mark.slow
def test_scorer_rahf_eval_and_trainer_agree(trained, again, synth_root):
    trainer, _, run = trained
    export = run / "export"
    # rahf eval's per-example results
    cli = {r["uid"]: r for r in map(json.loads, (again / "predictions.jsonl").read_text().splitlines())}
    # the trainer's evaluation (its own dataset and loader construction) of the same checkpoint
    cfg = trainer.cfg
    loader = trainer.accelerator.prepare(make_loader(trainer.open_split("test", stored_maps=True), trainer.collate,
                                                     cfg.eval.batch_size, cfg))
    ev = trainer.evaluate(loader, "test", model=RAHF.from_pretrained(export), loss=False, examples=True)
    ex = ev.examples
    assert sorted(ex.uid) == sorted(cli) and len(ex) == 16
    # the scorer on the image files
    split = open_dataset(synth_root, "test")
    scorer = RAHFScorer.from_pretrained(export, device="cpu")
    res = scorer.score([split.path(i, "image") for i in range(len(split))], [e["prompt"] for e in split.entries],
                       batch_size=4)
    for i, r in enumerate(res):
        uid = split.entries[i]["uid"]
        j = ex.uid.index(uid)
        got = np.array([r.scores[s] for s in SCORE_NAMES])
        np.testing.assert_allclose(got, ex.pred_scores[j], atol=1e-5, rtol=0)
        np.testing.assert_allclose(got, [cli[uid]["scores"][s] for s in SCORE_NAMES], atol=1e-5, rtol=0)
        assert r.tagged_prompt == ex.tagged[j] == cli[uid]["tagged_prompt"]
        for m in MAP_NAMES:  # the same per-map metric values
            for k, v in cli[uid]["heatmap"][m].items():
                w = ex.map_values[m][k][j]
                assert (v is None and np.isnan(w)) or abs(v - w) < 1e-6, (uid, m, k)
    # and the trainer's metric dict equals rahf eval's numbers for that decoding
    doc = json.loads((export / "metrics.json").read_text())
    for k, v in ev.metrics.items():
        if not k.startswith("keyword_free"):
            assert (math.isnan(v) and doc[k] is None) or abs(v - doc[k]) <= 1e-6, k


def _items(ds, n):
    return [ds[i] for i in range(n)]


def test_maps_at_stored_size_and_mixed_sizes_in_one_batch(synth_root):
    torch.manual_seed(0)
    model = RAHF(RAHFConfig.preset("tiny")).eval()
    cfg = model.config
    split = open_dataset(synth_root, "dev")
    stored = RAHFTorchDataset(split, cfg.vision.img_size, None, cfg.vision.mean, cfg.vision.std)
    train = RAHFTorchDataset(split, cfg.vision.img_size, cfg.heatmap_size, cfg.vision.mean, cfg.vision.std)
    collate = RAHFCollator.for_model(model)
    items = _items(stored, 4)
    assert items[0]["implausibility_map"].shape == (128, 128) and cfg.heatmap_size == 64
    batch = collate(items)
    assert isinstance(batch["implausibility_map"], torch.Tensor) and batch["implausibility_map"].shape == (4, 128, 128)
    # losses see the training resize: the stored maps brought to the head size equal the training maps
    lb = _loss_batch(batch, (64, 64))
    for m in MAP_NAMES:
        torch.testing.assert_close(lb[f"{m}_map"], collate(_items(train, 4))[f"{m}_map"], rtol=0, atol=0)
    # heatmap metrics use the stored ground truth (128²), the prediction resized bilinearly to it
    pred = predict_batch(model, batch, decode=None)
    for m in MAP_NAMES:
        want = heatmap_metrics(F.interpolate(pred.heatmaps[m][:, None], size=(128, 128), mode="bilinear",
                                             align_corners=False)[:, 0], batch[f"{m}_map"])
        got = map_metric_values(pred.heatmaps[m], batch[f"{m}_map"])
        for k in want:
            torch.testing.assert_close(got[k], want[k], equal_nan=True, rtol=0, atol=0)
    # maps of different stored sizes in one batch: a list, each measured at its own size
    mixed = _items(stored, 4)
    for it in mixed[1:3]:
        for m in MAP_NAMES:
            it[f"{m}_map"] = F.interpolate(it[f"{m}_map"][None, None], size=(96, 80), mode="bilinear",
                                           align_corners=False)[0, 0]
    mb = collate(mixed)
    assert isinstance(mb["implausibility_map"], list)
    assert [tuple(t.shape) for t in mb["implausibility_map"]] == [(128, 128), (96, 80), (96, 80), (128, 128)]
    ev = run_evaluation(model, [mb], decode=None, examples=True)
    assert ev.map_sizes == [[96, 80], [128, 128]]
    p = predict_batch(model, mb, decode=None)
    for j, it in enumerate(mixed):
        for m in MAP_NAMES:
            g = it[f"{m}_map"]
            want = heatmap_metrics(resize_to(p.heatmaps[m][j:j + 1], g.shape), g[None])
            for k in ("mse", "cc", "kld", "sim", "nss", "auc_judd"):
                w, v = float(want[k][0]), ev.examples.map_values[m][k][j]
                assert (math.isnan(w) and math.isnan(v)) or abs(w - v) < 1e-12, (j, m, k)
    # the same examples split into uniform batches give the same aggregate metrics
    ev2 = run_evaluation(model, [collate([mixed[0], mixed[3]]), collate(mixed[1:3])], decode=None)
    for k, v in ev.metrics.items():
        if k.startswith("heatmap/"):
            assert (math.isnan(v) and math.isnan(ev2.metrics[k])) or abs(v - ev2.metrics[k]) < 1e-6, k  # float32 batch effects


def test_every_record_counted_once_and_max_batches_stops_on_time(synth_root):
    """The evaluation's numbers equal scipy's / numpy's on the records' predictions, each record once:
    16 records in batches of 5 (the last one short), and ``max_batches=2`` stops after exactly 10."""
    from scipy.stats import pearsonr, spearmanr

    from known_model import tiny_config
    from rahf.eval.metrics import keyword_metrics

    torch.manual_seed(0)
    model = RAHF(tiny_config()).eval()  # untrained: its predictions differ from record to record
    v = model.config.vision
    split = open_dataset(synth_root, "dev")
    ds = RAHFTorchDataset(split, v.img_size, None, v.mean, v.std)
    collate = RAHFCollator.for_model(model)
    # the reference: the same batches through the one inference path, aggregated here
    scores, tagged, cc = [], [], {m: [] for m in MAP_NAMES}
    for start in range(0, len(ds), 5):
        batch = collate([ds[i] for i in range(start, min(len(ds), start + 5))])
        pred = predict_batch(model, batch, decode="constrained")
        scores.append(pred.scores.numpy())
        tagged += pred.tagged
        for m in MAP_NAMES:
            up = resize_to(pred.heatmaps[m], batch[f"{m}_map"].shape[-2:]).numpy()
            for p, g in zip(up, batch[f"{m}_map"].numpy()):
                cc[m].append(np.corrcoef(p.ravel(), g.ravel())[0, 1] if g.max() > 0 else np.nan)
    scores = np.concatenate(scores)
    truth = np.array([[split[i].scores[s] for s in SCORE_NAMES] for i in range(len(split))])
    targets = [split[i].tagged_prompt for i in range(len(split))]
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=collate)
    for max_batches, n, decode in ((2, 10, None), (None, 16, "constrained")):
        m = run_evaluation(model, loader, decode=decode, max_batches=max_batches).metrics
        assert m["count/n"] == n, max_batches
        for name in MAP_NAMES:
            assert m[f"count/gt_nonempty/{name}"] + m[f"count/gt_empty/{name}"] == n
            assert m[f"heatmap/cc/{name}"] == pytest.approx(np.nanmean(cc[name][:n]), abs=1e-6), (name, max_batches)
        for j, s in enumerate(SCORE_NAMES):
            assert m[f"score/plcc/{s}"] == pytest.approx(pearsonr(scores[:n, j], truth[:n, j])[0], abs=1e-6), s
            assert m[f"score/srcc/{s}"] == pytest.approx(spearmanr(scores[:n, j], truth[:n, j])[0], abs=1e-6), s
    kw = keyword_metrics(tagged, targets)
    assert m["count/keyword_prompts"] == 16
    keys = ("precision", "recall", "f1")
    assert [m[f"keyword/{k}"] for k in keys] == pytest.approx([kw[k] for k in keys], abs=1e-12, nan_ok=True)


@pytest.mark.slow
def test_trainer_eval_datasets_keep_stored_maps(trained):
    trainer, _, _ = trained
    assert trainer.eval_ds[0]["implausibility_map"].shape == (128, 128)
    assert trainer.train_ds[0]["implausibility_map"].shape == (64, 64)
    # the dev metrics written next to the best checkpoint record how they were measured
    metrics, unavailable, measured = read_metrics(trainer.run_dir / "best" / "metrics.json")
    assert measured["split"] == "dev" and measured["decode"] == "constrained" and measured["decode_also"] is None
    assert measured["ground_truth_map_sizes"] == [[128, 128]]
    assert all(math.isnan(metrics[k]) for k in unavailable)
    assert any(k.startswith("loss/") for k in metrics)


def test_summary_ignores_unavailable_metrics():
    assert summary_metric({"score/plcc/overall": math.nan, "heatmap/cc/implausibility": 0.5, "keyword/f1": None}) == 0.5
    assert math.isnan(summary_metric({"score/plcc/overall": math.nan}))
