"""Checkpoints from the Hugging Face Hub: repo ids resolved through the standard cache (offline), model cards,
and the packaging of ``rahf push``. No network: the cache is laid out here exactly as huggingface_hub writes it
(``models--org--name/blobs``, ``snapshots/<commit>/`` symlinks, ``refs/<branch or tag>``), and checked with
huggingface_hub's own cache scanner."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import scan_cache_dir
from PIL import Image

import rahf
from rahf.cli import main
from rahf.data.torch_data import RAHFCollator
from rahf.model.card import MARKER, build_model_card, write_model_card
from rahf.model.hub import CheckpointNotFoundError, parse_repo_id, prepare_upload, resolve_checkpoint

REPO = "acme/rahf-tiny"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def put_in_hub_cache(src, cache, repo_id, commit, refs=("main",)):
    """Copy a checkpoint directory into ``cache`` as huggingface_hub stores a downloaded snapshot: content-
    addressed blobs (sha256 for LFS files, git blob sha1 for the others), the snapshot as relative symlinks
    to the blobs, and ``refs/<name>`` holding the commit hash."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        if f.suffix == ".safetensors":
            blob_id = hashlib.sha256(data).hexdigest()
        else:
            blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / blob_id
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no trailing newline, as huggingface_hub writes it


