"""Two CPU processes (gloo) with a fault on ONE rank: every process takes the same branch (one
all-reduce of flags per step), nothing hangs (each launch has a timeout), the replicas stay identical.
Also the per-step decision itself, in one process (no collective)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rahf.training.loop_utils import STEP_FLAGS, decide_together

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("RAHF_FAULT", None)
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch/cpu_2proc.yaml")]


def decision(**per_rank):
    """The decision for flags given as ``flag=[value of rank 0, value of rank 1, ...]`` (what the
    all-reduce of every rank's flags yields), computed in one process."""
    world = len(next(iter(per_rank.values())))
    values = {name: list(per_rank.get(name, [0] * world)) for name in STEP_FLAGS}
    from rahf.training.loop_utils import StepDecision

    return StepDecision(values)


def test_one_process_decision_needs_no_collective_and_names_the_rank():
    d = decide_together({"nonfinite_loss": True, "signal": signal.SIGTERM}, rank=0, world=1)
    assert d.ranks["nonfinite_loss"] == [0] and d.values["signal"] == [int(signal.SIGTERM)]
    assert d.ranks["empty_batch"] == [] and d.who("nonfinite_loss") == "rank 0"
    with pytest.raises(ValueError, match="unknown step flags"):
        decide_together({"nan": True}, rank=0, world=1)


@pytest.mark.parametrize("flags, policy, fp16, action", [
    ({}, "error", False, "step"),
    ({"empty_batch": [0, 1]}, "error", False, "step"),  # an empty rank joins with a zero gradient
    ({"nonfinite_loss": [1, 0]}, "skip", False, "skip"),
    ({"nonfinite_loss": [0, 1]}, "error", False, "error"),
    ({"nonfinite_grad": [0, 1]}, "skip", False, "skip"),
    ({"nonfinite_grad": [0, 1]}, "error", False, "error"),
    # fp16: an overflowing gradient is the gradient scaler's to skip, whatever the policy
    ({"nonfinite_grad": [1, 0]}, "error", True, "scaler"),
    ({"nonfinite_grad": [1, 1]}, "skip", True, "scaler"),
    # a non-finite loss is not an overflow: the policy holds under fp16 too
    ({"nonfinite_loss": [1, 0]}, "error", True, "error"),
])
def test_step_action(flags, policy, fp16, action):
    d = decision(**{**{"signal": [0, 0]}, **flags})
    assert d.action(policy, fp16) == action


def test_who_names_every_rank():
    d = decision(signal=[0, 15, 0, 15], time_limit=[1, 0, 0, 0])
    assert d.who("signal") == "ranks 1, 3" and d.who("time_limit") == "rank 0"


# ------------------------------------------------------------------------- two processes
@pytest.fixture(scope="module")
def data(small_synth_root):
    return small_synth_root


def args(data, out, name, *extra):
    return [f"data.root={data}", f"run.output_dir={out}", f"run.name={name}", "model.vision.img_size=64",
            "model.vision.depth=1", "model.text.num_layers=1", "model.text.num_decoder_layers=1", "train.threads=1",
            "train.batch_size=4", "train.max_steps=8", "eval.every=0", "checkpoint.every=0", "eval.test_at_end=false",
            "optim.warmup_steps=2", "tracking.tracker=none", "data.num_workers=0", "data.generate_synth=false",
            "train.collective_timeout_s=120", *extra]


def launch(tmp_path, name, data, fault, *extra, timeout=300, popen=False):
    cmd = LAUNCH + [str(ROOT / "tests/dist_train_check.py"), str(tmp_path / f"{name}-out"),
                    *args(data, tmp_path, name, *extra)]
    env = {**ENV, "RAHF_FAULT": fault}
    if popen:
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def ranks_out(tmp_path, name):
    out = tmp_path / f"{name}-out"
    digests = [(out / f"rank{r}.txt").read_text() for r in (0, 1)]
    info = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return digests, info


def jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_one_rank_faults_bad_batch_nan_loss_and_time_limit(data, tmp_path):
    """Rank 1's whole batch of step 2 is bad; rank 0's loss at step 3 is NaN (skip); rank 1 alone then
    reaches the time limit at step 5: every rank takes the same branch each time."""
    res = launch(tmp_path, "skip", data, "bad_batch@2@1,nan_loss@3@0,clock_jump@5@1", "data.on_bad_record=skip",
                 "data.max_bad_fraction=0.5", "train.on_nonfinite=skip", "train.time_limit_minutes=600")
    assert res.returncode == 0, res.stderr[-3000:]
    (d0, d1), info = ranks_out(tmp_path, "skip")
    assert d0 == d1  # identical replicas
    assert [i["step"] for i in info] == [5, 5] and info[0]["num_processes"] == 2
    assert all(i["stopped_early"]["reason"] == "time limit" and i["stopped_early"]["step"] == 5 for i in info)
    assert "the time limit was reached on rank 1: every process stops after step 5" in res.stdout
    run = tmp_path / "skip"
    log = jsonl(run / "metrics.jsonl")
    empty = [r for r in log if "empty_batch_ranks" in r]
    assert [(r["step"], r["empty_batch_ranks"]) for r in empty] == [(2, [1])]
    skipped = [r for r in log if "skipped_nonfinite" in r]
    assert len(skipped) == 1 and skipped[0]["ranks"] == [0]
    assert skipped[0]["skipped_nonfinite"].startswith("non-finite loss at step 3 on rank 0 (epoch")
    # every step once; step 2 trained on rank 0's batch only, rank 1's records are listed as bad
    steps = jsonl(run / "steps.jsonl")
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5]
    assert [len(s["uids"]) for s in steps] == [8, 4, 8, 8, 8]
    bad = jsonl(run / "bad_records.jsonl")
    assert len(bad) == 4 and all(b["problem"] == "RAHF_FAULT: bad_batch" and b["step"] == 2 for b in bad)
    assert not set(b["uid"] for b in bad) & set(steps[1]["uids"])


