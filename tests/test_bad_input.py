"""Bad input: every kind of the corpus (tests/badcorpus.py) gives a clear error naming the record, or
with data.on_bad_record=skip a counted, listed skip; the validator flags exactly the records that do
not load, with the loader's own message; the converter's report covers the kinds that apply to it."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from badcorpus import BAD_KINDS, KINDS, bomb_png, build
from rahf.cli import main as rahf_main
from rahf.data.format import DataError, load_image, load_map, open_dataset
from rahf.data.validate import validate_dataset
from rahf.data.torch_data import RAHFCollator, RAHFTorchDataset
from rahf.training.config import resolve_config
from rahf.training.trainer import Trainer, main as train_main

SHRINK = ["model.vision.img_size=64", "model.vision.depth=1", "model.text.num_layers=1",
          "model.text.num_decoder_layers=1", "train.threads=1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from rahf.data.synth import generate

    root = tmp_path_factory.mktemp("bad_base")
    generate(root, train=len(KINDS) + 6, dev=8, test=0, size=64, seed=1, workers=1)
    return root


@pytest.fixture(scope="module")
def corpus(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_corpus") / "ds"
    return root, build(root, base)


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_alone_with_on_bad_record_error(base, tmp_path, kind):
    cases = build(tmp_path / "ds", base, kinds=[kind])
    case = cases[kind]
    if case.stage == "manifest":
        with pytest.raises(DataError) as ei:
            open_dataset(tmp_path / "ds", "train")
        msg = str(ei.value)
        assert re.search(case.pattern, msg), msg
        assert f"manifest.jsonl:{case.line}" in msg  # names the line (and the uid when the line has one)
        if kind not in ("bad_json", "invalid_utf8"):
            assert repr(ei.value.uid) in msg
        return
    split = open_dataset(tmp_path / "ds", "train")
    ds = RAHFTorchDataset(split, 64, 32)
    i = split.uids.index(case.uid)
    if case.stage == "ok":
        item = ds[i]
        assert item["pixel_values"].shape == (3, 64, 64) and torch.isfinite(item["pixel_values"]).all()
        return
    with pytest.raises(DataError) as ei:
        ds[i]
    msg = str(ei.value)
    assert msg.startswith(f"record {case.uid!r}") and re.search(case.pattern, msg), msg


def test_skip_mode_drops_counts_and_lists_through_dataloader_workers(corpus):
    root, cases = corpus
    split = open_dataset(root, "train", on_bad_record="skip")
    manifest_bad = {c.line for c in cases.values() if c.stage == "manifest"}
    assert {int(e.where.rsplit(":", 1)[1]) for e in split.bad} == manifest_bad
    for e in split.bad:
        case = next(c for c in cases.values() if c.line == int(e.where.rsplit(":", 1)[1]))
        assert re.search(case.pattern, e.problem), (case.kind, e.problem)
    assert split.total == len(split.entries) + len(split.bad) == len(KINDS) + 6
    ds = RAHFTorchDataset(split, 64, 32)
    from rahf.model import RAHF
    from rahf.model.config import RAHFConfig

    collate = RAHFCollator.for_model(RAHF(RAHFConfig.preset("tiny", vision={"img_size": 64, "depth": 1})))
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=1, collate_fn=collate)
    seen, bad = [], {}
    for batch in loader:
        seen += batch["uids"]
        bad.update({b["uid"]: b["problem"] for b in batch["bad_records"]})
        if batch["uids"]:
            assert batch["pixel_values"].shape[0] == len(batch["uids"])
    load_bad = {c.uid: c for c in cases.values() if c.stage == "load"}
    assert set(bad) == set(load_bad)
    for uid, problem in bad.items():
        assert re.search(load_bad[uid].pattern, problem), (uid, problem)
    assert len(seen) + len(bad) == len(split)
    assert {cases[k].uid for k in ("image_rgba", "image_cmyk", "image_grayscale")} <= set(seen)


def small(root, out, name, *extra):
    return [f"data.root={root}", f"run.output_dir={out}", f"run.name={name}", "tracking.tracker=none",
            "data.num_workers=0", "data.generate_synth=false", "train.batch_size=4", "eval.batch_size=8",
            "optim.warmup_steps=1", "eval.every=0", "checkpoint.every=0", "eval.test_at_end=false", *SHRINK, *extra]


@pytest.mark.slow
def test_training_with_skip_counts_and_lists_every_bad_record(corpus, tmp_path, capsys):
    root, cases = corpus
    dev = root / "dev"
    first_dev = json.loads((dev / "manifest.jsonl").read_text().splitlines()[0])
    (dev / first_dev["image"]).rename(dev / "gone.png")  # one bad dev record, met by the evaluation
    try:
        total = len(KINDS) + 6
        n_manifest_bad = sum(c.stage == "manifest" for c in cases.values())
        steps = -(-(total - n_manifest_bad) // 4) + 1  # one epoch (batches of 4 loaded records) and a step more
        res = Trainer(resolve_config(None, small(root, tmp_path, "skip", f"train.max_steps={steps}",
                                                 "data.on_bad_record=skip", "data.max_bad_fraction=0.9"))).train()
    finally:
        (dev / "gone.png").rename(dev / first_dev["image"])
    out = capsys.readouterr().out
    run = tmp_path / "skip"
    recs = [json.loads(x) for x in (run / "bad_records.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["split"] == "train"]
    assert len(train) == len(BAD_KINDS)  # each once, although met in two epochs
    by_line = {int(r["where"].rsplit(":", 1)[1]): r for r in train if r["stage"] == "manifest"}
    by_uid = {r["uid"]: r for r in train if r["stage"] == "load"}
    for c in cases.values():
        if c.stage == "manifest":
            assert re.search(c.pattern, by_line[c.line]["problem"]), c
        elif c.stage == "load":
            assert re.search(c.pattern, by_uid[c.uid]["problem"]), c
    assert [r["uid"] for r in recs if r["split"] == "dev"] == [first_dev["uid"]]
    assert res["bad_records"] == {"dev": {"bad": 1, "total": 8}, "train": {"bad": len(BAD_KINDS), "total": total}}
    assert f"epoch 0: skipped {len(BAD_KINDS) - 9} bad record(s) of split 'train'" in out  # the load-time ones
    assert f"bad records skipped (data.on_bad_record=skip): dev 1 of 8, train {len(BAD_KINDS)} of {total}" in out
    trained = {u for x in (run / "steps.jsonl").read_text().splitlines() for u in json.loads(x)["uids"]}
    assert not trained & set(by_uid)
    assert {cases[k].uid for k in ("image_rgba", "image_cmyk", "image_grayscale")} <= trained


@pytest.mark.slow
def test_max_bad_fraction_stops_a_mostly_broken_run(corpus, tmp_path):
    root, _ = corpus
    total = len(KINDS) + 6
    # manifest problems alone exceed 20%: stops when the split is opened
    with pytest.raises(DataError, match=rf"split 'train': 9 of {total} records are bad .*max_bad_fraction=0.2"):
        Trainer(resolve_config(None, small(root, tmp_path, "a", "data.on_bad_record=skip",
                                           "data.max_bad_fraction=0.2", "train.max_steps=20"))).train()
    # 50%: passes the manifest, stops while loading once more than half are known bad
    with pytest.raises(DataError, match=rf"(\d+) of {total} records are bad .*max_bad_fraction=0.5"):
        Trainer(resolve_config(None, small(root, tmp_path, "b", "data.on_bad_record=skip",
                                           "data.max_bad_fraction=0.5", "train.max_steps=20"))).train()


@pytest.mark.slow
def test_error_mode_training_names_the_record(base, tmp_path, capsys):
    cases = build(tmp_path / "ds", base, kinds=["truncated_jpeg"])
    rc = train_main(["--config", "none", *small(tmp_path / "ds", tmp_path, "err", "train.max_steps=20")])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"data error: record {cases['truncated_jpeg'].uid!r}: image " in err and "does not decode" in err
    assert "data.on_bad_record=skip" in err


def test_validate_lists_every_corpus_problem(corpus, capsys):
    root, cases = corpus
    rc = rahf_main(["data", "validate", str(root)])
    out = capsys.readouterr().out
    assert rc != 0
    lines = out.splitlines()
    for c in cases.values():
        key = f"manifest.jsonl:{c.line}" if c.kind in ("bad_json", "invalid_utf8") else c.uid
        hits = [line for line in lines if f" {key}:" in line]
        if c.stage == "ok":
            assert not hits, (c.kind, hits)
        else:
            assert hits, (c.kind, out)


def _load_outcomes(root) -> dict[int, str | None]:
    """Per train manifest line: the loader's problem with the record, or None when it loads."""
    split = open_dataset(root, "train", on_bad_record="skip")
    out: dict[int, str | None] = {int(e.where.rsplit(":", 1)[1]): e.problem for e in split.bad}
    for i, entry in enumerate(split.entries):
        try:
            split[i]
            out[entry["_line"]] = None
        except DataError as e:
            out[entry["_line"]] = e.problem
    return out


