"""The main job: train.py end to end, resume, two CPU processes, config errors."""

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rahf.configtools import ConfigError
from rahf.training.config import resolve_config
from rahf.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def small(data_root, out, name, *extra):
    return [f"data.root={data_root}", f"run.output_dir={out}", f"run.name={name}", "tracking.tracker=none",
            "data.num_workers=0", "train.batch_size=8", "eval.batch_size=16", "optim.warmup_steps=2",
            *SHRINK, *extra]


# the tiny preset, shrunk further so that multi-process and resume runs stay fast on 2 cores
SHRINK = ["model.vision.depth=1", "model.text.num_layers=1", "model.text.num_decoder_layers=1", "train.threads=1"]


def weights_digest(path: Path) -> str:
    sd = load_file(str(path))
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].float().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.slow
def test_train_py_end_to_end_with_overrides(synth_root, tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", "none",
           *small(synth_root, tmp_path, "e2e", "train.max_steps=6", "eval.every=3", "checkpoint.every=3", "optim.lr=2e-3")]
    res = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "e2e"
    cfg_text = (run / "config.yaml").read_text()
    assert "lr: 0.002" in cfg_text and "max_steps: 6" in cfg_text
    assert "git_commit" in json.loads((run / "run_info.json").read_text())
    export = run / "export"
    assert {"config.json", "model.safetensors", "tokenizer.json", "metrics.json"} <= {p.name for p in export.iterdir()}
    metrics = json.loads((export / "metrics.json").read_text())
    # the exported metrics are the export's own: `rahf eval` of the exported model on the test split gives them
    from rahf.cli import main as rahf_main

    assert rahf_main(["eval", "--checkpoint", str(export), "--data", str(synth_root), "--split", "test",
                      "--batch-size", "16", "--num-workers", "0", "--out", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    for k in ("score/plcc/overall", "score/srcc/plausibility", "heatmap/cc/implausibility",
              "heatmap/mse_gt0/misalignment", "heatmap/auc_judd/implausibility", "keyword/f1",
              "keyword_per_prompt/precision"):
        assert isinstance(metrics[k], float) and math.isfinite(metrics[k]), k
        assert abs(metrics[k] - again[k]) < 1e-5, (k, metrics[k], again[k])
    # six steps at lr 2e-3 already lower the dev loss (the text term starts at ln(vocabulary size))
    dev = [r for r in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
           if r.get("split") == "dev"]
    assert [r["step"] for r in dev] == [3, 6] and dev[1]["loss/loss"] < dev[0]["loss/loss"]
    assert metrics["count/n"] == 16
    # keep-last-2 pruning: steps 3 and 6 remain
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000003", "step_000006"]
    assert "MSE GT=0" in res.stdout and "PLCC" in res.stdout
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "dev" for r in log)


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match="optim.lr"):
        resolve_config(None, ["optim.lrr=1e-4"])
    with pytest.raises(ConfigError, match="train.batch_size"):
        resolve_config(None, ["train.batchsize=4"])
    with pytest.raises(ConfigError, match="expected an integer"):
        resolve_config(None, ["train.max_steps=ten"])
    cfg = resolve_config(None, ["optim.lr=1e-4", "model.preset=paper", "model.variant=augmented_prompt"])
    assert cfg.optim.lr == 1e-4 and cfg.model.vision.img_size == 224 and cfg.model.variant == "augmented_prompt"


