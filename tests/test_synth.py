"""The synth generator: determinism, labels that agree with the picture, scores, vocabulary, CLI."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from rahf.cli import main as rahf_main
from rahf.data import SCORE_NAMES, open_dataset, parse_tagged, split_words
from rahf.data import synth
from rahf.data.synth import (
    COLOURS,
    SYNTH_VOCABULARY,
    generate,
    make_record,
    prompt_key,
    record_from_spec,
    sample_prompt,
)

SIZE = 64
N_RECORDS = 80


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    res = generate(out, train=20, dev=4, test=4, size=SIZE, seed=3, workers=1)
    return out, res


@pytest.fixture(scope="module")
def records():
    return [make_record(7, "train", i, SIZE) for i in range(N_RECORDS)]


def test_same_arguments_same_bytes_regardless_of_workers(dataset, tmp_path):
    out, _ = dataset
    generate(tmp_path / "again", train=20, dev=4, test=4, size=SIZE, seed=3, workers=2)
    a, b = _files(out), _files(tmp_path / "again")
    assert len(a) == 3 * 28 + 4  # 3 files per record, 3 manifests, dataset.json
    assert a == b


def test_different_seed_different_data(dataset, tmp_path):
    out, _ = dataset
    generate(tmp_path / "other", train=20, dev=0, test=0, size=SIZE, seed=4, workers=1)
    a = (out / "train" / "manifest.jsonl").read_text()
    b = (tmp_path / "other" / "train" / "manifest.jsonl").read_text()
    assert a != b
    assert not (tmp_path / "other" / "dev").exists()


def test_open_dataset_reads_what_was_written(dataset):
    out, res = dataset
    info = json.loads((out / "dataset.json").read_text())
    assert info["source"] == "synth" and info["seed"] == 3 and info["size"] == SIZE
    assert info["splits"] == {"train": 20, "dev": 4, "test": 4} == res["splits"]
    for split, n in res["splits"].items():
        ds = open_dataset(out, split)
        assert len(ds) == n
        assert ds.uids == [f"synth-{split}-{i:06d}" for i in range(n)]
        for i in (0, n - 1):
            ex = ds[i]
            rec = make_record(3, split, i, SIZE)
            assert ex.image.size == (SIZE, SIZE) and ex.image.mode == "RGB"
            assert np.array_equal(np.asarray(ex.image), np.asarray(rec.image))
            assert ex.implausibility_map.shape == ex.misalignment_map.shape == (SIZE, SIZE)
            assert np.allclose(ex.misalignment_map, rec.misalignment_map, atol=1 / 255)
            assert ex.prompt == rec.prompt and ex.tagged_prompt == rec.tagged_prompt
            assert ex.scores == rec.scores


def test_prompt_is_clean_words_of_caption(records):
    with_punct = 0
    for rec in records:
        assert rec.prompt == " ".join(split_words(rec.caption))
        words, _ = parse_tagged(rec.tagged_prompt)
        assert words == rec.prompt.split()
        with_punct += any(c in rec.caption for c in ",.:")
    assert with_punct > N_RECORDS // 2


def test_vocabulary_is_closed_and_used():
    rng = np.random.default_rng(0)
    seen: set[str] = set()
    relations = 0
    for _ in range(600):  # every word shows up within the first ~50 prompts of this seed
        spec = sample_prompt(rng)
        assert 1 <= len(spec.groups) <= 4
        seen.update(spec.words)
        relations += spec.relation is not None
    assert seen <= set(SYNTH_VOCABULARY), seen - set(SYNTH_VOCABULARY)
    assert set(SYNTH_VOCABULARY) <= seen, set(SYNTH_VOCABULARY) - seen  # no dead words
    assert SYNTH_VOCABULARY == sorted(set(SYNTH_VOCABULARY))
    assert 0.2 < relations / 600 < 0.6  # expected 0.7 × 0.6 = 0.42


def _tag_rule(scene) -> set:
    """The module docstring's rule, restated: the (role) set that must be tagged."""
    want = set()
    for gi, kind in scene.errors.items():
        attrs = {"colour": ["colour"], "shape": ["noun"], "count": ["count"], "size": ["size"],
                 "missing": ["count", "size", "colour", "noun"]}[kind]
        want |= {(a, gi) for a in attrs}
    if scene.place_error:
        want.add(("rel", -1))
    return want


def _value_at(m: np.ndarray, x: float, y: float) -> float:
    n = m.shape[0]
    return float(m[min(n - 1, int(y * n)), min(n - 1, int(x * n))])


