"""One-word swaps, exact-labelled synth variants, the counterfactual evaluation and grouped training data."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from rahf.data import open_dataset, synth
from rahf.data import synth_variants as sv
from rahf.schema import parse_tagged, split_words, tag_words
from rahf.swaps import DEFAULT_SWAPS, SYNTH_SWAPS, candidate_swaps, word_swaps

from test_train import ENV, ROOT, small


def _changed(a, b):
    assert len(a) == len(b)
    return [i for i, (x, y) in enumerate(zip(a, b)) if x != y]


# ---------------------------------------------------------------------------------------------- swaps
def test_swaps_change_one_word_and_fix_the_article():
    words = split_words("An image of an orange circle, left of two big red squares.")
    swaps = candidate_swaps(words, SYNTH_SWAPS)
    kinds = {s.kind for s in swaps}
    assert kinds == {"colour", "object", "count", "size", "relation"}
    for s in swaps:
        changed = _changed(words, list(s.words))
        assert s.index in changed and set(changed) <= {s.index, *(() if s.article is None else (s.article,))}
        art = s.words[s.index - 1].lower()
        if words[s.index - 1].lower() in ("a", "an"):
            assert art == ("an" if s.new[0] in "aeiou" else "a")
    colour = [s for s in swaps if s.old == "orange"]
    assert all(s.article == 3 and s.words[3] == "a" for s in colour)  # "an orange" -> "a red"
    assert {s.new for s in swaps if s.old == "squares"} == {"circles", "triangles", "stars", "crosses"}  # plural kept
    assert {s.new for s in swaps if s.old == "two"} == {"three"}
    assert {s.new for s in swaps if s.old == "left"} == {"right"}
    assert words[0] == "An" and all(s.words[0] == "An" for s in swaps)  # the template's article is not a group's


def test_swaps_are_seeded_by_key_and_natural_vocabulary():
    p = "A red apple on the left of two small dogs"
    a, b = word_swaps(p, "uid-1", 5), word_swaps(p, "uid-1", 5)
    assert [s.prompt for s in a] == [s.prompt for s in b] and len(a) == 5
    others = [[s.prompt for s in word_swaps(p, f"uid-{k}", 5)] for k in range(2, 8)]
    assert any(o != [s.prompt for s in a] for o in others)
    assert len({s.kind for s in a}) >= 4  # round robin over kinds
    cand = candidate_swaps(split_words(p), DEFAULT_SWAPS)
    starts = {" ".join(s.words[:3]).lower() for s in cand}
    assert {"an orange apple", "a red ball"} <= starts and "a orange apple" not in starts
    assert not candidate_swaps(split_words("a photo at left"), DEFAULT_SWAPS, kinds=("relation",))  # not "left of"
    with pytest.raises(ValueError):
        candidate_swaps(["red"], SYNTH_SWAPS, kinds=("texture",))


# ---------------------------------------------------------------------------------------------- exact labels
@pytest.fixture(scope="module")
def records():
    return [synth.make_record(0, "dev", i, 64) for i in range(40)]


def test_own_prompt_relabels_to_the_generator_labels(records):
    for r in records:
        errors, place = sv.exact_errors(r.scene, r.scene.spec)
        assert errors == {g: {k} for g, k in r.scene.errors.items()} and place == r.scene.place_error
        assert tag_words(r.scene.spec.words, sv.variant_tags(r.scene.spec, errors, place)) == r.tagged_prompt


def test_variants_have_exact_labels(records):
    seen = set()
    for r in records:
        for v in sv.record_variants(r, 4):
            vr, s = v.record, v.swap
            assert _changed(split_words(r.prompt), vr.prompt.split()) == sorted({s.index} | ({s.article} - {None}))
            assert vr.image is r.image and vr.scores["plausibility"] == r.scores["plausibility"]
            words, flags = parse_tagged(vr.tagged_prompt)
            assert words == vr.prompt.split()
            role = r.scene.spec.roles[s.index]
            drawn = r.scene.drawn[role[1]] if role[1] >= 0 else None
            missing = r.scene.errors.get(role[1]) == "missing" if role[1] >= 0 else False
            if s.kind == "colour" and not missing:  # tagged iff the new colour is not the drawn one
                assert flags[s.index] == (s.new.lower() != drawn.colour)
                seen.add(("colour", flags[s.index]))
            if s.kind == "relation":
                assert flags[s.index] == (not r.scene.place_error and r.scene.errors.get(0) != "missing")
                seen.add(("relation", flags[s.index]))
            # the map is non-empty iff some word is tagged; alignment moves with the noise-free difference
            assert (vr.misalignment_map.max() > 0) == any(flags)
            old = sv.true_alignment_of(r.scene.spec, {g: {k} for g, k in r.scene.errors.items()}, r.scene.place_error)
            want = float(np.clip(r.scores["alignment"] + v.true_alignment - old, 0, 1))
            assert vr.scores["alignment"] == pytest.approx(want, abs=1e-4)
            if any(flags) and not any(parse_tagged(r.tagged_prompt)[1]):
                assert vr.scores["alignment"] < r.scores["alignment"]
            seen.add(s.kind)
    assert {"colour", "object", "size", ("colour", True)} <= seen


def test_a_swap_back_to_what_was_drawn_removes_the_error():
    for i in range(200):
        r = synth.make_record(0, "dev", i, 64)
        gi = next((g for g, k in r.scene.errors.items() if k == "colour"), None)
        if gi is not None:
            break
    drawn = r.scene.drawn[gi].colour
    fix = [s for s in sv.synth_swaps(r) if s.kind == "colour" and s.new.lower() == drawn
           and r.scene.spec.roles[s.index] == ("colour", gi)]
    if not fix:
        pytest.skip("the drawn colour would duplicate another group")
    v = sv.make_variant(r, fix[0], r.uid + "~1")
    assert not parse_tagged(v.record.tagged_prompt)[1][fix[0].index]
    assert v.record.scores["alignment"] > r.scores["alignment"]


def test_regenerate_matches_the_written_split(synth_root):
    split = open_dataset(synth_root, "dev")
    ex = split[3]
    rec = sv.regenerate(synth_root, "dev", ex.uid)
    assert rec.prompt == ex.prompt and rec.tagged_prompt == ex.tagged_prompt
    assert sv.regenerate(synth_root, "dev", "not-a-synth-uid") is None


# ---------------------------------------------------------------------------------------------- metrics
def test_counterfactual_metrics_on_the_tiny_model(synth_root):
    """Each metric equals its definition worked out here from the same items and predictions."""
    import torch

    from known_model import tiny_config
    from rahf import RAHF, RAHFScorer
    from rahf.eval.counterfactual import build_items, counterfactual_metrics, format_counterfactual, predict_items
    from rahf.eval.metrics import keyword_metrics

    torch.manual_seed(0)
    model = RAHF(tiny_config()).train()  # untrained: its alignment differs from prompt to prompt
    split = open_dataset(synth_root, "dev")
    m = counterfactual_metrics(model, split, max_records=10, variants=3)
    assert model.training  # mode restored
    images, items, exact = build_items(split, 10, 3)
    pred, tagged, _ = predict_items(RAHFScorer(model, device="cpu"), images, items)
    own = {it.group: k for k, it in enumerate(items) if it.swapped is None}
    variants = [(own[it.group], k) for k, it in enumerate(items) if it.swapped is not None]
    assert exact and m["counterfactual/exact"] == 1.0
    assert m["counterfactual/records"] == 10 and m["counterfactual/variants"] == len(variants) > 10
    # pairwise accuracy: own prompt above the variant, over variants whose noise-free alignment is lower by
    # at least the margin (0.1); ties count half
    pairs = [(o, k) for o, k in variants if items[o].true_alignment - items[k].true_alignment >= 0.1]
    wins = [1.0 if pred[o] > pred[k] else 0.5 if pred[o] == pred[k] else 0.0 for o, k in pairs]
    assert 0 < len(pairs) < len(variants) and 0 < sum(wins) < len(wins)  # some pairs left out, some won, some lost
    assert m["counterfactual/pairs"] == len(pairs)
    assert m["counterfactual/pairwise_acc"] == pytest.approx(np.mean(wins), abs=1e-12)
    # the swapped word tagged, over variants whose swapped word is misaligned in the label
    hits = [parse_tagged(tagged[k])[1][items[k].swapped] for _, k in variants if items[k].swapped_bad]
    assert len(hits) < len(variants)  # a swap may fit the picture as well as the own word
    assert m["counterfactual/swapped_tagged"] == pytest.approx(np.mean(hits), abs=1e-12)
    # the same by swap kind: each kind's pairs and hits, and together they make up the whole
    kinds = {items[k].kind for _, k in variants}
    assert len(kinds) > 1 and None not in kinds
    for kind in kinds:
        kw_ = [w for (o, k), w in zip(pairs, wins) if items[k].kind == kind]
        kh = [parse_tagged(tagged[k])[1][items[k].swapped] for _, k in variants
              if items[k].swapped_bad and items[k].kind == kind]
        assert m[f"counterfactual/pairs/{kind}"] == len(kw_)
        assert m[f"counterfactual/pairwise_acc/{kind}"] == pytest.approx(np.mean(kw_), abs=1e-12, nan_ok=True) \
            if kw_ else math.isnan(m[f"counterfactual/pairwise_acc/{kind}"])
        assert m[f"counterfactual/swapped_tagged/{kind}"] == pytest.approx(np.mean(kh), abs=1e-12) \
            if kh else math.isnan(m[f"counterfactual/swapped_tagged/{kind}"])
    assert sum(m[f"counterfactual/pairs/{k}"] for k in kinds) == len(pairs)
    # spreads: the standard deviation within each image's prompts (mean over images) and across own prompts
    groups = sorted(own)
    within = np.mean([np.std([pred[k] for k, it in enumerate(items) if it.group == g]) for g in groups])
    assert m["counterfactual/spread_within"] == pytest.approx(within, rel=1e-6)
    assert m["counterfactual/spread_across"] == pytest.approx(np.std([pred[own[g]] for g in groups]), rel=1e-6)
    labels = np.array([it.alignment for it in items])
    label_within = np.mean([np.std([labels[k] for k, it in enumerate(items) if it.group == g]) for g in groups])
    assert m["counterfactual/label_spread_within"] == pytest.approx(label_within, rel=1e-9) and label_within > 0.01
    assert m["counterfactual/variant_alignment_plcc"] == pytest.approx(np.corrcoef(pred, labels)[0, 1], abs=1e-6)
    kw = keyword_metrics(tagged, [it.tagged for it in items])
    assert m["counterfactual/variant_keyword_f1"] == pytest.approx(kw["f1"], abs=1e-12, nan_ok=True)
    assert "one-word swaps, exact labels" in format_counterfactual(m)
    assert f"{sorted(kinds)[0]} " in format_counterfactual(m).split("by swap kind")[1]
    # the own prompts' misaligned words by the error that tags them: every tagged word of the label is
    # counted under one error, and the recall is the share of them the model tagged
    per_error: dict = {}
    for k, it in enumerate(items):
        if it.swapped is None:
            gold, got = parse_tagged(it.tagged)[1], parse_tagged(tagged[k])[1]
            assert [e is not None for e in it.word_errors] == gold
            for e, g, p in zip(it.word_errors, gold, got):
                if g:
                    per_error.setdefault(e, []).append(float(p))
    assert per_error and sum(len(v) for v in per_error.values()) == sum(
        sum(parse_tagged(items[own[g]].tagged)[1]) for g in groups)
    assert {k.rsplit("/", 1)[1] for k in m if k.startswith("counterfactual/own_tags/")} == set(per_error)
    for e, v in per_error.items():
        assert m[f"counterfactual/own_tags/{e}"] == len(v)
        assert m[f"counterfactual/own_tag_recall/{e}"] == pytest.approx(np.mean(v), abs=1e-12)
    assert "by error: " in format_counterfactual(m)


def test_counterfactual_metrics_of_the_hand_set_model(synth_root, known_ckpt):
    """Scores and maps that ignore the prompt: every pair is a tie, nothing spreads, and the map metrics are
    those of the known map against each item's ground truth."""
    import torch

    from known_model import known_maps
    from rahf.eval.counterfactual import build_items, counterfactual_metrics

    model, _ = known_ckpt
    split = open_dataset(synth_root, "dev")
    m = counterfactual_metrics(model, split, max_records=6, variants=3)
    assert m["counterfactual/pairwise_acc"] == 0.5 and m["counterfactual/pairs"] > 0
    assert m["counterfactual/spread_within"] == 0.0 and m["counterfactual/spread_across"] == 0.0
    assert math.isnan(m["counterfactual/variant_alignment_plcc"])  # constant predictions
    _, items, _ = build_items(split, 6, 3)
    gt = torch.from_numpy(np.stack([it.mis_map for it in items])).double()
    want = torch.from_numpy(known_maps(model, *gt.shape[-2:])["misalignment"]).expand_as(gt)
    mse = ((want - gt) ** 2).mean((1, 2))
    nonempty = gt.flatten(1).amax(1) > 0
    assert 0 < nonempty.sum() < len(items)
    assert m["counterfactual/variant_misalignment_mse"] == pytest.approx(float(mse.mean()), abs=1e-6)
    assert m["counterfactual/variant_misalignment_mse_empty"] == pytest.approx(float(mse[~nonempty].mean()), abs=1e-6)
    cc = [np.corrcoef(want[i].ravel(), gt[i].ravel())[0, 1] for i in range(len(items)) if nonempty[i]]
    assert m["counterfactual/variant_misalignment_cc"] == pytest.approx(np.mean(cc), abs=1e-5)