def _train(args):
    return Trainer(resolve_config(None, args), resume="latest").train()


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(synth_root, tmp_path):
    common = ["train.max_steps=8", "checkpoint.every=4", "eval.every=0", "eval.test_at_end=false",
              "train.grad_accum=2", "train.deterministic=true", "checkpoint.keep_last=5"]
    torch.manual_seed(123)  # the trainer must not depend on the global state it was started with
    _train(small(synth_root, tmp_path, "straight", *common))
    first = _train(small(synth_root, tmp_path, "pieces", *common, "train.stop_after_steps=3"))
    assert first["interrupted"] and first["step"] == 3
    state = json.loads((tmp_path / "pieces/checkpoints/step_000003/trainer_state.json").read_text())
    assert state["step"] == 3 and state["batch_in_epoch"] == 6  # 3 steps × 2 accumulated batches
    torch.manual_seed(999)
    _train(small(synth_root, tmp_path, "pieces", *common))
    a = weights_digest(tmp_path / "straight/checkpoints/step_000008/model.safetensors")
    b = weights_digest(tmp_path / "pieces/checkpoints/step_000008/model.safetensors")
    assert a == b
    # a changed config refuses to resume, naming the difference
    with pytest.raises(ValueError, match="lr"):
        Trainer(resolve_config(None, small(synth_root, tmp_path, "pieces", *common, "optim.lr=0.5")),
                resume="latest").train()


