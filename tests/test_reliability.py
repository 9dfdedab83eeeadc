"""Reliability of the training job: kills at named points (RAHF_FAULT), SIGTERM, numerical faults,
safe loading, config errors caught before any data is touched.

Runs the tiny model shrunk further on 64 px data, on CPU with one thread, deterministic, so that an
interrupted-and-resumed run must end with exactly the weights of an uninterrupted one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rahf.configtools import ConfigError
from rahf.training import faults as faults_mod
from rahf.training.checkpoint import CheckpointManager
from rahf.training.faults import parse_faults
from rahf.training.config import resolve_config
from rahf.training.trainer import Trainer, main as train_main

from test_train import weights_digest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("RAHF_FAULT", None)
# train.py subprocesses run with `--config none` (the package defaults, as the in-process runs): the same
# model in both
SHRINK = ["model.vision.img_size=64", "model.vision.depth=1", "model.text.num_layers=1",
          "model.text.num_decoder_layers=1", "train.threads=1"]
COMMON = ["train.max_steps=8", "checkpoint.every=2", "checkpoint.keep_last=3", "eval.every=3", "eval.batch_size=8",
          "eval.test_at_end=false", "train.grad_accum=2", "train.batch_size=4", "train.deterministic=true",
          "optim.warmup_steps=2", "tracking.tracker=none", "data.num_workers=0", "data.generate_synth=false"]


def args(data, out, name, *extra):
    return [f"data.root={data}", f"run.output_dir={out}", f"run.name={name}", *SHRINK, *COMMON, *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from rahf.data.synth import generate

    root = tmp_path_factory.mktemp("rel_data")
    generate(root, train=24, dev=8, test=8, size=64, seed=0, workers=1)
    return root


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted run: its final weights and its steps.jsonl."""
    out = tmp_path_factory.mktemp("rel_ref")
    res = Trainer(resolve_config(None, args(data, out, "ref"))).train()
    assert res["step"] == 8
    run = out / "ref"
    return {"digest": weights_digest(run / "checkpoints/step_000008/model.safetensors"),
            "steps": (run / "steps.jsonl").read_text().splitlines(), "run": run}


def subprocess_train(data, out, name, fault=None, *extra, timeout=240):
    env = dict(ENV)
    if fault:
        env["RAHF_FAULT"] = fault
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", "none", "--resume", "latest", *args(data, out, name, *extra)]
    return subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=timeout)