@pytest.mark.parametrize("declared", [None, 64, 32], ids=["no_heatmap_size", "heatmap_size_64", "heatmap_size_32"])
def test_validator_passes_exactly_what_loads(base, tmp_path, declared):
    root = tmp_path / "ds"
    cases = build(root, base)
    if declared is not None:  # the corpus' maps are 64×64 (one is 20×20): 32 makes every record bad
        info = json.loads((root / "dataset.json").read_text())
        (root / "dataset.json").write_text(json.dumps({**info, "heatmap_size": declared}))
    loaded = _load_outcomes(root)
    assert sorted(loaded) == list(range(1, len(KINDS) + 7))  # every line accounted for
    report = validate_dataset(root, ["train"])
    assert all(p.line is not None for p in report.problems), [str(p) for p in report.problems]
    flagged: dict[int, list[str]] = {}
    for p in report.problems:
        flagged.setdefault(p.line, []).append(p.message)
    failing = {line for line, problem in loaded.items() if problem}
    assert set(flagged) == failing  # passes the validator <=> loads
    for line in failing:  # the same rule, so the same words
        head = loaded[line].split(" (")[0]
        assert any(m.startswith(head) for m in flagged[line]), (line, loaded[line], flagged[line])
    ok = {c.line for c in cases.values() if c.stage == "ok"}
    if declared == 32:
        assert failing == set(loaded)
    else:
        assert failing == {c.line for c in cases.values() if c.stage != "ok"} and not ok & failing


