"""What makes the model read the prompt: balanced counterfactual training data and the word head."""

import math

import pytest
import torch

from rahf import RAHF, RAHFConfig
from rahf.data import synth
from rahf.data import synth_variants as sv
from rahf.data.torch_data import RAHFCollator
from rahf.model.loss import RAHFLoss
from rahf.model.config import LossConfig
from rahf.model.tokenizer import load_tokenizer
from rahf.model.decoding import word_head_tag_flags, word_head_tagging
from rahf.eval.predict import decode_tagged


def _errors(rec) -> int:
    return sum(1 for _ in rec.scene.errors) + int(rec.scene.place_error)


# ---------------------------------------------------------------------------------------------- balanced variants
@pytest.fixture(scope="module")
def records():
    return [synth.make_record(0, "train", i, 64) for i in range(160)]


def test_balanced_pick_fixes_an_error_when_it_can(records):
    fixed = added = 0
    for rec in records:
        base = _errors(rec)
        fixing = [s for s in sv.synth_swaps(rec)
                  if sum(map(len, sv.exact_errors(rec.scene, sv._new_spec(rec.scene.spec, s))[0].values()))
                  + int(sv.exact_errors(rec.scene, sv._new_spec(rec.scene.spec, s))[1]) < base]
        (v,) = sv.record_variants(rec, 1, pick="balanced") or [None]
        if v is None:
            continue
        n = sum(map(len, v.errors.values())) + int(v.place_error)
        if base and fixing:  # a record drawn with a fixable error gets a fixing swap
            assert n < base, (rec.uid, rec.prompt, v.record.prompt)
            fixed += 1
        elif not base:  # an aligned record: every swap adds an error
            assert n > 0 and "_0" in v.record.tagged_prompt
            added += 1
    assert fixed >= 30 and added >= 50, (fixed, added)


def test_balanced_pick_evens_out_aligned_and_misaligned_prompts(records):
    def aligned_share(pick):
        prompts = []
        for rec in records:
            prompts.append(rec.tagged_prompt)
            prompts += [v.record.tagged_prompt for v in sv.record_variants(rec, 1, pick=pick)]
        return sum("_0" not in p for p in prompts) / len(prompts)

    rand, bal = aligned_share("random"), aligned_share("balanced")
    # random swaps nearly always add an error; the balanced pick brings the aligned share close to the
    # plain data's (about half the scenes are drawn as asked)
    assert bal > rand + 0.08 and bal > 0.33, (rand, bal)
    with pytest.raises(ValueError, match="pick"):
        sv.record_variants(records[0], 1, pick="best")


def test_balanced_variants_are_deterministic(records):
    a = [v.record.prompt for r in records[:20] for v in sv.record_variants(r, 2, pick="balanced")]
    b = [v.record.prompt for r in records[:20] for v in sv.record_variants(r, 2, pick="balanced")]
    assert a == b


# ---------------------------------------------------------------------------------------------- word head
def test_word_tag_targets_follow_the_word_ids():
    tok = load_tokenizer("words")
    prompts = ["there is a big red circle left of two blue squares", "a green star"]
    tagged = ["there is a big red_0 circle left_0 of_0 two blue squares", "a green star_0"]
    enc = tok(prompts, padding=True)
    ids = [enc.word_ids(i) for i in range(2)]
    t = RAHFCollator.word_tag_targets(ids, prompts, tagged, ["u0", "u1"])
    assert t.shape == (2, len(ids[0]))
    for i, (wids, flags) in enumerate(zip(ids, ([0, 0, 0, 0, 1, 0, 1, 1, 0, 0, 0], [0, 0, 1]))):
        for j, w in enumerate(wids):
            assert t[i, j] == (-1.0 if w is None else float(flags[w]))
    assert len([w for w in ids[0] if w == 0]) > 1  # "there" is several pieces: all of them carry its tag
    with pytest.raises(ValueError, match="u1"):
        RAHFCollator.word_tag_targets(ids, prompts, [tagged[0], "a green_0 square"], ["u0", "u1"])


def test_word_head_needs_a_tokenizer_with_word_ids():
    with pytest.raises(ValueError, match="fast tokenizer"):
        RAHFCollator(load_tokenizer("byt5"), word_tags=True)


def tiny_model(**kw) -> RAHF:
    torch.manual_seed(0)
    cfg = RAHFConfig.preset("tiny", vision={"img_size": 32, "depth": 1}, text={"num_layers": 1, "num_decoder_layers": 1},
                            word_head=True, **kw)
    return RAHF(cfg)