def steps_of(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "steps.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_kills_at_every_point_then_resume_gives_identical_weights_and_steps(data, reference, tmp_path):
    run = tmp_path / "pieces"
    mgr = CheckpointManager(run / "checkpoints")
    # 1. killed right after checkpoint 2 is renamed into place (before pruning): it is complete
    r = subprocess_train(data, tmp_path, "pieces", "checkpoint_publish@2")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert mgr.latest_step() == 2
    # 2. resumed from 2, killed half-way through writing checkpoint 4: it must not be picked
    r = subprocess_train(data, tmp_path, "pieces", "checkpoint_write@4")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert "resumed from" in r.stdout and "at step 2 " in r.stdout
    assert (run / "checkpoints/.tmp-step_000004/model.safetensors").is_file()
    assert not (run / "checkpoints/.tmp-step_000004/checkpoint.json").exists()
    assert mgr.latest_step() == 2 and steps_of(run)[-1] == 4
    # 3. resumed from 2 (steps 3-4 logged by the killed run are dropped and run again), killed mid-evaluation at 6
    r = subprocess_train(data, tmp_path, "pieces", "mid_eval@6")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert "at step 2 " in r.stdout and "dropped 2 line(s) after step 2" in r.stdout
    assert not (run / "checkpoints/.tmp-step_000004").exists()  # leftovers of killed writes are cleaned up
    assert mgr.latest_step() == 4
    # 4. resumed from 4, killed mid-step 7 (after backward, before the update)
    r = subprocess_train(data, tmp_path, "pieces", "mid_step@7")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert "at step 4 " in r.stdout and mgr.latest_step() == 6 and steps_of(run)[-1] == 6
    # 5. resumed from 6 in this process, to the end
    res = Trainer(resolve_config(None, args(data, tmp_path, "pieces")), resume="latest").train()
    assert res["step"] == 8
    assert weights_digest(run / "checkpoints/step_000008/model.safetensors") == reference["digest"]
    # every step exactly once, with the same batches as the uninterrupted run
    assert (run / "steps.jsonl").read_text().splitlines() == reference["steps"]
    assert steps_of(run) == list(range(1, 9))


@pytest.mark.slow
def test_sigterm_checkpoints_exits_cleanly_and_resumes_identically(data, reference, tmp_path):
    env = {**ENV, "RAHF_FAULT": "stall@3"}  # step 3 done, then wait for the signal (no timing race)
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", "none", *args(data, tmp_path, "term")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    steps = tmp_path / "term" / "steps.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if steps.is_file() and any(json.loads(x)["step"] == 3 for x in steps.read_text().splitlines() if x.strip()):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    # the signal is seen at the next step's decision (taken together by every process): step 4
    assert "received SIGTERM at step 4: checkpoint written. Resume with the same command plus " \
           "`--resume latest run.name=term`" in out
    mgr = CheckpointManager(tmp_path / "term" / "checkpoints")
    assert mgr.latest_step() == 4
    manifest = json.loads((tmp_path / "term/checkpoints/step_000004/checkpoint.json").read_text())
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json", "config.json"} <= set(manifest["files"])
    res = Trainer(resolve_config(None, args(data, tmp_path, "term")), resume="latest").train()
    assert res["step"] == 8
    assert weights_digest(tmp_path / "term/checkpoints/step_000008/model.safetensors") == reference["digest"]
    assert (tmp_path / "term" / "steps.jsonl").read_text().splitlines() == reference["steps"]


@pytest.fixture()
def fault_env(monkeypatch):
    monkeypatch.setattr(faults_mod, "_fired", set())

    def set_fault(spec):
        monkeypatch.setenv("RAHF_FAULT", spec)
    return set_fault


def quick(data, out, name, *extra):
    return args(data, out, name, "train.max_steps=4", "eval.every=0", "checkpoint.every=0", "train.grad_accum=1",
                *extra)


@pytest.mark.slow
def test_nan_loss_stops_naming_step_and_uids(data, tmp_path, fault_env):
    fault_env("nan_loss@3")
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 3 .*batch uids: \['synth-train-\d+'"):
        Trainer(resolve_config(None, quick(data, tmp_path, "nan"))).train()


@pytest.mark.slow
def test_nan_gradient_stops_with_or_without_clipping(data, tmp_path, fault_env):
    fault_env("nan_grad@2")
    with pytest.raises(FloatingPointError, match=r"non-finite gradient norm at step 2 .*batch uids: \['synth"):
        Trainer(resolve_config(None, quick(data, tmp_path, "g0", "optim.grad_clip=0"))).train()


@pytest.mark.slow
def test_nonfinite_skip_skips_the_step_and_logs_it(data, tmp_path, fault_env):
    fault_env("nan_loss@2")
    res = Trainer(resolve_config(None, quick(data, tmp_path, "skip", "train.on_nonfinite=skip"))).train()
    assert res["step"] == 4
    log = [json.loads(x) for x in (tmp_path / "skip/metrics.jsonl").read_text().splitlines()]
    skipped = [r["skipped_nonfinite"] for r in log if "skipped_nonfinite" in r]
    assert len(skipped) == 1 and "non-finite loss at step 2" in skipped[0]
    assert steps_of(tmp_path / "skip") == [1, 2, 3, 4]


@pytest.mark.slow
def test_force_resume_and_tampered_optimizer_state(data, tmp_path, capsys):
    first = Trainer(resolve_config(None, quick(data, tmp_path, "f", "train.stop_after_steps=2"))).train()
    assert first["interrupted"] and first["step"] == 2
    changed = quick(data, tmp_path, "f", "optim.lr=5e-4")
    with pytest.raises(ValueError, match=r"(?s)different config.*--force.*\"lr\": 0\.002.*\"lr\": 0\.0005"):
        Trainer(resolve_config(None, changed), resume="latest").train()
    # a pickled arbitrary object in optimizer.pt is refused, never constructed
    ck = tmp_path / "f/checkpoints/step_000002"
    good = (ck / "optimizer.pt").read_bytes()
    marker = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "x": _Evil(str(marker))}, ck / "optimizer.pt")
    with pytest.raises(ValueError, match=r"optimizer\.pt holds something other than tensors.*weights_only=True"):
        Trainer(resolve_config(None, quick(data, tmp_path, "f")), resume="latest").train()
    assert not marker.exists()
    (ck / "optimizer.pt").write_bytes(good)
    capsys.readouterr()
    res = Trainer(resolve_config(None, changed), resume="latest", force=True).train()
    assert res["step"] == 4
    assert "with a different config (--force)" in capsys.readouterr().out


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_half_written_checkpoints_are_never_picked(tmp_path):
    d = tmp_path / "checkpoints"
    (d / "step_000002").mkdir(parents=True)
    (d / "step_000002" / "model.safetensors").write_bytes(b"x")
    (d / "step_000002" / "checkpoint.json").write_text(json.dumps({"files": ["model.safetensors"]}))
    (d / ".tmp-step_000004").mkdir()  # killed before the rename
    (d / "step_000006").mkdir()  # no manifest
    (d / "step_000008").mkdir()  # manifest naming a file that is not there
    (d / "step_000008" / "checkpoint.json").write_text(json.dumps({"files": ["model.safetensors"]}))
    (d / "step_000010").mkdir()  # manifest cut short
    (d / "step_000010" / "checkpoint.json").write_text('{"files": [')
    mgr = CheckpointManager(d)
    assert mgr.latest_step() == 2 and mgr.find("latest") == d / "step_000002"


