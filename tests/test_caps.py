"""Honest caps: a run cut short by the time limit still evaluates and exports, and says so in
result.json, the export's training.json and metrics.json, and its last line (a warning, not "done")."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rahf.training.config import resolve_config
from rahf.training.trainer import Trainer

SHRINK = ["model.vision.img_size=64", "model.vision.depth=1", "model.text.num_layers=1",
          "model.text.num_decoder_layers=1", "train.threads=1"]


@pytest.fixture(scope="module")
def data(small_synth_root):
    return small_synth_root


def settings(data, out, name, *extra):
    return [f"data.root={data}", f"run.output_dir={out}", f"run.name={name}", *SHRINK, "train.max_steps=3",
            "train.batch_size=4", "eval.batch_size=4", "eval.every=0", "checkpoint.every=0", "optim.warmup_steps=1",
            "tracking.tracker=none", "data.num_workers=0", "data.generate_synth=false", *extra]


@pytest.mark.slow
def test_time_limit_is_recorded_everywhere(data, tmp_path, capsys):
    # 0.0001 min = 6 ms: every step takes longer, so the run stops after its first step
    result = Trainer(resolve_config(None, settings(data, tmp_path, "capped", "train.time_limit_minutes=0.0001"))).train()
    out = capsys.readouterr().out
    run = tmp_path / "capped"
    expected = {"reason": "time limit", "step": 1, "max_steps": 3, "setting": "train.time_limit_minutes=0.0001",
                "message": "stopped by the time limit at step 1 of 3"}
    assert result["step"] == 1 and result["stopped_early"] == expected
    assert json.loads((run / "result.json").read_text())["stopped_early"] == expected
    training = json.loads((run / "export" / "training.json").read_text())
    assert training["stopped_early"] == expected and training["run_steps"] == 1 and training["max_steps"] == 3
    metrics = json.loads((run / "export" / "metrics.json").read_text())
    assert metrics["stopped_early"] == expected and metrics["measured"]["split"] == "test"
    last = out.strip().splitlines()[-1]
    assert last.startswith("warning: stopped by the time limit at step 1 of 3 (train.time_limit_minutes=0.0001)")
    assert "done:" not in out
    # what was trained is still checkpointed, evaluated, exported, and its card shows the test metrics
    assert (run / "checkpoints" / "step_000001" / "checkpoint.json").is_file()
    exported = load_file(str(run / "export" / "model.safetensors"))
    saved = load_file(str(run / "checkpoints" / "step_000001" / "model.safetensors"))
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    assert "Measured on split `test`" in (run / "export" / "README.md").read_text()


@pytest.mark.slow
def test_a_run_within_its_limits_says_it_was_not_stopped(data, tmp_path, capsys):
    result = Trainer(resolve_config(None, settings(data, tmp_path, "full", "train.time_limit_minutes=60",
                                                   "eval.test_at_end=false"))).train()
    run = tmp_path / "full"
    assert result["step"] == 3 and result["stopped_early"] is None
    assert json.loads((run / "export" / "training.json").read_text())["stopped_early"] is None
    assert "stopped_early" not in json.loads((run / "export" / "metrics.json").read_text())
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("done: 3 steps")
