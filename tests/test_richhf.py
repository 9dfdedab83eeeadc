"""RichHF-18K converter and TFRecord reader/writer, on fixtures built here (no network, no TensorFlow)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rahf.cli import main as cli_main
from rahf.data.format import load_map, open_dataset, read_manifest
from rahf.data.richhf import CACHE_NAME, REPORT_NAME, convert_richhf, heatmap_png
from rahf.data.tfrecord import (
    BytesList, Example, Feature, Features, FloatList, Int64List, TFRecordError, TFRecordWriter, crc32c,
    decode_example, encode_example, iter_tfrecord, masked_crc32c,
)

MAP_SHAPE = (12, 10)  # tiny heatmaps; the converter keeps their original size by default


# ------------------------------------------------------------------------------------------
# fixture builders
# ------------------------------------------------------------------------------------------


def img_bytes(fmt: str, color, size=(10, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def heat(seed: int, zero: bool = False) -> np.ndarray:
    """A heatmap already quantised to k/255 (so round trips are exact)."""
    if zero:
        return np.zeros(MAP_SHAPE, np.float64)
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, MAP_SHAPE).astype(np.float64) / 255.0


def png_of(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.rint(arr * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def record(uid, labels, scores=(0.75, 0.5, 0.25, 1.0), seed=0, ext="jpg", drop=(), amap=None, mmap=None):
    """scores = (artifact, misalignment, aesthetics, overall)."""
    feats = {
        "filename": f"{uid}.{ext}",
        "artifact_score": [float(scores[0])],
        "misalignment_score": [float(scores[1])],
        "aesthetics_score": [float(scores[2])],
        "overall_score": [float(scores[3])],
        "artifact_map": amap if amap is not None else png_of(heat(seed)),
        "misalignment_map": mmap if mmap is not None else png_of(heat(seed + 100, zero=seed % 2 == 0)),
        "prompt_misalignment_label": labels,
    }
    for k in drop:
        feats.pop(k)
    return encode_example(feats)


def write_tfrecord(path: Path, records) -> None:
    with TFRecordWriter(path) as w:
        for r in records:
            w.write(r)


def write_shard(path: Path, rows, row_group_size=2) -> None:
    """rows: (caption, uid0, jpg0, uid1, jpg1)."""
    table = pa.table({
        "are_different": [True] * len(rows),
        "caption": [r[0] for r in rows],
        "image_0_uid": [r[1] for r in rows],
        "jpg_0": pa.array([r[2] for r in rows], pa.binary()),
        "image_1_uid": [r[3] for r in rows],
        "jpg_1": pa.array([r[4] for r in rows], pa.binary()),
        "label_0": [0.5] * len(rows),
    })
    pq.write_table(table, path, row_group_size=row_group_size)


PNG_A = img_bytes("PNG", (255, 0, 0))
JPG_B = img_bytes("JPEG", (0, 255, 0))
WEBP_E = img_bytes("WEBP", (0, 0, 255))
JPG_F = img_bytes("JPEG", (9, 9, 9), size=(9, 11))
PNG_G = img_bytes("PNG", (1, 2, 3))
OTHER = img_bytes("PNG", (50, 50, 50))

CAPTIONS = {
    "a1": 'A cat, sitting on: a "red" mat!',          # A cat sitting on a red mat   (7 words)
    "b2": "two dogs?? playing; in snow.",             # two dogs playing in snow     (5 words)
    "c3": "three words only",                         # label-count mismatch (4 labels)
    "d4": "corrupt image here",
    "e5": "a blue bird",
    "f6": "test image, one",
    "g7": "found elsewhere",
    "h8": "out of range",
    "i9": "nan score",
    "j10": "bad heatmap",
    "k11": "missing feature",
}


@pytest.fixture()
def richhf(tmp_path):
    """TFRecords + a Pick-a-Pic-like parquet directory (two train shards, one test shard)."""
    tf = tmp_path / "tfrecords"
    tf.mkdir()
    train = [
        record("a1", "1 0 1 1 1 0 1", scores=(0.75, 0.5, 0.25, 1.0), seed=1, ext="png"),
        record("b2", "1 1 1 1 1", scores=(0.0, 1.0, 0.5, 0.125), seed=2),
        record("c3", "1 1 0 1", seed=3),
        record("zz", "1 1", seed=4),                    # missing image
        record("d4", "1 1 1", seed=5),                  # corrupt image
        record("h8", "1 1 1", scores=(1.5, 0.5, 0.5, 0.5), seed=6),
        record("i9", "1 1", scores=(0.5, float("nan"), 0.5, 0.5), seed=7),
        record("j10", "1 1", seed=8, amap=b"\x89PNG not really"),
        record("k11", "1 1", seed=9, drop=("overall_score",)),
        b"\xff\xff\xff not a protobuf",
    ]
    write_tfrecord(tf / "train.tfrecord", train)
    write_tfrecord(tf / "dev.tfrecord", [record("e5", "0 1 1", scores=(0.2, 0.4, 0.6, 0.8), seed=10)])
    write_tfrecord(tf / "test.tfrecord", [record("f6", "1 1 0", seed=11), record("g7", "0 0", seed=12)])

    src = tmp_path / "pickapic" / "data"
    src.mkdir(parents=True)
    c = CAPTIONS
    write_shard(src / "train-00000-of-00002.parquet", [
        ("unrelated", "x0", OTHER, "x1", OTHER),
        (c["a1"], "a1", PNG_A, "x2", OTHER),             # a1 in slot 0
        (c["c3"], "x3", OTHER, "c3", OTHER),
        (c["h8"], "h8", OTHER, "i9", OTHER),
        (c["d4"], "d4", b"\xff\xd8\xff garbage", "x4", OTHER),
        (c["g7"], "x5", OTHER, "g7", PNG_G),             # a test uid in a train shard
    ])
    write_shard(src / "train-00001-of-00002.parquet", [
        ("unrelated", "y0", OTHER, "y1", OTHER),
        (c["b2"], "y2", OTHER, "b2", JPG_B),             # b2 in slot 1 of the second shard
        (c["e5"], "e5", WEBP_E, "y3", OTHER),
        (c["a1"], "a1", OTHER, "y4", OTHER),             # later duplicate: the first occurrence wins
    ])
    write_shard(src / "test-00000-of-00001.parquet", [
        (c["f6"], "t0", OTHER, "f6", JPG_F),
    ])
    return tf, src, tmp_path / "out"


def run_cli(*args) -> int:
    return cli_main(["data", "convert-richhf", *map(str, args), "--quiet"])


EXPECTED_SKIPS = {
    "train": {
        "undecodable_record": 1, "missing_feature": ["k11"], "nonfinite_score": ["i9"],
        "score_out_of_range": ["h8"], "corrupt_heatmap": ["j10"], "missing_image": ["zz"],
        "label_count_mismatch": ["c3"], "corrupt_image": ["d4"],
    },
    "dev": {},
    "test": {},
}


# ------------------------------------------------------------------------------------------
# TFRecord layer
# ------------------------------------------------------------------------------------------


def test_crc32c_known_values():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    crc = crc32c(b"abc")
    assert masked_crc32c(b"abc") == ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def test_example_wire_format_matches_tensorflow_field_numbers():
    # Example.features=1 / Features.feature=1 (map entry key=1, value=2) / Feature.float_list=2 /
    # FloatList.value=1 packed
    assert encode_example({"a": 1.0}).hex() == "0a0f0a0d0a0161120812060a040000803f"
    # Feature.int64_list=3, packed
    assert encode_example({"a": [5]}).hex() == "0a0c0a0a0a016112051a030a0105"
    # Feature.bytes_list=1
    assert encode_example({"a": b"xy"}).hex() == "0a0d0a0b0a016112060a040a027879"
    ex = Example()
    ex.features.feature["k"].int64_list.value.extend([1, -2])
    assert decode_example(ex.SerializeToString(), typed=True) == {"k": ("int64_list", [1, -2])}
    for cls in (Features, Feature, BytesList, FloatList, Int64List):
        assert cls.DESCRIPTOR.full_name.startswith("tensorflow.")


def test_tfrecord_roundtrip(tmp_path):
    recs = [encode_example({"x": [float(i)], "s": f"r{i}", "n": np.arange(i)}) for i in range(4)] + [b""]
    write_tfrecord(tmp_path / "a.tfrecord", recs)
    got = list(iter_tfrecord(tmp_path / "a.tfrecord"))
    assert [d for _, d in got] == recs
    assert got[0][0] == 0 and got[1][0] == 16 + len(recs[0])
    d = decode_example(got[3][1])
    assert d["x"] == [3.0] and d["s"] == [b"r3"] and d["n"] == [0, 1, 2]


def test_tfrecord_bad_crc_and_truncation(tmp_path):
    recs = [encode_example({"x": [float(i)]}) for i in range(3)]
    p = tmp_path / "b.tfrecord"
    write_tfrecord(p, recs)
    raw = bytearray(p.read_bytes())
    second = 16 + len(recs[0])
    # corrupt the data of the second record
    bad = bytearray(raw)
    bad[second + 12 + 2] ^= 0xFF
    p.write_bytes(bad)
    with pytest.raises(TFRecordError, match=rf"b\.tfrecord at byte {second}.*data CRC"):
        list(iter_tfrecord(p))
    # corrupt the length CRC of the second record
    bad = bytearray(raw)
    bad[second + 9] ^= 0x01
    p.write_bytes(bad)
    with pytest.raises(TFRecordError, match=rf"at byte {second}.*length CRC"):
        list(iter_tfrecord(p))
    # truncate in the middle of the last record, and in the middle of a header
    last = 2 * second
    for cut in (len(raw) - 3, last + 5):
        p.write_bytes(raw[:cut])
        with pytest.raises(TFRecordError, match=rf"at byte {last}: truncated"):
            list(iter_tfrecord(p))


# ------------------------------------------------------------------------------------------
# Conversion from parquet
# ------------------------------------------------------------------------------------------


def load_report(out: Path) -> dict:
    return json.loads((out / REPORT_NAME).read_text())


def check_skips(report: dict) -> None:
    for split, want in EXPECTED_SKIPS.items():
        r = report["splits"][split]
        got = r["skipped"]
        assert set(got) == set(want), (split, got)
        for reason, uids in want.items():
            if isinstance(uids, int):
                assert len(got[reason]) == uids
            else:
                assert got[reason] == uids
        assert r["kept"] + sum(len(v) for v in got.values()) == r["total"]
        assert r["skipped_count"] == r["total"] - r["kept"]


def test_convert_parquet_every_field(richhf, capsys):
    tf, src, out = richhf
    assert run_cli("--tfrecords", tf, "--images", src, "--out", out) == 0
    console = capsys.readouterr().out
    assert "train: 10 records, 2 kept, 8 skipped" in console and "label_count_mismatch: 1" in console

    report = load_report(out)
    assert [report["splits"][s]["total"] for s in ("train", "dev", "test")] == [10, 1, 2]
    assert [report["splits"][s]["kept"] for s in ("train", "dev", "test")] == [2, 1, 2]
    assert report["total"] == 13 and report["kept"] == 5 and report["skipped"] == 8
    check_skips(report)
    details = report["splits"]["train"]["skip_details"]
    assert "4 labels for 3 prompt words" in details["c3"]
    assert report["splits"]["test"]["found_outside_expected_shards"] == {"g7": "train-00000-of-00002.parquet"}
    assert report["splits"]["train"]["found_outside_expected_shards"] == {}
    rng = report["splits"]["train"]["score_ranges"]
    # observed over every record with a finite value (skipped ones included): h8 has artifact 1.5
    assert rng["plausibility"]["max"] == 1.5 and rng["plausibility"]["min"] == 0.0
    assert rng["plausibility"]["outside_0_1"] == 1
    assert rng["alignment"]["nonfinite"] == 1 and rng["overall"]["missing"] == 1

    info = json.loads((out / "dataset.json").read_text())
    assert info["format"] == "rahf-dataset" and info["splits"] == {"train": 2, "dev": 1, "test": 2}

    train = open_dataset(out, "train")
    assert train.uids == ["a1", "b2"]
    e = {x["uid"]: x for x in train.entries}
    assert e["a1"]["prompt"] == "A cat sitting on a red mat"
    assert e["a1"]["tagged_prompt"] == "A cat_0 sitting on a red_0 mat"
    assert e["b2"]["prompt"] == "two dogs playing in snow" and e["b2"]["tagged_prompt"] == e["b2"]["prompt"]
    assert e["a1"]["scores"] == {"plausibility": 0.75, "alignment": 0.5, "aesthetics": 0.25, "overall": 1.0}
    assert e["b2"]["scores"] == {"plausibility": 0.0, "alignment": 1.0, "aesthetics": 0.5, "overall": 0.125}
    # images: original bytes, real extension (a1 is named .png in the TFRecord and is a PNG; b2 a JPEG)
    assert e["a1"]["image"] == "images/a1.png" and (out / "train" / "images" / "a1.png").read_bytes() == PNG_A
    assert e["b2"]["image"] == "images/b2.jpg" and (out / "train" / "images" / "b2.jpg").read_bytes() == JPG_B
    # heatmaps within 1/255 of the source values; implausibility <- artifact_map
    for uid, seed in (("a1", 1), ("b2", 2)):
        imp = load_map(out / "train" / e[uid]["implausibility_map"])
        mis = load_map(out / "train" / e[uid]["misalignment_map"])
        assert imp.shape == MAP_SHAPE
        assert np.abs(imp - heat(seed)).max() <= 1 / 255 + 1e-6
        assert np.abs(mis - heat(seed + 100, zero=seed % 2 == 0)).max() <= 1 / 255 + 1e-6
    ex = train[1]
    assert ex.image.size == (10, 8) and ex.misaligned == [False] * 5

    dev = open_dataset(out, "dev")
    (d,) = dev.entries
    assert d["uid"] == "e5" and d["image"] == "images/e5.webp" and d["tagged_prompt"] == "a_0 blue bird"
    assert d["scores"] == pytest.approx({"plausibility": 0.2, "alignment": 0.4, "aesthetics": 0.6, "overall": 0.8})
    test = open_dataset(out, "test")
    assert test.uids == ["f6", "g7"]
    t = {x["uid"]: x for x in test.entries}
    assert t["f6"]["tagged_prompt"] == "test image one_0" and (out / "test" / t["f6"]["image"]).read_bytes() == JPG_F
    assert t["g7"]["tagged_prompt"] == "found_0 elsewhere_0"
    assert (out / "test" / t["g7"]["image"]).read_bytes() == PNG_G
    # no files beyond the kept records
    assert sorted(p.name for p in (out / "train" / "images").iterdir()) == ["a1.png", "b2.jpg"]
    try:
        from rahf.data.validate import validate_dataset
    except ImportError:  # validator not in this build
        return
    rep = validate_dataset(out)
    assert rep.ok, rep.summary()


def test_rerun_is_idempotent_and_skips_done_work(richhf, monkeypatch):
    tf, src, out = richhf
    assert run_cli("--tfrecords", tf, "--images", src, "--out", out) == 0
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != CACHE_NAME}

    # a second run must not read any image column: every image is in OUT already (or known bad)
    def no_jpg(*a, **k):
        raise AssertionError("jpg columns read again")
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", no_jpg)
    assert run_cli("--tfrecords", tf, "--images", src, "--out", out) == 0
    second = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != CACHE_NAME}
    assert second == first
    monkeypatch.undo()

    # an image removed (or damaged) in OUT is fetched again; a stale file is removed
    (out / "train" / "images" / "b2.jpg").unlink()
    (out / "test" / "images" / "g7.png").write_bytes(b"oops")
    (out / "train" / "images" / "old.jpg").write_bytes(b"stale")
    assert run_cli("--tfrecords", tf, "--images", src, "--out", out) == 0
    third = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != CACHE_NAME}
    assert third == first


def test_strict_fails_naming_record_and_reason(richhf, capsys):
    tf, src, out = richhf
    assert run_cli("--tfrecords", tf, "--images", src, "--out", out, "--strict") == 1
    err = capsys.readouterr().err
    assert "--strict" in err and "'k11'" in err and "missing_feature" in err and "'i9'" in err
    assert not (out / REPORT_NAME).exists()
    # a clean input passes --strict
    tf2 = tf.parent / "tf_clean"
    tf2.mkdir()
    write_tfrecord(tf2 / "train.tfrecord", [record("a1", "1 0 1 1 1 0 1", ext="png")])
    write_tfrecord(tf2 / "dev.tfrecord", [record("e5", "0 1 1")])
    write_tfrecord(tf2 / "test.tfrecord", [record("f6", "1 1 0")])
    assert run_cli("--tfrecords", tf2, "--images", src, "--out", out, "--strict") == 0
    # strict also fails on problems only seen in the image source (label counts, images)
    write_tfrecord(tf2 / "dev.tfrecord", [record("d4", "1 1 1")])
    assert run_cli("--tfrecords", tf2, "--images", src, "--out", tf.parent / "o3", "--strict") == 1
    assert "'d4'" in capsys.readouterr().err


def test_clip_scores_heatmap_size_and_workers(richhf):
    tf, src, out = richhf
    report = convert_richhf(tf, src, out, clip_scores=True, heatmap_size=6, workers=2, progress=False,
                            log=lambda m: None)
    tr = report["splits"]["train"]
    assert "score_out_of_range" not in tr["skipped"] and tr["clipped_scores"] == ["h8"]
    e = {x["uid"]: x for x in read_manifest(out / "train")}
    assert e["h8"]["scores"]["plausibility"] == 1.0
    imp = load_map(out / "train" / e["a1"]["implausibility_map"])
    assert imp.shape == (6, 6)
    assert abs(imp.mean() - heat(1).mean()) < 0.08
    # same records as a serial run
    out1 = out.parent / "serial"
    convert_richhf(tf, src, out1, clip_scores=True, heatmap_size=6, workers=1, progress=False, log=lambda m: None)
    for s in ("train", "dev", "test"):
        assert (out1 / s / "manifest.jsonl").read_text() == (out / s / "manifest.jsonl").read_text()


def test_corrupt_tfrecord_is_an_error(richhf, capsys):
    tf, src, out = richhf
    p = tf / "dev.tfrecord"
    raw = p.read_bytes()
    p.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    assert run_cli("--tfrecords", tf, "--images", src, "--out", out) == 1
    err = capsys.readouterr().err
    assert "dev.tfrecord at byte 0" in err and "CRC" in err
    p.write_bytes(raw[:-7])
    assert run_cli("--tfrecords", tf, "--images", src, "--out", out) == 1
    assert "dev.tfrecord at byte 0: truncated" in capsys.readouterr().err
    (tf / "dev.tfrecord").unlink()
    assert run_cli("--tfrecords", tf, "--images", src, "--out", out) == 1
    assert "dev.tfrecord" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# Conversion from a folder of images + captions
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("captions_format", ["jsonl", "csv", "tsv"])
def test_convert_folder_source(richhf, captions_format, capsys):
    tf, _, out = richhf
    folder = tf.parent / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "a1.png").write_bytes(PNG_A)
    (folder / "b2.jpeg").write_bytes(JPG_B)
    (folder / "sub" / "e5.webp").write_bytes(WEBP_E)
    (folder / "f6.JPG").write_bytes(JPG_F)
    (folder / "g7.jpg").write_bytes(PNG_G)          # wrong extension: the real format wins
    (folder / "d4.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "c3.png").write_bytes(OTHER)
    (folder / "h8.png").write_bytes(OTHER)
    caps = {u: c for u, c in CAPTIONS.items() if u != "g7"}  # g7: image but no caption
    if captions_format == "jsonl":
        (folder / "captions.jsonl").write_text("".join(json.dumps({"uid": u, "caption": c}) + "\n" for u, c in caps.items()))
    else:
        import csv
        with open(folder / f"captions.{captions_format}", "w", newline="") as f:
            w = csv.writer(f, delimiter="\t" if captions_format == "tsv" else ",")
            w.writerow(["uid", "caption"])
            w.writerows(caps.items())
    assert run_cli("--tfrecords", tf, "--images", folder, "--out", out) == 0
    report = load_report(out)
    assert report["source"]["kind"] == "folder"
    assert report["splits"]["test"]["skipped"] == {"missing_caption": ["g7"]}
    check = {k: v for k, v in EXPECTED_SKIPS.items() if k != "test"}
    for split, want in check.items():
        got = report["splits"][split]["skipped"]
        assert set(got) == set(want)
    e = {x["uid"]: x for x in open_dataset(out, "train").entries}
    assert e["a1"]["tagged_prompt"] == "A cat_0 sitting on a red_0 mat" and e["b2"]["image"] == "images/b2.jpg"
    assert (out / "train" / "images" / "b2.jpg").read_bytes() == JPG_B
    assert open_dataset(out, "dev").entries[0]["image"] == "images/e5.webp"
    assert open_dataset(out, "test").uids == ["f6"]
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != CACHE_NAME}
    assert run_cli("--tfrecords", tf, "--images", folder, "--out", out) == 0
    second = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != CACHE_NAME}
    assert second == first


def test_heatmap_png_modes():
    arr = heat(3)
    src = png_of(arr)
    assert heatmap_png(src) == src  # 8-bit gray PNG kept byte for byte
    buf = io.BytesIO()
    Image.fromarray(np.rint(arr * 65535).astype(np.uint16)).save(buf, format="PNG")
    out = np.asarray(Image.open(io.BytesIO(heatmap_png(buf.getvalue()))), dtype=np.float64) / 255
    assert np.abs(out - arr).max() <= 1 / 255 + 1e-9
    rgb = io.BytesIO()
    Image.fromarray(np.rint(arr * 255).astype(np.uint8), mode="L").convert("RGB").save(rgb, format="PNG")
    out = np.asarray(Image.open(io.BytesIO(heatmap_png(rgb.getvalue()))), dtype=np.float64) / 255
    assert np.abs(out - arr).max() <= 1 / 255 + 1e-9
    with pytest.raises(ValueError):
        heatmap_png(b"nope")