def test_tagged_words_agree_with_misalignment_map(records):
    kinds = set()
    for rec in records:
        scene, m = rec.scene, rec.misalignment_map
        _, flags = parse_tagged(rec.tagged_prompt)
        want = _tag_rule(scene)
        assert flags == [role in want for role in scene.spec.roles], rec.tagged_prompt
        assert any(flags) == bool(m.max() > 0), rec.uid  # untagged prompt <=> all-zero map
        wrong = [p for p in scene.instances if p.group in scene.errors or (scene.place_error and p.group == 0)]
        for p in wrong:  # each wrong (or missing) object has a non-empty region ...
            assert _value_at(m, p.x, p.y) > 0.5, (rec.uid, p)
        n = m.shape[0]
        yy, xx = (np.mgrid[0:n, 0:n] + 0.5) / n
        far = np.ones_like(m, dtype=bool)
        for p in wrong:  # ... and the map is zero away from them (disk radius <= 0.1, jitter <= 0.05)
            far &= np.hypot(xx - p.x, yy - p.y) > 0.15 + 1.5 / n
        assert m[far].max(initial=0) == 0, rec.uid
        for p in wrong:  # all three raters' disks cover each wrong object's centre
            assert _value_at(m, p.x, p.y) == 1.0, (rec.uid, p)
        kinds |= set(scene.errors.values()) | ({"place"} if scene.place_error else set())
    assert kinds >= {"colour", "shape", "count", "missing", "place"}


def test_artifacts_agree_with_implausibility_map(records):
    empty = 0
    for rec in records:
        arts, m = rec.scene.artifacts, rec.implausibility_map
        assert bool(arts) == bool(m.max() > 0), rec.uid
        for a in arts:
            assert all(0 < v < 1 for v in a.anchor), (rec.uid, a.kind)
            assert _value_at(m, *a.anchor) > 0.3, (rec.uid, a.kind)
        empty += not arts
    assert 0.3 < empty / len(records) < 0.7


def _nearest_colour(rgb: np.ndarray) -> tuple[str, float]:
    d = {name: float(np.linalg.norm(rgb - np.array(c))) for name, c in COLOURS.items()}
    name = min(d, key=d.get)
    return name, d[name]


def test_drawn_colours_match_the_scene(records):
    checked = 0
    for rec in records:
        scene = rec.scene
        if scene.artifacts:
            continue
        img = np.asarray(rec.image, dtype=np.float32)
        n = img.shape[0]
        for p in scene.instances:
            if any(q is not p and math.hypot(q.x - p.x, q.y - p.y) < p.r for q in scene.instances):
                continue  # "inside": another object covers this centre
            j, i = int(p.x * n), int(p.y * n)
            patch = img[max(0, i - 1):i + 2, max(0, j - 1):j + 2].reshape(-1, 3).mean(0)
            name, dist = _nearest_colour(patch)
            if p.drawn:
                assert name == scene.drawn[p.group].colour and dist < 60, (rec.uid, p, name, dist)
                if scene.errors.get(p.group) == "colour":
                    assert name != scene.spec.groups[p.group].colour
            else:  # a missing object is not drawn: background there
                assert dist > 80, (rec.uid, p, name, dist)
            checked += 1
    assert checked > 40


def test_scores_in_range_and_depend_on_the_image():
    spec = sample_prompt(np.random.default_rng(11))
    recs = [record_from_spec(spec, np.random.default_rng(100 + k), f"r{k}", 32) for k in range(24)]
    assert len({r.prompt for r in recs}) == 1
    assert len({r.image.tobytes() for r in recs}) == len(recs)
    for name in SCORE_NAMES:
        vals = np.array([r.scores[name] for r in recs])
        assert np.all(np.isfinite(vals))
        assert vals.std() > 0.03, name  # the same prompt gets different scores
    # plausibility and alignment follow the module docstring's formulas, up to the rater noise (std 0.025)
    weights = {"missing": 1.0, "shape": 0.75, "colour": 0.65, "count": 0.55, "place": 0.55, "size": 0.45}
    for r in recs:
        sev = sum(a.severity for a in r.scene.artifacts)
        assert abs(r.scores["plausibility"] - np.clip(0.96 - 0.2 * sev, 0.02, 0.98)) < 0.1, r.uid
        k, errs = len(r.scene.spec.groups), list(r.scene.errors.values()) + ["place"] * r.scene.place_error
        align = 0.96 - 0.42 * sum(weights[e] for e in errs) / (1 + 0.15 * (k - 1))
        assert abs(r.scores["alignment"] - np.clip(align, 0.02, 0.98)) < 0.1, r.uid
    # plausibility follows artifacts, alignment follows errors
    for r in recs:
        if not r.scene.artifacts:
            assert r.scores["plausibility"] > 0.85
        if len(r.scene.artifacts) >= 2:
            assert r.scores["plausibility"] < 0.8
        if not (r.scene.errors or r.scene.place_error):
            assert r.scores["alignment"] > 0.85
        else:
            assert r.scores["alignment"] < 0.85


def test_pairs_share_prompts_with_different_renderings():
    shared = [i for i in range(1, 200, 2) if prompt_key(5, "train", i) == i - 1]
    assert 15 < len(shared) < 45
    i = shared[0]
    a, b = make_record(5, "train", i - 1, 32), make_record(5, "train", i, 32)
    assert a.prompt == b.prompt
    assert a.image.tobytes() != b.image.tobytes()