@pytest.mark.slow
def test_two_cpu_processes_stay_in_sync_and_evaluate_like_one(synth_root, tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch/cpu_2proc.yaml")]
    cmd = launch + [str(ROOT / "tests/dist_train_check.py"), str(tmp_path / "digests"),
                    *small(synth_root, tmp_path, "ddp", "train.max_steps=3", "eval.every=0", "checkpoint.every=0",
                           "eval.test_at_end=false")]
    res = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    digests = sorted((tmp_path / "digests").glob("rank*.txt"))
    assert len(digests) == 2
    d0, d1 = (p.read_text() for p in digests)
    assert d0 == d1
    info = json.loads((tmp_path / "digests" / "rank0.json").read_text())
    assert info["num_processes"] == 2 and info["step"] == 3
    # distributed evaluation of the export equals single-process evaluation (16 test examples, batch 5:
    # uneven shards: the sampler's padding copies are dropped by dataset index)
    export = tmp_path / "ddp" / "export"
    ev = ["rahf.cli", "eval", "--checkpoint", str(export), "--data", str(synth_root), "--split", "test",
          "--batch-size", "5", "--num-workers", "0"]
    single = subprocess.run([sys.executable, "-m", *ev, "--out", str(tmp_path / "one.json")], env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run(launch + ["-m", *ev, "--out", str(tmp_path / "two.json")], env=ENV, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["count/n"] == two["count/n"] == 16
    assert one.keys() == two.keys()
    for k in one:
        if isinstance(one[k], float) and one[k] == one[k]:
            assert abs(one[k] - two[k]) < 1e-4, (k, one[k], two[k])  # float32 batch-size effects only


@pytest.mark.slow
def test_tensorboard_tracker_and_augmented_variant(synth_root, tmp_path):
    args = small(synth_root, tmp_path, "tb", "train.max_steps=2", "eval.every=0", "checkpoint.every=0",
                 "eval.test_at_end=false", "model.variant=augmented_prompt")
    args = [a for a in args if not a.startswith("tracking.")] + ["tracking.tracker=tensorboard"]
    result = Trainer(resolve_config(None, args)).train()
    assert result["step"] == 2
    events = list((tmp_path / "tensorboard" / "tb").rglob("events.out.tfevents.*"))
    assert events
    # the logged scalars can be read back, and equal the run's own metrics log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(events[0].parent))
    tb.Reload()
    logged = {(e.step, e.value) for e in tb.Scalars("train/loss")}
    log = [json.loads(line) for line in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    want = {(r["step"], r["train/loss"]) for r in log if r.get("split") == "train"}
    assert [s for s, _ in want] == [2] and len(logged) == 1
    assert abs(next(iter(logged))[1] - next(iter(want))[1]) < 1e-5 and next(iter(logged))[0] == 2
    assert json.loads((tmp_path / "tb" / "export" / "config.json").read_text())["variant"] == "augmented_prompt"


# ----------------------------------------------------------------------------- CPU threads under load
def _drive(ctrl, seconds_at, steps):
    """Run ``steps`` steps whose computation takes ``seconds_at(threads)``; returns the thread count of each."""
    used, messages = [], []
    for _ in range(steps):
        used.append(ctrl.threads)
        msg = ctrl.observe(seconds_at(ctrl.threads))
        if msg:
            messages.append(msg)
    return used, messages


def test_adaptive_threads_keep_the_faster_count(monkeypatch):
    from rahf.training.threads import AdaptiveThreads

    before = torch.get_num_threads()
    try:
        ctrl = AdaptiveThreads(2)
        # idle: 2 threads are faster; the start-up probe tries 1 thread (1 + 3 steps) and returns to 2
        used, messages = _drive(ctrl, {2: 1.0, 1: 1.5}.get, 20)
        assert used[:3] == [2, 2, 2] and used[3:7] == [1, 1, 1, 1] and set(used[7:]) == {2}
        assert not messages and torch.get_num_threads() == 2
        # another process starts: 2 threads slow down 3×, 1 thread is faster → switch within a few steps
        used, messages = _drive(ctrl, {2: 3.0, 1: 1.4}.get, 12)
        assert used[-1] == 1 and used.count(2) <= 4 and torch.get_num_threads() == 1
        assert len(messages) == 1 and messages[0].startswith("threads: 2 → 1")
        # it goes away: a later periodic probe of 2 threads finds them faster again
        used, messages = _drive(ctrl, {2: 1.0, 1: 1.5}.get, 60)
        assert used[-1] == 2 and messages == ["threads: 1 → 2 (1.500 s → 1.000 s per step's computation)"]
        assert ctrl.summary() == {"threads": 2, "adaptive": True, "switches": 2}
    finally:
        torch.set_num_threads(before)


def test_thread_controller_only_where_it_cannot_change_the_numbers():
    from types import SimpleNamespace

    from rahf.training.threads import thread_controller

    before = torch.get_num_threads()
    try:
        cpu = SimpleNamespace(device=torch.device("cpu"), num_processes=1)
        auto = thread_controller(0, False, cpu)
        assert (auto is not None) == ((os.cpu_count() or 1) >= 2)
        assert thread_controller(1, False, cpu) is None and torch.get_num_threads() == 1  # fixed train.threads
        assert thread_controller(0, True, cpu) is None  # train.deterministic
        assert thread_controller(0, False, SimpleNamespace(device=torch.device("cpu"), num_processes=2)) is None
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_default_job_config_runs_end_to_end_on_a_small_budget(tmp_path):
    """`train.py` with no --config (configs/default.yaml: curriculum data, conv stem, scene and word heads,
    word-head tags) on a tiny budget: it generates its data, trains with the scene loss, and its test
    evaluation reports the word head's tags, constrained decoding beside them, and the counterfactual block."""
    data = tmp_path / "data"
    cmd = [sys.executable, str(ROOT / "train.py"), f"data.root={data}", f"run.output_dir={tmp_path}", "run.name=dj",
           "tracking.tracker=none", "data.num_workers=0", "data.synth.train=24", "data.synth.dev=6",
           "data.synth.test=6", "data.synth.size=64", "model.vision.img_size=64", *SHRINK, "train.batch_size=8",
           "train.max_steps=4", "eval.every=0", "checkpoint.every=0", "eval.counterfactual_records=4",
           "optim.warmup_steps=1"]
    res = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads((data / "dataset.json").read_text())
    assert info["prompts_per_image"]["train"] == 2 and info["easy_fraction"]["train"] == 0.4
    steps = [json.loads(x) for x in (tmp_path / "dj" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/scene_loss" in s and "train/word_loss" in s for s in steps)
    m = json.loads((tmp_path / "dj" / "export" / "metrics.json").read_text())
    assert "keyword/f1" in m and "keyword_constrained/f1" in m and "counterfactual/pairwise_acc" in m
    cfg = json.loads((tmp_path / "dj" / "export" / "config.json").read_text())
    assert cfg["scene_head"] and cfg["word_head"] and cfg["score_text"] and cfg["vision"]["stem"] == "conv"
