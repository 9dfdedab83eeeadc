"""``rahf predict/select/mask`` and their pure helpers (select_best, heatmap_to_mask, read_manifest)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rahf import RAHF, RAHFConfig, RAHFScorer
from rahf.cli import main
from rahf.model.config import MAP_NAMES, SCORE_NAMES
from rahf.cli.predict import read_manifest
from rahf.reward.masks import heatmap_to_mask
from rahf.reward.select import select_best




@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four images (two non-square) in a folder with a JSONL manifest using relative paths: two
    candidates for each of two prompts."""
    d = tmp_path_factory.mktemp("imgs")
    (d / "pics").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, (h, w) in enumerate([(96, 128), (128, 80), (64, 64), (70, 100)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / "pics" / f"im{i}.png")
        rows.append({"image": f"pics/im{i}.png", "prompt": "a red circle" if i < 2 else "two blue squares, left"})
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_read_manifest_jsonl_and_csv(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"image": "x/1.png", "prompt": "a cat", "id": 7}\n\n# comment\n'
                                      '{"image": "/abs/2.png", "prompt": "a dog"}\n')
    rows = read_manifest(tmp_path / "a.jsonl")
    assert rows[0]["image"] == str(tmp_path / "x/1.png") and rows[0]["id"] == 7
    assert rows[1]["image"] == "/abs/2.png" and rows[1]["prompt"] == "a dog"
    (tmp_path / "b.csv").write_text('image,prompt\nx/1.png,"a cat, sitting"\n')
    rows = read_manifest(tmp_path / "b.csv")
    assert rows == [{"image": str(tmp_path / "x/1.png"), "prompt": "a cat, sitting"}]
    (tmp_path / "c.csv").write_text("path,text\n1.png,a\n")
    with pytest.raises(ValueError, match="image,prompt"):
        read_manifest(tmp_path / "c.csv")
    (tmp_path / "d.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="image"):
        read_manifest(tmp_path / "d.jsonl")


def test_predict_cli_matches_api(ckpt, images, tmp_path):
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(ckpt), "--manifest", str(images / "m.jsonl"), "--out", str(out),
                 "--batch-size", "3"]) == 0
    lines = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    scorer = RAHFScorer.from_pretrained(ckpt, device="cpu")
    api = scorer.score([l["image"] for l in lines], [l["prompt"] for l in lines])
    for l, r in zip(lines, api):
        for s in SCORE_NAMES:
            assert abs(l["scores"][s] - r.scores[s]) < 1e-5
        assert l["tagged_prompt"] == r.tagged_prompt and l["misaligned_words"] == r.misaligned_words
        assert (out / l["overlay"]).is_file()
        im = Image.open(l["image"])
        assert (l["width"], l["height"]) == im.size
        for m in MAP_NAMES:
            st = l["heatmaps"][m]
            assert abs(st["max"] - float(r.heatmaps[m].max())) < 1e-4
            assert abs(st["mean"] - float(r.heatmaps[m].mean())) < 1e-4
    assert lines[1]["prompt"] == "a red circle" and lines[2]["prompt"] == "two blue squares left"  # cleaned
    html = (out / "index.html").read_text()
    assert html.count("<img ") == 4 and "http" not in html.replace("http-equiv", "")
    # single image mode
    out2 = tmp_path / "one"
    assert main(["predict", "--checkpoint", str(ckpt), "--image", lines[0]["image"], "--prompt", "a red circle",
                 "--out", str(out2)]) == 0
    one = json.loads((out2 / "predictions.jsonl").read_text())
    assert abs(one["scores"]["overall"] - lines[0]["scores"]["overall"]) < 1e-5


def _c(img, prompt, **scores):
    return {"image": img, "prompt": prompt, "scores": {s: scores.get(s, 0.5) for s in SCORE_NAMES}}


def test_select_best_hand_made():
    cands = [_c("a1", "p", overall=0.2), _c("a2", "p", overall=0.9), _c("a3", "p", overall=0.9),
             _c("b1", "q", overall=0.3), _c("b2", "q", overall=0.1),
             _c("c1", "r", overall=0.95, plausibility=0.1)]
    sel = select_best(cands, by="overall")
    assert [k["image"] for k in sel["kept"]] == ["a2", "b1", "c1"]  # first on ties
    assert [g["best"] for g in sel["groups"]] == [1, 0, 0]
    sel = select_best(cands, by="overall", threshold=0.5)
    assert [k["image"] for k in sel["kept"]] == ["a2", "c1"]
    assert [g["kept"] for g in sel["groups"]] == [True, False, True]
    assert len(sel["groups"][0]["candidates"]) == 3  # every candidate's scores are reported
    sel = select_best(cands, by="overall", threshold=0.5, min_candidates=2)
    assert [k["image"] for k in sel["kept"]] == ["a2"]
    sel = select_best(cands, by="plausibility", threshold=0.3)
    assert [k["image"] for k in sel["kept"]] == ["a1", "b1"]
    with pytest.raises(ValueError):
        select_best(cands, by="nope")


def test_heatmap_to_mask_hand_made():
    h = np.zeros((9, 11), np.float32)
    h[4, 5] = 0.9
    h[0, 0] = 0.5  # not > 0.5
    m = heatmap_to_mask(h, 0.5, 0)
    assert m.dtype == bool and m.shape == (9, 11) and m.sum() == 1 and m[4, 5]
    m = heatmap_to_mask(h, 0.5, 2)  # disk of radius 2: 13 pixels
    assert m.sum() == 13
    yy, xx = np.nonzero(m)
    assert ((yy - 4) ** 2 + (xx - 5) ** 2 <= 4).all()
    assert m[4, 3] and m[2, 5] and not m[3, 3]  # (dy, dx) = (1, 2) is outside the disk
    assert heatmap_to_mask(h, 0.95, 3).sum() == 0
    assert heatmap_to_mask(h, 0.4, 0).sum() == 2
    full = heatmap_to_mask(np.ones((4, 4)), 0.5, 5)
    assert full.all()


def test_select_and_mask_cli(ckpt, images, tmp_path):
    out = tmp_path / "sel.json"
    assert main(["select", "--checkpoint", str(ckpt), "--manifest", str(images / "m.jsonl"), "--by", "overall",
                 "--threshold", "0.0", "--out", str(out)]) == 0
    sel = json.loads(out.read_text())
    assert len(sel["groups"]) == 2 and len(sel["kept"]) == 2
    for g in sel["groups"]:
        vals = [c["scores"]["overall"] for c in g["candidates"]]
        assert g["best"] == int(np.argmax(vals)) and len(vals) == 2
    mdir = tmp_path / "masks"
    assert main(["mask", "--checkpoint", str(ckpt), "--manifest", str(images / "m.jsonl"), "--threshold", "0.5",
                 "--dilate", "3", "--out", str(mdir)]) == 0
    recs = [json.loads(l) for l in (mdir / "masks.jsonl").read_text().splitlines()]
    scorer = RAHFScorer.from_pretrained(ckpt, device="cpu")
    maps = [x.implausibility for x in scorer.score([r["image"] for r in recs], [r["prompt"] for r in recs], decode=None)]
    for r, hm in zip(recs, maps):
        im = Image.open(r["image"])
        mk = Image.open(mdir / r["mask"])
        assert mk.size == im.size and mk.mode == "L"
        a = np.asarray(mk)
        assert set(np.unique(a)) <= {0, 255}
        assert ((a == 255) == heatmap_to_mask(hm, 0.5, 3)).mean() > 0.999
        assert (mdir / r["overlay"]).is_file()