def outputs(model):
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    items = [{"index": i, "uid": f"u{i}", "prompt": p, "tagged_prompt": p,
              "pixel_values": torch.randn(3, cfg.vision.img_size, cfg.vision.img_size, generator=g),
              "scores": torch.rand(4, generator=g),
              "implausibility_map": torch.zeros(cfg.heatmap_size, cfg.heatmap_size),
              "misalignment_map": torch.zeros(cfg.heatmap_size, cfg.heatmap_size)}
             for i, p in enumerate(["a red circle left of a blue square", "two green triangles"])]
    batch = RAHFCollator.for_model(model)(items)
    with torch.no_grad():
        out = model.eval()(**{k: v for k, v in batch.items() if torch.is_tensor(v)})
    return out.scores, out.heatmaps["implausibility"], out.heatmaps["misalignment"], out.logits


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Two tiny models (different weights) published in a Hub cache: commit A on ``main``, commit B on the
    tag ``v1``."""
    root = tmp_path_factory.mktemp("hub")
    models = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        models[name] = rahf.RAHF(rahf.RAHFConfig.preset("tiny")).eval()
        models[name].save_pretrained(root / name)
    cache = root / "cache"
    put_in_hub_cache(root / "a", cache, REPO, COMMIT_A, refs=("main",))
    put_in_hub_cache(root / "b", cache, REPO, COMMIT_B, refs=("v1",))
    return {"root": root, "cache": cache, "models": models, "out": {k: outputs(m) for k, m in models.items()}}


def test_cache_layout_is_huggingface_hubs(hub):
    info = scan_cache_dir(hub["cache"])
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and repo.repo_type == "model"
    revs = {r.commit_hash: r for r in repo.revisions}
    assert set(revs) == {COMMIT_A, COMMIT_B}
    assert revs[COMMIT_A].refs == frozenset({"main"}) and revs[COMMIT_B].refs == frozenset({"v1"})
    assert {f.file_name for f in revs[COMMIT_A].files} >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_parse_repo_id():
    assert parse_repo_id("org/name") == ("org/name", None)
    assert parse_repo_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_repo_id("org/na.me-2@" + COMMIT_A) == ("org/na.me-2", COMMIT_A)
    for not_a_repo in ("name", "/abs/dir", "./rel/dir", "runs/r/export", "org/name@", "C:/dir"):
        assert parse_repo_id(not_a_repo) is None, not_a_repo


def test_load_by_repo_id_offline_identical_outputs(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = resolve_checkpoint(REPO, cache_dir=hub["cache"])
    assert path == hub["cache"] / "models--acme--rahf-tiny" / "snapshots" / COMMIT_A
    loaded = rahf.RAHF.from_pretrained(REPO, cache_dir=hub["cache"])
    assert same(outputs(loaded), hub["out"]["a"])
    assert loaded.tokenizer("a red_0 circle")["input_ids"] == hub["models"]["a"].tokenizer("a red_0 circle")["input_ids"]


def test_load_by_revision_tag_and_commit(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    by_tag = rahf.RAHF.from_pretrained(f"{REPO}@v1", cache_dir=hub["cache"])
    assert same(outputs(by_tag), hub["out"]["b"])
    assert not same(hub["out"]["a"], hub["out"]["b"])
    by_commit = rahf.RAHF.from_pretrained(f"{REPO}@{COMMIT_B}", cache_dir=hub["cache"])
    assert same(outputs(by_commit), hub["out"]["b"])
    by_kwarg = rahf.RAHF.from_pretrained(REPO, revision="v1", cache_dir=hub["cache"])
    assert same(outputs(by_kwarg), hub["out"]["b"])
    with pytest.raises(ValueError, match="revision"):
        resolve_checkpoint(f"{REPO}@v1", revision="main", cache_dir=hub["cache"])


def test_local_files_only_without_offline_env(hub, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    loaded = rahf.RAHF.from_pretrained(f"{REPO}@v1", cache_dir=hub["cache"], local_files_only=True)
    assert same(outputs(loaded), hub["out"]["b"])
    with pytest.raises(CheckpointNotFoundError) as e:
        rahf.RAHF.from_pretrained("acme/not-cached", cache_dir=hub["cache"], local_files_only=True)
    msg = str(e.value)
    assert "'acme/not-cached'" in msg and "'main'" in msg and "local_files_only=True" in msg
    assert "hf download acme/not-cached" in msg and "local copy" in msg


def test_uncached_repo_offline_error_names_repo_and_revision(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError) as e:
        rahf.RAHF.from_pretrained("acme/other-model@v2", cache_dir=hub["cache"])
    msg = str(e.value)
    assert "'acme/other-model'" in msg and "'v2'" in msg and "HF_HUB_OFFLINE" in msg
    assert "hf download acme/other-model --revision v2" in msg and str(hub["cache"]) in msg
    # a cached repo at a revision it does not have
    with pytest.raises(CheckpointNotFoundError, match="'v9'"):
        rahf.RAHF.from_pretrained(f"{REPO}@v9", cache_dir=hub["cache"])
    # neither a directory nor a repo id
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint directory"):
        rahf.RAHF.from_pretrained(str(hub["root"] / "missing" / "dir"))


def test_cached_snapshot_without_weights_is_refused(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((hub["root"] / "a" / "config.json").read_text())
    put_in_hub_cache(partial, tmp_path / "cache", "acme/partial", COMMIT_A)
    with pytest.raises(CheckpointNotFoundError, match=r"acme/partial.*no model\.safetensors"):
        rahf.RAHF.from_pretrained("acme/partial", cache_dir=tmp_path / "cache")


def test_existing_local_directory_wins(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    local = tmp_path / REPO  # a local directory spelled like the repo id, holding model B
    local.parent.mkdir()
    hub["models"]["b"].save_pretrained(local)
    loaded = rahf.RAHF.from_pretrained(REPO, cache_dir=hub["cache"])
    assert same(outputs(loaded), hub["out"]["b"])
    assert resolve_checkpoint(REPO, cache_dir=hub["cache"]) == local.relative_to(tmp_path)


def test_scorer_by_repo_id_matches_local(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    img = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    remote = rahf.RAHFScorer.from_pretrained(REPO, device="cpu", cache_dir=hub["cache"])
    local = rahf.RAHFScorer.from_pretrained(hub["root"] / "a", device="cpu")
    r, l = remote.score(img, "a red circle")[0], local.score(img, "a red circle")[0]
    assert r.scores == l.scores and r.tagged_prompt == l.tagged_prompt
    assert np.array_equal(r.implausibility, l.implausibility)
    tagged = rahf.RAHFScorer.from_pretrained(f"{REPO}@v1", device="cpu", cache_dir=hub["cache"],
                                             local_files_only=True)
    assert tagged.score(img, "a red circle")[0].scores != r.scores


@pytest.mark.slow
def test_cli_checkpoint_repo_id_with_hf_hub_cache(hub, tmp_path):
    """``--checkpoint org/name@rev`` in a fresh process whose ``HF_HUB_CACHE`` points at the cache."""
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    env = dict(os.environ, HF_HUB_CACHE=str(hub["cache"]), HF_HUB_OFFLINE="1")
    env.pop("HF_HOME", None)
    out = tmp_path / "pred"
    proc = subprocess.run([sys.executable, "-m", "rahf.cli", "predict", "--checkpoint", f"{REPO}@v1",
                           "--image", str(tmp_path / "x.png"), "--prompt", "two green triangles",
                           "--out", str(out), "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = [json.loads(s) for s in (out / "predictions.jsonl").read_text().splitlines()]
    expected = rahf.RAHFScorer.from_pretrained(hub["root"] / "b", device="cpu").score(
        str(tmp_path / "x.png"), "two green triangles")[0]
    assert line["scores"] == pytest.approx(expected.scores, abs=1e-6)
    assert line["tagged_prompt"] == expected.tagged_prompt


# ---------------------------------------------------------------------------------------------- model card
def front_matter(text):
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_model_card_metrics_table_and_front_matter(hub, tmp_path):
    metrics = {"summary/mean": 0.40625, "score/plcc/plausibility": 0.8125, "score/srcc/plausibility": 0.6875,
               "score/plcc/overall": 0.34375, "score/srcc/overall": -0.09375,
               "heatmap/mse_all/implausibility": 0.015625, "heatmap/cc/misalignment": 0.21875,
               "keyword/f1": 0.5625, "count/n": 300.0}
    d = tmp_path / "ck"
    hub["models"]["a"].save_pretrained(d, metadata={"step": 1200}, metrics=metrics)
    assert json.loads((d / "metrics.json").read_text()) == metrics
    text = (d / "README.md").read_text()
    meta, body = front_matter(text)
    assert meta["library_name"] == "rahf" and meta["license"] == "other" and "rahf" in meta["tags"]
    assert {"pearsonr", "spearmanr", "mse", "f1"} <= set(meta["metrics"])
    assert MARKER in body
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in body.splitlines() if line.startswith("| ")}
    assert "| metric | plausibility | overall |" in body
    assert rows["plcc"] == ["0.8125", "0.3438"] and rows["srcc"] == ["0.6875", "-0.0938"]
    assert rows["mse_all"][0] == "0.0156" and rows["cc"][-1] == "0.2188"
    assert rows["f1"] == ["0.5625"] and rows["n"] == ["300"] and rows["mean"] == ["0.4062"]
    n = hub["models"]["a"].num_parameters()
    assert rows["parameters"][0].startswith(f"{n:,} ")
    assert rows["preset"] == ["`tiny`"] and rows["variant"] == ["`multi_head`"] and rows["training steps"] == ["1200"]
    assert rows["image size"][0].startswith("128×128 px")
    for section in ("## How to use", "## Model", "## Evaluation", "## Training data",
                    "## Intended use and limitations", "## Data terms"):
        assert section in body
    assert "RichHF-18K" in body and "Pick-a-Pic" in body
    # a card built without metrics says so
    card = build_model_card(hub["root"] / "b", repo_id="acme/x")
    assert "No `metrics.json`" in str(card) and 'from_pretrained("acme/x")' in str(card)


def test_write_model_card_reads_metrics_json_and_training_run(hub, tmp_path):
    run, data = tmp_path / "run", tmp_path / "data"
    data.mkdir()
    (data / "dataset.json").write_text(json.dumps({"format": "rahf-dataset", "version": 1, "source": "synth",
                                                   "splits": {"train": 30, "dev": 5, "test": 7}}))
    hub["models"]["b"].save_pretrained(run / "export")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"root": str(data)}}))
    (run / "export" / "metrics.json").write_text(json.dumps({"score/plcc/aesthetics": 0.71875}))
    path = write_model_card(run / "export", repo_id="acme/synth-tiny", license="apache-2.0")
    meta, body = front_matter(path.read_text())
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["rahf-synth"]
    assert "synthetic-data" in meta["tags"]
    assert "| plcc | 0.7188 |" in body and "train 30" in body and "test 7" in body
    assert 'RAHFScorer.from_pretrained("acme/synth-tiny")' in body
    # a hand-written card is kept unless overwrite=True
    (run / "export" / "README.md").write_text("# my own card\n")
    with pytest.warns(UserWarning, match="hand-written"):
        assert write_model_card(run / "export") is None
    assert (run / "export" / "README.md").read_text() == "# my own card\n"
    assert MARKER in write_model_card(run / "export", overwrite=True).read_text()


# ---------------------------------------------------------------------------------------------- push
def test_prepare_upload_lists_only_safe_files(hub, tmp_path):
    d = tmp_path / "ck"
    hub["models"]["a"].save_pretrained(d, metrics={"summary/mean": 0.5})
    (d / "train.log").write_text("log\n")
    (d / "report").mkdir()
    (d / "report" / "index.html").write_text("<html></html>")
    files = prepare_upload(d)
    assert set(files) == {"README.md", "config.json", "metrics.json", "model.safetensors", "tokenizer.json",
                          "tokenizer_config.json"}
    (d / "report" / "optimizer.pt").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match=r"report/optimizer\.pt"):
        prepare_upload(d)
    (d / "report" / "optimizer.pt").unlink()
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="model.safetensors"):
        prepare_upload(d)


def test_push_dry_run_and_offline_refusal(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = tmp_path / "ck"
    hub["models"]["a"].save_pretrained(d)
    (d / "README.md").unlink()
    assert main(["push", "--checkpoint", str(d), "--repo", "acme/pushed", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "would upload 5 file(s) to acme/pushed" in printed and "model.safetensors" in printed
    assert 'from_pretrained("acme/pushed")' in (d / "README.md").read_text()
    with pytest.raises(SystemExit, match="HF_HUB_OFFLINE"):
        main(["push", "--checkpoint", str(d), "--repo", "acme/pushed"])
    with pytest.raises(SystemExit, match="org/name"):
        main(["push", "--checkpoint", str(d), "--repo", "acme/pushed@v1"])
    with pytest.raises(SystemExit, match="NO_SUCH_TOKEN_VAR"):
        main(["push", "--checkpoint", str(d), "--repo", "acme/pushed", "--token-env", "NO_SUCH_TOKEN_VAR"])