def test_statistics(records):
    s = np.array([[r.scores[k] for k in SCORE_NAMES] for r in records])
    assert s.std(0).min() > 0.06
    empty_mis = np.mean([r.misalignment_map.max() == 0 for r in records])
    assert 0.3 < empty_mis < 0.7
    overall = s[:, 3]
    for j in range(3):
        assert np.corrcoef(s[:, j], overall)[0, 1] > 0.2


def test_objects_are_large_and_inside_the_picture(records):
    from rahf.data.synth import BOUND

    for rec in records:
        assert all(p.r >= 0.097 for p in rec.scene.instances)
        # every object's bounding circle lies inside the image
        assert all(BOUND * p.r <= min(p.x, p.y, 1 - p.x, 1 - p.y) for p in rec.scene.instances), rec.uid


def test_cli_and_entry_point(tmp_path, capsys):
    out = tmp_path / "cli"
    assert rahf_main(["data", "synth", "--out", str(out), "--train", "5", "--dev", "2", "--test", "0",
                      "--size", "32", "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "records/s" in text and "wrote 7 records" in text
    assert rahf_main(["data", "validate", str(out)]) == 0
    spec = importlib.util.spec_from_file_location("make_synth", Path(__file__).parents[1] / "data_tools" / "make_synth.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path / "tool"), "--train", "5", "--dev", "2", "--test", "0",
                     "--size", "32", "--workers", "1"]) == 0
    assert _files(out) == _files(tmp_path / "tool")


def test_refuses_to_write_into_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        generate(tmp_path, train=2, dev=0, test=0, size=32, workers=1)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_regenerating_replaces_old_records(tmp_path):
    generate(tmp_path / "d", train=6, dev=0, test=0, size=32, workers=1)
    generate(tmp_path / "d", train=3, dev=0, test=0, size=32, workers=1)
    assert len(list((tmp_path / "d" / "train" / "images").iterdir())) == 3
    assert len(open_dataset(tmp_path / "d", "train")) == 3


def test_split_sizes_are_defined_once():
    import argparse
    import dataclasses
    import inspect

    from rahf.cli.data import add_synth_arguments
    from rahf.data.synth import SYNTH_DEFAULTS, SynthConfig
    from rahf.training.config import TrainConfig

    # the train split's extras (grouped counterfactual prompts, their pick, one-object scenes) are the
    # trainer's options and off by default
    extras = {"prompts_per_image": 1, "variant_pick": "random", "easy_fraction": 0.0}
    want = {k: v for k, v in dataclasses.asdict(SYNTH_DEFAULTS).items() if k not in extras}
    assert want == {"train": 3000, "dev": 200, "test": 300, "size": 128, "seed": 0}  # the README's default job
    assert {k: getattr(SYNTH_DEFAULTS, k) for k in extras} == extras
    assert TrainConfig().data.synth == SYNTH_DEFAULTS == SynthConfig()
    params = inspect.signature(generate).parameters
    assert {k: params[k].default for k in want} == want and params["easy_fraction"].default == 0.0
    p = argparse.ArgumentParser()
    add_synth_arguments(p)
    args = p.parse_args(["--out", "x"])
    assert {k: getattr(args, k) for k in want} == want


def test_tag_kinds_name_the_error_behind_each_tagged_word():
    """The module docstring's table, worked by hand on "two red circles left of a big blue square and a green
    star": a count error tags "two", a missing group its count, size, colour and noun, a wrong place the
    relation's words; two errors on one group (a counterfactual prompt) tag both words."""
    spec = synth.PromptSpec(
        [synth.Group("red", "circle", 2, None, "two"), synth.Group("blue", "square", 1, "big", "a"),
         synth.Group("green", "star", 1, None, "a")], "left of",
        [("two", ("count", 0)), ("red", ("colour", 0)), ("circles", ("noun", 0)), ("left", ("rel", -1)),
         ("of", ("rel", -1)), ("a", ("count", 1)), ("big", ("size", 1)), ("blue", ("colour", 1)),
         ("square", ("noun", 1)), ("and", None), ("a", ("count", 2)), ("green", ("colour", 2)), ("star", ("noun", 2))])
    assert synth.tag_kinds(spec, {0: {"count"}, 1: {"missing"}}, True) == [
        "count", None, None, "place", "place", "missing", "missing", "missing", "missing", None, None, None, None]
    assert synth.tag_kinds(spec, {2: {"colour", "shape"}}, False) == [None] * 11 + ["colour", "shape"]
    assert synth.tag_kinds(spec, {}, False) == [None] * 13
    # the generator's tags are the words tag_kinds names
    for i in range(30):
        rec = synth.make_record(0, "train", i, 32)
        kinds = synth.tag_kinds(rec.scene.spec, {g: {k} for g, k in rec.scene.errors.items()}, rec.scene.place_error)
        assert [k is not None for k in kinds] == parse_tagged(rec.tagged_prompt)[1]
        assert {k for k in kinds if k} == set(rec.scene.errors.values()) | ({"place"} if rec.scene.place_error else set())