def test_bad_dataset_json_is_an_error_for_loader_and_validator(base, tmp_path):
    root = tmp_path / "ds"
    build(root, base, kinds=[])
    info = json.loads((root / "dataset.json").read_text())
    for bad, problem in (({**info, "heatmap_size": "64"}, "heatmap_size must be a positive integer, got '64'"),
                         ({**info, "heatmap_size": 0}, "heatmap_size must be a positive integer, got 0")):
        (root / "dataset.json").write_text(json.dumps(bad))
        with pytest.raises(DataError, match=re.escape(problem)) as ei:
            open_dataset(root, "train", on_bad_record="skip")
        assert "dataset.json" in str(ei.value)
        assert [(p.uid, p.message) for p in validate_dataset(root).problems] == [("dataset.json", problem)]
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="dataset.json: does not parse"):
        open_dataset(root, "train")
    assert [p.uid for p in validate_dataset(root).problems] == ["dataset.json"]


def test_loader_functions_directly(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(bomb_png())
    with pytest.raises(DataError, match="decompression bomb"):
        load_image(p, "u1")
    m = tmp_path / "m.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).convert("1").save(m)
    with pytest.raises(DataError, match="mode '1'"):
        load_map(m, "u1")
    Image.fromarray(np.full((4, 5), 255, np.uint8), mode="L").save(m)
    assert load_map(m).shape == (4, 5) and load_map(m).max() == 1.0
    for fmt in ("JPEG", "BMP", "TIFF"):  # mode 'L', decodes, but not PNG
        Image.fromarray(np.full((4, 5), 255, np.uint8), mode="L").save(m, format=fmt)
        with pytest.raises(DataError, match=re.escape(f"{tmp_path.name}/m.png is a {fmt} file; expected an 8-bit "
                                                      f"grayscale PNG")):
            load_map(m, "u1")
    rgba = tmp_path / "a.png"
    Image.new("RGBA", (9, 9), (10, 20, 30, 0)).save(rgba)
    assert load_image(rgba).mode == "RGB" and load_image(rgba).getpixel((0, 0)) == (10, 20, 30)


def test_declared_heatmap_size_is_enforced(base, tmp_path):
    build(tmp_path / "ds", base, kinds=[])
    info = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps({**info, "heatmap_size": 32}))
    split = open_dataset(tmp_path / "ds", "train")
    with pytest.raises(DataError, match="heatmaps are 64×64; dataset.json declares heatmap_size 32"):
        split[0]


