"""``rahf predict/select/mask`` and their pure helpers (select_best, heatmap_to_mask, read_manifest)."""

import json

import numpy as np
import pytest
from PIL import Image

from rahf import RAHFScorer
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


# ------------------------------------------------------------------------------------------ known outputs
def _redder(panel: np.ndarray) -> np.ndarray:
    """Per pixel of an overlay panel (H, W, 3): whether red outweighs blue (jet's high end over grey)."""
    return panel[..., 0].astype(int) > panel[..., 2].astype(int)


def test_predict_page_overlays_and_masks_show_the_hand_set_outputs(known_ckpt, tmp_path):
    """A model whose heads are set by hand (scores 0.2/0.4/0.6/0.8; implausibility high on the left
    edge, misalignment on the top edge) on a grey image: the page shows those scores, each overlay panel
    is red exactly where its known map is high, and the mask is the known map above the threshold."""
    from known_model import SET_SCORES, known_maps

    model, ckpt = known_ckpt
    h, w = 48, 80
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    want = known_maps(model, h, w)
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(ckpt), "--image", str(tmp_path / "grey.png"), "--prompt",
                 "a red circle", "--out", str(out)]) == 0
    row = json.loads((out / "predictions.jsonl").read_text())
    assert row["scores"] == pytest.approx(SET_SCORES, abs=1e-5)
    assert row["heatmaps"]["implausibility"]["argmax_xy"] == [0, 0]
    assert "plausibility 0.200 · alignment 0.400 · aesthetics 0.600 · overall 0.800" in (out / "index.html").read_text()
    # the overlay: the image, then implausibility and misalignment over it, each panel 256 px high
    # (80 × 48 → 427 × 256), 6 px apart, below a 20 px title row
    overlay = np.asarray(Image.open(out / row["overlay"]).convert("RGB"))
    pw, ph, pad, top = 427, 256, 6, 26
    for k, m in enumerate(["implausibility", "misalignment"], start=1):
        x0 = pad + k * (pw + pad)
        panel = overlay[top:top + ph, x0:x0 + pw]
        high = np.asarray(Image.fromarray(want[m].astype(np.float32), mode="F").resize((pw, ph), Image.NEAREST))
        sure = (high > 0.7) | (high < 0.2)
        assert 0 < (high > 0.7).mean() < 0.3, m
        assert (_redder(panel) == (high > 0.5))[sure].mean() > 0.99, m
    assert not _redder(overlay[top:top + ph, pad:pad + pw]).any()  # the grey image panel
    # rahf mask: the known implausibility map above 0.5 (no dilation), at the image's size
    mdir = tmp_path / "masks"
    assert main(["mask", "--checkpoint", str(ckpt), "--image", str(tmp_path / "grey.png"), "--prompt", "a red circle",
                 "--threshold", "0.5", "--dilate", "0", "--out", str(mdir)]) == 0
    rec = json.loads((mdir / "masks.jsonl").read_text())
    mask = np.asarray(Image.open(mdir / rec["mask"])) == 255
    clear = np.abs(want["implausibility"] - 0.5) > 1e-3
    assert mask.shape == (h, w) and (mask == (want["implausibility"] > 0.5))[clear].all()
    assert rec["masked_fraction"] == pytest.approx(mask.mean(), abs=1e-6) and 0 < mask.mean() < 0.2
    assert rec["plausibility"] == pytest.approx(SET_SCORES["plausibility"], abs=1e-5)
