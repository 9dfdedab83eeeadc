"""The dataset validator: a fresh synth dataset passes; each kind of corruption is caught and named,
in the dataset loader's words (tests/test_bad_input.py checks that it flags exactly what fails to load)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from badcorpus import bomb_png
from rahf.cli import main as rahf_main
from rahf.data.synth import generate
from rahf.data.validate import validate_dataset


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    out = tmp_path_factory.mktemp("val") / "ds"
    generate(out, train=12, dev=3, test=0, size=32, seed=1, workers=1)
    return out


@pytest.fixture
def ds(pristine, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(pristine, out)
    return out


def _lines(root, split="train") -> list[str]:
    return (root / split / "manifest.jsonl").read_text().splitlines()


def _write_lines(root, lines, split="train") -> None:
    (root / split / "manifest.jsonl").write_text("\n".join(lines) + "\n")


def _uid(i: int, split="train") -> str:
    return f"synth-{split}-{i:06d}"


def _run(root, capsys, *extra) -> tuple[int, str]:
    rc = rahf_main(["data", "validate", str(root), *extra])
    return rc, capsys.readouterr().out


# each corruption damages record i of train and returns the text its problem line must contain
def _truncate_image(root, i):
    p = root / "train" / "images" / f"{_uid(i)}.png"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    return "does not decode"


def _rgb_heatmap(root, i):
    Image.new("RGB", (32, 32), (10, 10, 10)).save(root / "train" / "implausibility" / f"{_uid(i)}.png")
    return "mode 'RGB'"


def _nan_score(root, i):
    lines = _lines(root)
    e = json.loads(lines[i])
    e["scores"]["aesthetics"] = float("nan")
    lines[i] = json.dumps(e)  # json writes NaN, which Python's json reads back
    _write_lines(root, lines)
    return "not a finite number"


def _missing_map(root, i):
    path = root / "train" / "misalignment" / f"{_uid(i)}.png"
    path.unlink()
    return f"heatmap file missing: {path}"


def _tiny_image(root, i):
    Image.new("RGB", (4, 4)).save(root / "train" / "images" / f"{_uid(i)}.png")
    return f"image images/{_uid(i)}.png is 4×4, smaller than 8×8"


def _odd_map_size(root, i):
    Image.fromarray(np.zeros((16, 16), np.uint8), "L").save(root / "train" / "misalignment" / f"{_uid(i)}.png")
    return "heatmaps differ in size: implausibility 32×32, misalignment 16×16"


def _jpeg_map(root, i):  # decodes as 8-bit gray, but JPEG bytes under a .png name: the format is checked
    Image.fromarray(np.zeros((32, 32), np.uint8), "L").save(root / "train" / "implausibility" / f"{_uid(i)}.png",
                                                            format="JPEG")
    return f"heatmap implausibility/{_uid(i)}.png is a JPEG file; expected an 8-bit grayscale PNG"


def _bomb_image(root, i):
    (root / "train" / "images" / f"{_uid(i)}.png").write_bytes(bomb_png())
    return "decompression bomb"


def _bad_tags(root, i):
    lines = _lines(root)
    e = json.loads(lines[i])
    e["tagged_prompt"] = "something else_0"
    lines[i] = json.dumps(e)
    _write_lines(root, lines)
    return "tagged_prompt words do not match"


def _escaping_path(root, i):
    lines = _lines(root)
    e = json.loads(lines[i])
    e["image"] = "../../etc/passwd"
    lines[i] = json.dumps(e)
    _write_lines(root, lines)
    return "leaves the split directory"


CORRUPTIONS = [_truncate_image, _rgb_heatmap, _nan_score, _missing_map, _tiny_image, _odd_map_size, _jpeg_map,
               _bomb_image, _bad_tags, _escaping_path]


def test_fresh_dataset_passes(pristine, capsys):
    report = validate_dataset(pristine)
    assert report.ok, [str(p) for p in report.problems]
    assert report.records == 15 and report.splits == ["train", "dev"]
    rc, out = _run(pristine, capsys)
    assert rc == 0
    assert out.strip().splitlines() == [report.summary()]
    assert "15 records" in out and "0 problem" in out


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_each_corruption_is_caught_and_named(ds, capsys, corrupt):
    expected = corrupt(ds, 4)
    rc, out = _run(ds, capsys)
    assert rc == 1
    problem_lines = out.strip().splitlines()[:-1]
    assert problem_lines, out
    assert all(line.startswith(f"train {_uid(4)}: ") for line in problem_lines), out
    assert any(expected in line for line in problem_lines), out
    assert "FAILED" in out.strip().splitlines()[-1]
    assert {p.line for p in validate_dataset(ds).problems} == {5}  # record 4 is on line 5


def test_declared_heatmap_size(ds, capsys):
    info = json.loads((ds / "dataset.json").read_text())
    (ds / "dataset.json").write_text(json.dumps({**info, "heatmap_size": 32}))  # the synth maps' size
    assert validate_dataset(ds).ok
    (ds / "dataset.json").write_text(json.dumps({**info, "heatmap_size": 16}))
    report = validate_dataset(ds)
    assert len(report.problems) == report.records == 15
    assert all(p.message == "heatmaps are 32×32; dataset.json declares heatmap_size 16" for p in report.problems)
    (ds / "dataset.json").write_text(json.dumps({**info, "heatmap_size": 32.5}))
    rc, out = _run(ds, capsys)
    assert rc == 1 and "- dataset.json: heatmap_size must be a positive integer, got 32.5" in out


def test_bad_json_and_bad_utf8_lines_are_reported_with_line_numbers(ds, capsys):
    lines = _lines(ds)
    lines[2] = '{"uid": "synth-train-000002", "prompt": '
    _write_lines(ds, lines)
    raw = (ds / "train" / "manifest.jsonl").read_bytes().splitlines(keepends=True)
    raw[5] = b'{"uid": "\xff\xfe"}\n'
    (ds / "train" / "manifest.jsonl").write_bytes(b"".join(raw))
    rc, out = _run(ds, capsys)
    assert rc == 1
    assert "train manifest.jsonl:3: line is not valid JSON" in out
    assert "train manifest.jsonl:6: line is not valid UTF-8" in out
    assert "13 records" in out.splitlines()[-1]  # the other records (10 train, 3 dev) were still checked


def test_duplicate_uid(ds, capsys):
    lines = _lines(ds)
    _write_lines(ds, lines + [lines[1]])
    rc, out = _run(ds, capsys)
    assert rc == 1
    assert f"train {_uid(1)}: duplicate uid (lines 2 and 13)" in out


def test_keeps_going_and_reports_every_problem(ds, capsys):
    expected = {}
    for i, corrupt in enumerate(CORRUPTIONS):
        expected[_uid(i)] = corrupt(ds, i)
    (ds / "dev" / "images" / f"{_uid(0, 'dev')}.png").unlink()
    rc, out = _run(ds, capsys)
    assert rc == 1
    for uid, text in expected.items():
        assert any(line.startswith(f"train {uid}: ") and text in line for line in out.splitlines()), (uid, out)
    assert f"dev {_uid(0, 'dev')}: image file missing" in out
    report = validate_dataset(ds)
    assert len(report.problems) >= len(CORRUPTIONS) + 1
    assert report.records == 15


def test_split_option_and_missing_things(ds, capsys, tmp_path):
    _tiny_image(ds, 0)
    rc, out = _run(ds, capsys, "--split", "dev")
    assert rc == 0 and "3 records" in out
    rc, out = _run(ds, capsys, "--split", "test")
    assert rc == 1 and "split directory not found" in out
    rc, out = _run(tmp_path / "nowhere", capsys)
    assert rc == 1 and "not found" in out
    (tmp_path / "empty").mkdir()
    assert not validate_dataset(tmp_path / "empty").ok
    (ds / "dev" / "manifest.jsonl").unlink()
    assert any(p.split == "dev" and "manifest.jsonl not found" in p.message for p in validate_dataset(ds).problems)