def test_counterfactual_metrics_on_natural_prompts(tmp_path, ckpt):
    from PIL import Image

    from rahf.data.format import SplitWriter, write_dataset_info
    from rahf.eval.counterfactual import counterfactual_metrics

    z = np.zeros((16, 16), np.float32)
    with SplitWriter(tmp_path, "dev") as w:
        for i, p in enumerate(["a red cat left of a dog", "two big green apples", "a cup"]):
            w.add(f"n{i}", p, p, {k: 0.5 for k in synth.SCORE_NAMES}, Image.new("RGB", (32, 32), (i * 80, 0, 0)), z, z)
    write_dataset_info(tmp_path, source="custom")
    from rahf import RAHF

    m = counterfactual_metrics(RAHF.from_pretrained(ckpt), open_dataset(tmp_path, "dev"), variants=2)
    assert m["counterfactual/exact"] == 0.0 and m["counterfactual/variants"] == 6  # two swaps of each prompt
    assert "counterfactual/variant_keyword_f1" not in m


# ---------------------------------------------------------------------------------------------- training data
def test_grouped_generation_and_sampler(tmp_path):
    from rahf.training.grouping import GroupedEpochSampler, group_indices

    n = sv.grouped_generate(tmp_path, "train", 5, 3, size=64, seed=0, workers=1)
    split = open_dataset(tmp_path, "train")
    uids = [e["uid"] for e in split.entries]
    assert n == len(uids) and 10 < n <= 15
    from rahf.data.format import read_dataset_info

    info = read_dataset_info(tmp_path)
    assert info["source"] == "synth" and info["splits"]["train"] == n and info["prompts_per_image"] == {"train": 3}
    assert uids[0] == "synth-train-000000" and uids[1] == "synth-train-000000~1"
    assert split[0].prompt == synth.make_record(0, "train", 0, 64).prompt
    groups = group_indices(uids)
    assert len(groups) == 5
    s = GroupedEpochSampler(groups, seed=1)
    order = list(s)
    assert sorted(order) == list(range(n))
    starts = [order.index(g[0]) for g in groups]
    for g, st in zip(groups, starts):
        assert order[st:st + len(g)] == g  # a group's records stay together, in order
    s.set_epoch(1)
    assert list(s) != order or len(groups) < 3