def _word_batch(variant):
    """A tiny model with the word head and a collated batch of two tagged prompts."""
    model = tiny_model(variant=variant)
    coll = RAHFCollator.for_model(model)
    assert coll.word_tags
    items = []
    for i, (p, t) in enumerate([("a red circle", "a red_0 circle"), ("two big blue squares left of a star",
                                                                     "two big blue squares left_0 of_0 a star")]):
        items.append({"pixel_values": torch.randn(3, 32, 32), "scores": torch.rand(4), "implausibility_map": torch.zeros(model.heatmap_size, model.heatmap_size),
                      "misalignment_map": torch.zeros(model.heatmap_size, model.heatmap_size), "index": i, "uid": f"u{i}", "prompt": p, "tagged_prompt": t})
    return model, coll(items)


@pytest.mark.parametrize("variant", ["multi_head", "augmented_prompt"])
def test_word_head_reads_the_prompt_tokens(variant):
    model, batch = _word_batch(variant)
    out = model(**{k: v for k, v in batch.items() if k in ("pixel_values", "input_ids", "attention_mask", "labels",
                                                              "task_ids", "task_mask")})
    assert out.word_logits.shape == batch["input_ids"].shape == batch["word_tags"].shape
    # the head reads the prompt-token states: its logits are the linear head applied to them
    hidden = out.encoder_hidden[:, -batch["input_ids"].shape[1]:]
    torch.testing.assert_close(out.word_logits, model.word_head(hidden).squeeze(-1))
    cfg = LossConfig(word_tags=2.5)
    losses = RAHFLoss(cfg)(out, batch)
    known = batch["word_tags"] >= 0
    by_hand = sum(-(math.log(torch.sigmoid(z).item()) if y == 1 else math.log(1 - torch.sigmoid(z).item()))
                  for z, y in zip(out.word_logits[known], batch["word_tags"][known])) / known.sum().item()
    assert losses["word_loss"].item() == pytest.approx(by_hand, rel=1e-5)
    rest = cfg.heatmap * losses["heatmap_loss"] + cfg.score * losses["score_loss"] + cfg.text * losses["text_loss"]
    assert losses["loss"].item() == pytest.approx((rest + 2.5 * losses["word_loss"]).item(), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["multi_head", "augmented_prompt"])
def test_word_head_trains(variant):
    """A few steps on the word loss alone fit the tags: tagged words high, the others low."""
    model, batch = _word_batch(variant)
    known = batch["word_tags"] >= 0
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        o = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  task_ids=batch.get("task_ids"), task_mask=batch.get("task_mask"))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(o.word_logits[known], batch["word_tags"][known])
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = torch.sigmoid(o.word_logits.detach())
    assert (p[batch["word_tags"] == 1] > 0.7).all() and (p[batch["word_tags"] == 0] < 0.3).all()
    # the word_head decoding reads the tags back off the fitted head
    assert decode_tagged(model, o, batch["prompts"], "word_head") == batch["tagged_prompts"]


def test_word_head_decoding_tags_words_by_their_highest_token_probability():
    model, batch = _word_batch("multi_head")
    out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    prompts = ["there is a red circle", "a green star"]
    enc = model.tokenizer(prompts, padding=True)
    ids = [enc.word_ids(i) for i in range(2)]
    assert len([w for w in ids[0] if w == 0]) > 1  # "there": several pieces
    logits = torch.full((2, len(ids[0])), -4.0)
    first_there = ids[0].index(0)
    logits[0, first_there + 1] = 3.0  # one piece of "there" above 0.5: the word is tagged
    logits[0, ids[0].index(3)] = 0.1  # "red": sigmoid 0.525
    logits[1, ids[1].index(2)] = -0.1  # "star": sigmoid 0.475, just below
    out.word_logits = logits
    assert decode_tagged(model, out, prompts, "word_head") == ["there_0 is a red_0 circle", "a green star"]
    (_, flags), probs = [x[0] for x in word_head_tag_flags(model, out, prompts, threshold=0.4, return_probs=True)]
    assert flags == [True, False, False, True, False]
    assert probs[3] == pytest.approx(torch.sigmoid(torch.tensor(0.1)).item())
    assert word_head_tagging(model, out, prompts, threshold=0.45)[1] == "a green star_0"
    # words past the encoder's token limit (3 tokens: two words and the end of sequence) get no score
    model.config.text.max_prompt_tokens = 3
    out.word_logits = torch.full((2, 3), 4.0)
    assert decode_tagged(model, out, prompts, "word_head") == ["there_0 is a red circle", "a_0 green_0 star"]


