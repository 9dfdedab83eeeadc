"""RAHFScorer (rahf.eval.scorer) and constrained decoding (rahf.model.decoding) with the tiny preset."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rahf import RAHF, RAHFScorer
from rahf.eval.scorer import to_pil
from rahf.model.config import MAP_NAMES, SCORE_NAMES
from rahf.data.format import open_dataset, parse_tagged, split_words
from rahf.data.torch_data import RAHFCollator, RAHFTorchDataset
from rahf.model.decoding import constrained_tag_flags, constrained_tagging
from rahf.eval.predict import DEFAULT_DECODE, decode_tagged, predict_batch

from known_model import tiny_config

PROMPTS = ["a yellow cat on a red mat", "Zebra!! qux foo_bar 42", "x", "the   blue, square; and: one?",
           "supercalifragilistic wordsthatarenotinthevocabulary x_1 tags", ""]




@pytest.fixture(scope="module")
def scorer(ckpt):
    return RAHFScorer.from_pretrained(ckpt, device="cpu")


def test_scores_equal_evaluation_path(scorer, synth_root):
    model = scorer.model
    split = open_dataset(synth_root, "test")
    n = 4
    cfg = model.config
    ds = RAHFTorchDataset(split, cfg.vision.img_size, cfg.heatmap_size, cfg.vision.mean, cfg.vision.std)
    batch = RAHFCollator.for_model(model)([ds[i] for i in range(n)])
    pred = predict_batch(model, batch)
    out = pred.output
    tagged_eval = pred.tagged
    assert pred.decode == DEFAULT_DECODE == "constrained"
    assert tagged_eval == decode_tagged(model, out, batch["prompts"], "constrained")
    assert pred.heatmaps["implausibility"].shape[-1] == cfg.heatmap_size  # model resolution
    paths = [split.path(i, "image") for i in range(n)]
    res = scorer.score(paths, [split.entries[i]["prompt"] for i in range(n)], batch_size=n)
    got = np.array([[r.scores[s] for s in SCORE_NAMES] for r in res])
    np.testing.assert_allclose(got, out.scores.numpy(), rtol=0, atol=1e-6)
    for j, r in enumerate(res):
        w, h = split[j].image.size
        for m in MAP_NAMES:
            ref = F.interpolate(out.heatmaps[m][j][None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            np.testing.assert_allclose(r.heatmaps[m], ref.numpy(), atol=1e-6)
        assert r.tagged_prompt == tagged_eval[j]
    # another batch size gives the same numbers (up to float noise from padding/shapes)
    res2 = scorer.score(paths, [split.entries[i]["prompt"] for i in range(n)], batch_size=3)
    np.testing.assert_allclose(np.array([[r.scores[s] for s in SCORE_NAMES] for r in res2]), got, atol=1e-5)


def test_inputs_shapes_and_ranges(scorer, tmp_path):
    rng = np.random.default_rng(0)
    pil = Image.fromarray(rng.integers(0, 255, (100, 150, 3), dtype=np.uint8))  # 150 wide, 100 high
    path = tmp_path / "tall.png"
    Image.fromarray(rng.integers(0, 255, (200, 64, 3), dtype=np.uint8)).save(path)
    arr_u8 = rng.integers(0, 255, (90, 90, 3), dtype=np.uint8)
    arr_f = rng.random((40, 70, 3)).astype(np.float32)
    arr_gray = rng.random((33, 47))
    inputs = [pil, str(path), arr_u8, arr_f, arr_gray]
    res = scorer.score(inputs, "a blue square", batch_size=2)
    sizes = [(100, 150), (200, 64), (90, 90), (40, 70), (33, 47)]
    assert len(res) == 5
    # each result is its own image's: the model's output for it (in one batch of all five), maps resized
    # to the image's own size
    whole = scorer.forward([to_pil(im) for im in inputs], ["a blue square"] * 5)
    for j, (r, hw) in enumerate(zip(res, sizes)):
        assert set(r.scores) == set(SCORE_NAMES)
        np.testing.assert_allclose([r.scores[s] for s in SCORE_NAMES], whole.scores[j].numpy(), atol=1e-5)
        for m in MAP_NAMES:
            hm = r.heatmaps[m]
            assert hm.shape == hw and hm.dtype == np.float32
            want = F.interpolate(whole.heatmaps[m][j][None, None], size=hw, mode="bilinear", align_corners=False)[0, 0]
            np.testing.assert_allclose(hm, want.numpy(), atol=1e-5)
        assert parse_tagged(r.tagged_prompt)[0] == ["a", "blue", "square"]
        assert r["misaligned_words"] == [w for w, f in zip(*parse_tagged(r.tagged_prompt)) if f]
        assert r.size == (hw[1], hw[0])
    # a single image (not a list) and a float array in 0..255 work too
    one = scorer.score(arr_u8.astype(np.float64), "a blue square")
    assert len(one) == 1
    np.testing.assert_allclose(one[0].scores["overall"], res[2].scores["overall"], atol=1e-5)
    # one prompt per image; mismatched counts are an error
    two = scorer.score([pil, pil], ["a cat", "a dog"], decode=None)
    assert two[0].tagged_prompt is None and two[0].misaligned_words == []
    with pytest.raises(ValueError):
        scorer.score([pil, pil, pil], ["a", "b"])
    # decode="free" is the model's greedy generation, not the constrained decoding
    free = scorer.score(pil, "a cat", decode="free")
    out = scorer.forward([pil], ["a cat"])
    assert free[0].tagged_prompt == decode_tagged(scorer.model, out, ["a cat"], "free")[0]
    assert free[0].tagged_prompt != decode_tagged(scorer.model, out, ["a cat"], "constrained")[0]


def test_bf16_autocast_runs(ckpt):
    s = RAHFScorer.from_pretrained(ckpt, device="cpu", dtype=torch.bfloat16)
    r = s.score(np.zeros((50, 80, 3), np.uint8), "a red circle")[0]
    assert r.implausibility.shape == (50, 80) and r.implausibility.dtype == np.float32
    assert parse_tagged(r.tagged_prompt)[0] == ["a", "red", "circle"]


def test_embed(scorer):
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    prompts = ["a cat", "a much longer prompt with many words in it", "dog"]
    e = scorer.embed(imgs, prompts, batch_size=3)
    assert e.shape == (3, scorer.config.text.d_model) and e.dtype == np.float32 and np.isfinite(e).all()
    # mask-aware: padding in a bigger batch does not change an example's embedding
    e1 = scorer.embed(imgs[:1], prompts[:1])
    np.testing.assert_allclose(e1[0], e[0], atol=1e-4)


def _check_exact_words(model, prompts):
    rng = np.random.default_rng(0)
    pil = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in prompts]
    s = RAHFScorer(model, device="cpu")
    out = s.forward(pil, [" ".join(split_words(p)) for p in prompts])
    for margin in (0.0, float("-inf"), float("inf")):
        tagged = constrained_tagging(model, out, prompts, margin=margin)
        for p, t in zip(prompts, tagged):
            words, flags = parse_tagged(t)
            assert words == split_words(p), (p, t)
            if margin == float("-inf"):
                assert all(flags), t  # every word can be tagged ...
            if margin == float("inf"):
                assert not any(flags), t  # ... or left alone
    return constrained_tag_flags(model, out, prompts, return_margins=True)


def test_constrained_returns_exactly_the_prompt_words():
    torch.manual_seed(1)
    model = RAHF(tiny_config()).eval()
    _check_exact_words(model, PROMPTS)


def test_constrained_multi_token_tag_byt5():
    """With a byte tokenizer ``_0`` is two tokens and words are many: the general path."""
    torch.manual_seed(0)
    model = RAHF(tiny_config(text={"tokenizer": "byt5"})).eval()
    _, margins = _check_exact_words(model, PROMPTS[:4])
    assert all(np.isfinite(m) for ms in margins for m in ms)


def test_constrained_augmented_prompt_variant():
    torch.manual_seed(0)
    model = RAHF(tiny_config(variant="augmented_prompt")).eval()
    _check_exact_words(model, PROMPTS[:3])