@pytest.mark.slow
def test_train_with_several_prompts_per_image(tmp_path):
    root = tmp_path / "data"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", "none",
           *small(root, tmp_path / "runs", "grouped", "train.max_steps=2", "eval.every=0", "checkpoint.every=0",
                  "eval.test_at_end=false", "data.synth.train=6", "data.synth.dev=4", "data.synth.test=0",
                  "data.synth.size=64", "data.synth.prompts_per_image=3")]
    r = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    uids = [json.loads(line)["uid"] for line in (root / "train" / "manifest.jsonl").read_text().splitlines()]
    assert any("~" in u for u in uids) and len({sv.group_key(u) for u in uids}) == 6
    steps = [json.loads(line) for line in (tmp_path / "runs" / "grouped" / "steps.jsonl").read_text().splitlines()]
    first = steps[0]["uids"]
    keys = [sv.group_key(u) for u in first]
    assert len(set(keys)) < len(keys)  # the batch holds an image under several prompts


# ---------------------------------------------------------------------------------------------- loss options
def test_alignment_rank_loss_orders_prompts_of_one_image():
    import torch

    from rahf.model.loss import RAHFLoss

    uids = ["a", "a~1", "a~2", "b"]
    target = torch.tensor([0.9, 0.5, 0.9, 0.1])
    good = RAHFLoss.alignment_rank_loss(torch.tensor([0.8, 0.3, 0.8, 0.9]), target, uids)
    bad = RAHFLoss.alignment_rank_loss(torch.tensor([0.3, 0.8, 0.3, 0.0]), target, uids)
    assert good < 0.1 < bad  # "b" (another image) takes part in no pair
    none = RAHFLoss.alignment_rank_loss(torch.tensor([0.3, 0.8]), torch.tensor([0.9, 0.1]), ["a", "b"])
    assert none.item() == 0.0