def test_word_head_decoding_needs_a_word_head(tmp_path):
    from rahf.configtools import ConfigError
    from rahf.training.config import resolve_config

    model = RAHF(RAHFConfig.preset("tiny", vision={"img_size": 32, "depth": 1}, text={"num_layers": 1, "num_decoder_layers": 1}))
    coll = RAHFCollator.for_model(model)
    b = coll.tokenize_prompts(["a red circle"])
    out = model(pixel_values=torch.randn(1, 3, 32, 32), input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    with pytest.raises(ValueError, match="word head"):
        decode_tagged(model, out, ["a red circle"], "word_head")
    with pytest.raises(ConfigError, match="model.word_head"):
        resolve_config(None, ["eval.decode=word_head"])
    assert resolve_config(None, ["eval.decode=word_head", "model.word_head=true"]).eval.decode == "word_head"


def test_model_without_word_head_has_none():
    model = RAHF(RAHFConfig.preset("tiny", vision={"img_size": 32, "depth": 1}))
    assert model.word_head is None and RAHFCollator.for_model(model).word_tags is False


# ---------------------------------------------------------------------------------------------- curriculum
def test_curriculum_sampler_draws_the_scheduled_share_of_easy_records():
    from rahf.training.curriculum import CurriculumEpochSampler

    easy = [i % 4 == 0 for i in range(200)]  # 50 easy, 150 full
    s = CurriculumEpochSampler(easy, [1.0, 0.5, 0.2], seed=3)
    for epoch, share in [(0, 1.0), (1, 0.5), (2, 0.2), (5, 0.2)]:
        s.set_epoch(epoch)
        order = list(s)
        assert len(order) == len(s) == 200
        assert sum(easy[i] for i in order) == round(share * 200), epoch
        if share == 1.0:  # 200 draws from 50 easy records: each exactly 4 times
            assert sorted(order) == sorted([i for i in range(200) if easy[i]] * 4)
        else:  # the full pool (150 records) is drawn without repeats while it lasts
            full = [i for i in order if not easy[i]]
            assert len(set(full)) == min(len(full), 150)
        s2 = CurriculumEpochSampler(easy, [1.0, 0.5, 0.2], seed=3)
        s2.set_epoch(epoch)
        assert list(s2) == order  # depends only on (seed, epoch): a resumed run draws the same
    s.set_epoch(1)
    other = CurriculumEpochSampler(easy, [1.0, 0.5, 0.2], seed=4)
    other.set_epoch(1)
    assert list(other) != list(s)
    with pytest.raises(ValueError, match="shares"):
        CurriculumEpochSampler(easy, [1.5], seed=0)
    with pytest.raises(ValueError, match="pool"):
        CurriculumEpochSampler([False] * 10, [0.5], seed=0)


def test_easy_indices_follow_the_generator(tmp_path):
    from rahf.data.synth_variants import grouped_generate
    from rahf.training.curriculum import easy_indices

    synth.generate(tmp_path, train=0, dev=4, test=0, size=32, seed=2)
    grouped_generate(tmp_path, "train", 24, 2, size=32, seed=2, pick="balanced", easy_fraction=0.5, workers=1)
    from rahf.data import open_dataset

    split = open_dataset(tmp_path, "train")
    uids = [e["uid"] for e in split.entries]
    flags = easy_indices(str(tmp_path), "train", uids)
    assert 4 <= sum(flags) <= len(flags) - 4
    for u, f, e in zip(uids, flags, split.entries):
        # an easy record's prompt names one object: exactly one colour word and one shape word
        words = e["prompt"].lower().split()
        colours = [w for w in words if w in synth.COLOURS]
        assert (len(colours) == 1) if f else True, (u, e["prompt"])
        assert f == synth.is_easy(2, "train", int(u.split("~")[0].rsplit("-", 1)[1]), 0.5)
    assert sum(len([w for w in e["prompt"].lower().split() if w in synth.COLOURS]) > 1
               for e, f in zip(split.entries, flags) if not f) > 0  # full scenes have several groups
    with pytest.raises(ValueError, match="easy scenes"):
        easy_indices(str(tmp_path), "dev", [])


@pytest.mark.slow
def test_training_job_reports_the_word_head_tags_beside_the_decoder(synth_root, tmp_path):
    """A job with a word head: the test evaluation's keyword_word_head/... equal rahf eval --decode word_head
    on the export; a model without a word head keeps free decoding as the second one."""
    import json

    from rahf.cli import main as rahf_main
    from rahf.training.trainer import main as train_main
    from test_train import small

    args = small(synth_root, tmp_path, "wh", "model.word_head=true", "train.max_steps=2", "eval.every=0",
                 "eval.counterfactual_records=0")
    assert train_main(["--config", "none", *args]) == 0
    export = tmp_path / "wh" / "export"
    m = json.loads((export / "metrics.json").read_text())
    assert "keyword/f1" in m and "keyword_word_head/f1" in m and "keyword_free/f1" not in m
    out = tmp_path / "wh_eval.json"
    assert rahf_main(["eval", "--checkpoint", str(export), "--data", str(synth_root), "--split", "test",
                      "--decode", "word_head", "--counterfactual", "0", "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    for k in ("precision", "recall", "f1"):
        assert again[f"keyword/{k}"] == pytest.approx(m[f"keyword_word_head/{k}"], abs=1e-12)