@pytest.mark.slow
def test_nan_loss_on_one_rank_stops_every_rank_with_the_error(data, tmp_path):
    t0 = time.time()
    res = launch(tmp_path, "err", data, "nan_loss@2@0")
    assert res.returncode != 0
    assert time.time() - t0 < 120  # the error, not the collective timeout, ended it
    assert "FloatingPointError: non-finite loss at step 2 on rank 0 (epoch 0, batch 1); batch uids: ['" in res.stderr
    assert "another process died or is stuck" not in res.stderr


@pytest.mark.slow
def test_sigterm_to_one_rank_checkpoints_every_rank_at_the_same_step(data, tmp_path):
    proc = launch(tmp_path, "term", data, "stall@3@1", popen=True)
    steps, pid = tmp_path / "term" / "steps.jsonl", tmp_path / "term-out" / "pid1"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if pid.is_file() and steps.is_file() and any(s["step"] == 3 for s in jsonl(steps)):
                break
            time.sleep(0.2)
        os.kill(int(pid.read_text()), signal.SIGTERM)  # rank 1 only
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    (d0, d1), info = ranks_out(tmp_path, "term")
    assert d0 == d1
    assert [(i["step"], i["interrupted"]) for i in info] == [(4, True), (4, True)]
    assert "received SIGTERM on rank 1 at step 4: checkpoint written" in out
    ckpts = sorted(p.name for p in (tmp_path / "term" / "checkpoints").iterdir() if not p.name.startswith("."))
    assert ckpts == ["step_000004"]
    assert {"rng_0.pt", "rng_1.pt"} <= {p.name for p in (tmp_path / "term/checkpoints/step_000004").iterdir()}


@pytest.mark.slow
def test_a_stuck_rank_becomes_an_error_naming_the_waiting_rank(data, tmp_path):
    """Rank 1 stalls (no signal comes): rank 0's next collective times out and raises, naming the rank."""
    t0 = time.time()
    res = launch(tmp_path, "stuck", data, "stall@2@1", "train.collective_timeout_s=8", timeout=200)
    assert res.returncode != 0
    assert "rank 0: a collective of step 3 failed; another process died or is stuck " \
           "(train.collective_timeout_s=8 s)" in res.stderr
    assert time.time() - t0 < 110  # well before the stall's own end (120 s)


# ------------------------------------------------------------------------- evaluation
def _examples(path: Path) -> dict:
    return {r["uid"]: r for r in jsonl(path)}