def test_tag_weight_and_rank_loss_in_the_training_loss(synth_root):
    import torch

    from known_model import tiny_config
    from rahf import RAHF
    from rahf.data.torch_data import RAHFCollator, RAHFTorchDataset
    from rahf.model.loss import RAHFLoss

    torch.manual_seed(0)
    model = RAHF(tiny_config())
    ds = RAHFTorchDataset(open_dataset(synth_root, "train"), model.config.vision.img_size, model.heatmap_size)
    items = [ds[i] for i in range(16)]
    batch = RAHFCollator.for_model(model)(items)
    assert batch["tag_token_id"] == model.tokenizer.convert_tokens_to_ids("_0")
    assert (batch["labels"] == batch["tag_token_id"]).any()
    out = model(**{k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "labels")})
    cfg = model.config.loss
    plain = RAHFLoss(cfg)(out, batch)
    weighted = RAHFLoss(type(cfg)(**{**cfg.__dict__, "tag_weight": 5.0, "alignment_rank": 1.0}))(out, batch)
    # by hand: each label position's cross-entropy, the collator's tag positions weighted 5
    logits, labels = out.logits.detach().float().flatten(0, 1), batch["labels"].flatten()
    ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
    w = (labels != -100).float() * torch.where(labels == batch["tag_token_id"], 5.0, 1.0)
    assert plain["text_loss"].item() == pytest.approx(ce[labels != -100].mean().item(), rel=1e-5)
    assert weighted["text_loss"].item() == pytest.approx(((ce * w).sum() / w.sum()).item(), rel=1e-5)
    assert "rank_loss" in weighted and "rank_loss" not in plain
    # the rank term over pairs of one image ("x" and the "y~k" variants): softplus(-20 (a_i - a_j)) for every
    # pair whose alignment label i exceeds j's by at least 0.05
    batch["uids"] = ["x"] * 8 + [f"y~{k}" for k in range(8)]
    grouped = RAHFLoss(type(cfg)(**{**cfg.__dict__, "alignment_rank": 1.0}))(out, batch)
    a, t = out.scores[:, 1].detach().double(), batch["scores"][:, 1].double()
    terms = [torch.nn.functional.softplus(-20 * (a[i] - a[j])) for i in range(16) for j in range(16)
             if i // 8 == j // 8 and t[i] - t[j] >= 0.05]
    assert terms and grouped["rank_loss"].item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    grouped["loss"].backward()