def test_fault_hook_parsing_and_zero_cost_when_unset(monkeypatch):
    monkeypatch.delenv("RAHF_FAULT", raising=False)
    assert faults_mod.fault("mid_step", 1) is False
    assert parse_faults("mid_step@3, nan_loss@2") == [("mid_step", 3), ("nan_loss", 2)]
    with pytest.raises(ValueError, match="unknown fault point 'mid_stp'"):
        parse_faults("mid_stp@3")
    with pytest.raises(ValueError, match="POINT@STEP"):
        parse_faults("mid_step")


def test_weights_and_state_are_loaded_safely():
    """No trust_remote_code anywhere; every torch.load is weights_only=True; no pickle/joblib loads."""
    for p in (ROOT / "rahf").rglob("*.py"):
        text = p.read_text()
        assert not re.search(r"trust_remote_code\s*=\s*True", text), p
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), (p, m.group(0))
        assert not re.search(r"\bpickle\.loads?\(|joblib\.load\(", text), p


def test_checkpoints_use_only_accelerates_public_api():
    """Checkpoint I/O names the objects it saves; it reads no private attribute of the accelerator."""
    for p in (ROOT / "rahf" / "training").glob("*.py"):
        assert not re.search(r"accelerator\._|\bacc\._", p.read_text()), p


# ----------------------------------------------------------------------------- config errors, fail fast
@pytest.mark.parametrize("bad, message", [
    (["train.global_batch_size=30", "train.grad_accum=4"],
     r"train.global_batch_size=30 is not divisible by num_processes \(1\) × train.grad_accum \(4\) = 4"),
    (["optim.lrr=1e-4"], r"did you mean 'optim.lr'"),
    (["train.max_steps=ten"], r"train.max_steps: expected an integer"),
    (["model.vision.img_size=100"], r"img_size=100 is not a multiple of patch_size=16"),
    (["eval.every=-1"], r"eval.every must be >= 0"),
    (["data.on_bad_record=ignore"], r"data.on_bad_record: 'ignore' is not one of \['error', 'skip'\]"),
])
def test_bad_config_fails_before_touching_data(tmp_path, capsys, monkeypatch, bad, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data = tmp_path / "data" / "synth"
    rc = train_main([f"data.root={data}", f"run.output_dir={tmp_path / 'runs'}", "tracking.tracker=none", *bad])
    assert rc == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


def test_bad_fault_spec_is_a_config_error_before_data(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAHF_FAULT", "explode@3")
    rc = train_main([f"data.root={tmp_path / 'd'}", f"run.output_dir={tmp_path / 'runs'}", "tracking.tracker=none"])
    assert rc == 2 and "unknown fault point 'explode'" in capsys.readouterr().err
    assert not (tmp_path / "d").exists() and not (tmp_path / "runs").exists()


def test_global_batch_size_sets_the_per_process_batch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = resolve_config(None, ["train.global_batch_size=32", "train.grad_accum=4"])
    assert cfg.train.batch_size == 8
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_config(None, ["train.global_batch_size=32", "train.grad_accum=4"]).train.batch_size == 4
    with pytest.raises(ConfigError, match=r"num_processes \(2\) × train.grad_accum \(4\) = 8"):
        resolve_config(None, ["train.global_batch_size=12", "train.grad_accum=4"])
