"""The HTML pages open in a real headless browser (Debian's chromium) and show their images."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from rahf import RAHF, RAHFConfig
from rahf.cli import main

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _browser() -> str:
    for b in BROWSERS:
        p = shutil.which(b)
        if p:
            return p
    pytest.fail("no headless browser found: run the tests with scripts/test.sh (it installs Debian's chromium) "
                "or apt-get install chromium")


def screenshot(html_path, png_path, tmp_path, size=(1200, 900)) -> np.ndarray:
    cmd = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chrome-profile'}", f"--screenshot={png_path}",
           f"--window-size={size[0]},{size[1]}", "--hide-scrollbars", html_path.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png_path.is_file(), f"chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return np.asarray(Image.open(png_path).convert("RGB")).astype(np.int16)


def _near(shot: np.ndarray, rgb, tol: int = 24) -> int:
    return int((np.abs(shot - np.array(rgb, dtype=np.int16)).max(-1) <= tol).sum())


def _colour_bins(img: np.ndarray) -> set:
    q = (img // 16).reshape(-1, 3)
    return set(map(tuple, np.unique(q, axis=0)))




@pytest.mark.slow
def test_predict_page_in_browser(ckpt, tmp_path):
    # a magenta image with a yellow square: colours that the page's chrome never uses
    a = np.zeros((96, 144, 3), np.uint8)
    a[...] = (255, 0, 255)
    a[30:60, 50:90] = (255, 255, 0)
    Image.fromarray(a).save(tmp_path / "m.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "m.png", "prompt": "a yellow square"}) + "\n")
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(ckpt), "--manifest", str(tmp_path / "m.jsonl"), "--out", str(out)]) == 0
    shot = screenshot(out / "index.html", tmp_path / "shot.png", tmp_path)
    assert shot.shape[:2] == (900, 1200)
    assert (shot.std(axis=(0, 1)) > 10).any(), "the screenshot is blank"
    # the original image panel (shown at 256 px high: about 384x256, 1/4 of it yellow)
    assert _near(shot, (255, 0, 255)) > 20000, "the original image is not visible"
    assert _near(shot, (255, 255, 0)) > 5000
    # the heatmap overlays: colours of the overlay PNG's heatmap panels appear in the screenshot
    rec = json.loads((out / "predictions.jsonl").read_text())
    ov = np.asarray(Image.open(out / rec["overlay"]).convert("RGB")).astype(np.int16)
    panel = ov[40:200, 400:]  # right of the original panel, below the titles
    bins = _colour_bins(panel) - _colour_bins(np.array([[[255, 0, 255], [255, 255, 0], [250, 250, 250],
                                                         [255, 255, 255]]], np.int16))
    q = shot // 16
    hits = np.zeros(shot.shape[:2], bool)
    for b in bins:
        hits |= (q == np.array(b)).all(-1)
    assert hits.sum() > 30000, f"overlay colours cover only {hits.sum()} screenshot pixels"


@pytest.mark.slow
def test_eval_report_in_browser(ckpt, synth_root, tmp_path):
    rep = tmp_path / "report"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(synth_root), "--split", "test",
                 "--batch-size", "8", "--max-batches", "1", "--decode", "both", "--num-workers", "0", "--out", str(tmp_path / "m.json"),
                 "--report", str(rep)]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert "keyword/f1" in metrics and "keyword_free/f1" in metrics
    html = (rep / "index.html").read_text()
    assert html.count("data:image/png;base64,") >= 1 + 2 * 5  # scatter + best/worst grids (5 panels each)
    assert "Keyword confusions" in html and "PLCC" in html
    shot = screenshot(rep / "index.html", tmp_path / "rep.png", tmp_path, size=(1200, 2400))
    # the scatter plot's points (matplotlib's default blue) and the overlay grids' jet colours
    assert _near(shot, (31, 119, 180), 30) > 300, "scatter plot not visible"
    grids = shot[1000:]
    assert (grids.std(axis=(0, 1)) > 10).any()
    assert _near(grids, (128, 255, 128), 90) > 5000, "overlay grids not visible"