def _close(a, b, tol=1e-3) -> bool:
    """Equal up to float32 rounding: a record evaluated in a batch of another size (record 9 below: alone
    under one process, beside padding copies under two) goes through kernels that round differently, and a
    rank-based map metric (AUC-Judd) can then move by one pixel's share when two near-equal values swap."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        return (a is None and b is None) or (a is not None and b is not None and abs(a - b) <= tol)
    return a == b


@pytest.mark.slow
def test_distributed_evaluation_counts_each_example_once_whatever_was_dropped(tmp_path):
    """The trainer's evaluation of 10 test records (batch size 3; records 1, 4, 6, 7, 8 do not decode)
    under two processes: rank 0's last batch (6, 7, 8) is entirely bad, rank 1's first (3, 4, 5) loses
    one, and rank 1's last is record 9 padded with copies of 0 (good) and 1 (bad). Every rank joins every
    gather (no hang), each example counts once by dataset index, and metrics, per-example values and
    bad-record counts equal those of one process."""
    from rahf.data.synth import generate
    from rahf.eval.evaluate import read_metrics

    root = tmp_path / "data"
    generate(root, train=8, dev=2, test=10, size=64, seed=1, workers=1)
    records = jsonl(root / "test" / "manifest.jsonl")
    bad = {1, 4, 6, 7, 8}
    for i in bad:
        (root / "test" / records[i]["image"]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    extra = args(root, tmp_path, "ev", "eval.batch_size=3", "data.on_bad_record=skip", "data.max_bad_fraction=0.9")
    check = str(ROOT / "tests/dist_eval_check.py")
    one = subprocess.run([sys.executable, check, str(tmp_path / "one"), *extra], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(LAUNCH + [check, str(tmp_path / "two"), *extra], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]

    m1, u1, _ = read_metrics(tmp_path / "one" / "metrics0.json")
    ranks = [read_metrics(tmp_path / "two" / f"metrics{r}.json") for r in (0, 1)]
    assert [r[2]["num_processes"] for r in ranks] == [2, 2]
    good = {records[i]["uid"] for i in range(len(records)) if i not in bad}
    assert m1["count/n"] == len(good) and m1["count/bad_records"] == len(bad)
    for m2, u2, _ in ranks:
        assert m2.keys() == m1.keys() and u2 == u1
        # batch-mean losses: rank 1's last batch holds the padding copy of record 0 (documented)
        differ = {k for k in m1 if not k.startswith("loss/") and not _close(m1[k], m2[k])
                  and not (math.isnan(m1[k]) and math.isnan(m2[k]))}
        assert not differ, {k: (m1[k], m2[k]) for k in differ}
    e1 = _examples(tmp_path / "one" / "examples0.jsonl")
    assert set(e1) == good
    for r in (0, 1):
        e2 = _examples(tmp_path / "two" / f"examples{r}.jsonl")
        assert len(jsonl(tmp_path / "two" / f"examples{r}.jsonl")) == len(good)  # each once
        assert e2.keys() == e1.keys()
        assert all(_close(e1[u], e2[u]) for u in e1), [u for u in e1 if not _close(e1[u], e2[u])]
    summary = {"test": {"bad": len(bad), "total": len(records)}}
    assert [json.loads((tmp_path / d / f"bad{r}.json").read_text()) for d, r in (("one", 0), ("two", 0), ("two", 1))] \
        == [summary] * 3


# ------------------------------------------------------------------------- SLURM
def _exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def test_slurm_script_forwards_the_preemption_warning_and_requeues(tmp_path):
    """launch/slurm.sbatch under bash with Slurm faked: stand-ins for ``srun`` (forwards signals to its
    task, as srun does), ``scontrol`` and ``accelerate`` (records its arguments, exits 0 on SIGTERM as
    the trainer does after checkpointing). SIGTERM to the batch shell reaches the training process, and
    the job is requeued with a command that resumes."""
    bin_, log = tmp_path / "bin", tmp_path / "log"
    bin_.mkdir()
    log.mkdir()
    _exe(bin_ / "srun", '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n"$@" &\nchild=$!\n'
                        'trap \'kill -TERM $child\' TERM\nwhile :; do wait $child && s=0 || s=$?; '
                        'kill -0 $child 2>/dev/null || exit $s; done\n')
    _exe(bin_ / "scontrol", f'#!/bin/bash\nif [ "$1" = show ]; then echo node-a; echo node-b; '
                            f'else echo "$@" >> {log}/scontrol; fi\n')
    _exe(bin_ / "accelerate", f'#!/bin/bash\necho "$@" > {log}/args\ntrap \'echo TERM > {log}/term; exit 0\' TERM\n'
                              'for i in $(seq 600); do sleep 0.1; done\nexit 3\n')
    env = {"PATH": f"{bin_}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_NNODES": "2", "SLURM_NODEID": "0", "HOME": str(tmp_path)}
    proc = subprocess.Popen(["bash", str(ROOT / "launch/slurm.sbatch"), "configs/paper.yaml", "data.root=/d"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        while not (log / "args").is_file() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # the trap of the stand-in is set
        proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 does
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert (log / "term").read_text().strip() == "TERM"  # the training process got the warning
    args = (log / "args").read_text()
    assert "--machine_rank 0" in args and "--num_processes 16" in args and "--main_process_ip node-a" in args
    assert "train.py --config configs/paper.yaml --resume latest run.name=slurm-4242 data.root=/d" in args
    assert (log / "scontrol").read_text().split() == ["requeue", "4242"]
    assert "requeueing job 4242" in err