# ----------------------------------------------------------------------------- the converter
def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_converter_corpus_cases(tmp_path):
    from rahf.data.richhf import REPORT_NAME, convert_richhf
    from rahf.data.tfrecord import TFRecordWriter, encode_example

    gray = np.arange(120, dtype=np.uint8).reshape(12, 10)
    ok_map = _png_bytes(Image.fromarray(gray, mode="L"))
    maps = {
        "m16": _png_bytes(Image.fromarray(gray.astype(np.uint16) * 257)),  # 16-bit: converted to 8 bit
        "mpal": _png_bytes(Image.fromarray(gray, mode="L").convert("P")),  # palette: converted to gray
        "mbig": _png_bytes(Image.fromarray(np.zeros((20, 20), np.uint8), mode="L")),  # other size than its pair
        "mbad": b"\x89PNG\r\n\x1a\n truncated",
    }

    def rec(uid, scores=(0.5, 0.5, 0.5, 0.5), amap=ok_map):
        return encode_example({"filename": f"{uid}.jpg", "artifact_score": [scores[0]], "misalignment_score": [scores[1]],
                               "aesthetics_score": [scores[2]], "overall_score": [scores[3]], "artifact_map": amap,
                               "misalignment_map": ok_map, "prompt_misalignment_label": "1 1"})

    tf = tmp_path / "tf"
    tf.mkdir()
    uids = ["good", "trunc", "zero", "m16", "mpal", "mbig", "mbad", "nan"]
    with TFRecordWriter(tf / "train.tfrecord") as w:
        for u in uids:
            w.write(rec(u, scores=(0.5, float("nan"), 0.5, 0.5)) if u == "nan" else rec(u, amap=maps.get(u, ok_map)))
    for s in ("dev", "test"):
        with TFRecordWriter(tf / f"{s}.tfrecord") as w:
            pass
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="JPEG")
    jpg = buf.getvalue()
    for u in uids:
        (imgs / f"{u}.jpg").write_bytes({"trunc": jpg[: len(jpg) // 2], "zero": b""}.get(u, jpg))
    (imgs / "captions.jsonl").write_text("".join(json.dumps({"uid": u, "caption": "red square"}) + "\n" for u in uids))
    out = tmp_path / "out"
    report = convert_richhf(tf, imgs, out, progress=False, log=lambda m: None)
    skipped = report["splits"]["train"]["skipped"]
    assert skipped.get("corrupt_image") == ["trunc", "zero"]
    assert skipped.get("nonfinite_score") == ["nan"]
    assert skipped.get("corrupt_heatmap") == ["mbad"]
    assert json.loads((out / REPORT_NAME).read_text())["splits"]["train"]["skipped"] == skipped
    kept = open_dataset(out, "train").uids
    assert {"good", "m16", "mpal"} <= set(kept)
    for u in ("m16", "mpal"):
        with Image.open(out / "train" / "implausibility" / f"{u}.png") as im:
            assert im.mode == "L" and im.size == (10, 12)
    # a record whose two maps differ in size: the converter keeps it as is (no --heatmap-size), the
    # loader refuses it by name
    assert "mbig" in kept
    split = open_dataset(out, "train")
    with pytest.raises(DataError, match="record 'mbig': heatmaps differ in size"):
        split[split.uids.index("mbig")]
