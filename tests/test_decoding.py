"""Constrained decoding's decision (rahf.model.decoding), word by word, for every tokenizer kind.

A tiny RAHF runs for real; only its T5's output logits are replaced by a rule: at the first decoder
position that has read word i whole (whatever the prefix holds before it: earlier words, tagged or
not), the first token of the tag (``_0`` for the word tokenizer, ``_`` for bytes and sentencepiece
pieces) gets logit ``d_i`` and every other token 0, so the decoder's logit difference tag − continue
for word i is exactly ``d_i``. ``d_i`` comes from a table, or from the tags the prefix already holds
(to see that decisions are fed back). The rule reads what the decoder is fed call by call (the
decoding runs one token per call with the key/value cache), so the real decoding code has to find the
probe positions and tokens itself, feed its decisions, and tag exactly the words with ``d_i > margin``.
Finally, on an unpatched model, the cached decoding's logit differences equal those of one
teacher-forced pass over the tagged prompt it produced.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutput

from rahf import RAHF, RAHFConfig, RAHFScorer
from rahf.eval.predict import predict_batch
from rahf.lexicon import SYNTH_VOCABULARY
from rahf.model.decoding import _common_prefix, constrained_tag_flags, constrained_tagging, word_segments
from rahf.model.tokenizer import clean_decoded
from rahf.schema import clean_prompt, parse_tagged, split_words


def tiny(tokenizer: str) -> RAHFConfig:
    """A very small model (32 px images, one layer per stack, narrow heads) using ``tokenizer``: only the
    decoder's inputs matter here."""
    return RAHFConfig.preset("tiny", vision={"img_size": 32, "depth": 1, "embed_dim": 32, "num_heads": 2},
                             text={"d_model": 32, "d_kv": 8, "d_ff": 32, "num_heads": 4, "num_layers": 1,
                                   "num_decoder_layers": 1, "tokenizer": tokenizer},
                             heatmap_head={"stem_channels": [8], "up_channels": [8], "final_channels": 8},
                             score_head={"channels": [8], "mlp": [8]})


# per prompt: the logit difference the decoder will give each word (exact in float32)
CASES = {
    "a yellow cat on a red mat": [0.25, 0.75, -0.25, 0.5, 1.5, -3.0, 2.5],
    "two green triangles above a big star": [-0.75, 0.125, 0.5, 3.0, -0.5, 0.0, -2.0],
    "Zebra!! qux, cat": [1.25, -1.25, 0.625],  # words outside the vocabulary: several pieces each
    "star": [0.375],
}
MARGINS = [0.0, 0.5, -0.5, 1.0]


def sentencepiece_dir(tmp_path_factory) -> str:
    """A T5 (sentencepiece unigram) tokenizer built offline from a small vocabulary: synth words are one
    piece (``▁yellow``), anything else falls back to single characters, and ``yellow_0`` is three
    pieces ``▁yellow _ 0`` — the multi-piece tag of real T5 tokenizers."""
    from transformers import T5Tokenizer

    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_!?,.;:'\"-"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -2.0) for w in SYNTH_VOCABULARY] + [(c, -5.0) for c in chars]
    d = tmp_path_factory.mktemp("sp_tokenizer")
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(str(d))
    return str(d)


KINDS = ["words", "byt5", "sentencepiece"]


def build(kind: str, tmp_path_factory) -> RAHF:
    spec = sentencepiece_dir(tmp_path_factory) if kind == "sentencepiece" else kind
    torch.manual_seed(0)
    m = RAHF(tiny(spec)).eval()
    if kind == "sentencepiece":
        tok = m.tokenizer
        pieces = tok.convert_ids_to_tokens(tok(" yellow_0", add_special_tokens=False)["input_ids"])
        assert pieces == ["▁yellow", "_", "0"]
    return m


@pytest.fixture(scope="module", params=KINDS)
def model(request, tmp_path_factory):
    """A tiny model whose decoder gives word i of a CASES prompt the logit difference CASES[prompt][i]."""
    m = build(request.param, tmp_path_factory)
    force_tag_logits(m, lambda prompt, i, flags: CASES[prompt][i])
    return m


def force_tag_logits(model: RAHF, rule) -> None:
    """Replace the model's decoder logits as the module docstring says: ``rule(prompt, i, flags)`` is
    ``d_i`` for word i of the CASES prompt ``prompt``, given the tags ``flags`` of the words before it
    in the decoder's prefix."""
    tok = model.tokenizer
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    tag_first = [i for i, p in enumerate(pieces) if isinstance(p, str) and p.lstrip("▁#").startswith("_")]
    assert tag_first
    by_words = {tuple(split_words(clean_prompt(p))): p for p in CASES}
    real_forward = model.t5.forward
    rows: list[dict] = []  # per batch row: the tokens fed so far (without the start token), words scored

    def read(ids: list[int]) -> tuple[list[str], list[bool]]:
        """The words (and tags) of a decoder prefix."""
        return parse_tagged(clean_decoded(tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)))

    def forward(*args, **kw):
        res = real_forward(*args, **kw)
        dec_in = kw["decoder_input_ids"].cpu().tolist()
        first = kw.get("cache", kw.get("past_key_values")) is None
        if first:  # a new decoding: every row starts at the decoder start token
            rows[:] = [{"fed": [], "scored": set()} for _ in dec_in]
        logits = torch.zeros_like(res.logits)
        for b, ids in enumerate(dec_in):
            row = rows[b]
            for p, t in enumerate(ids):
                if not (first and p == 0):
                    row["fed"].append(t)
                words, flags = read(row["fed"])  # what the decoder has read when its logits at p are taken
                k = len(words)
                matches = [prompt for key, prompt in by_words.items() if k and list(key[:k]) == words]
                if matches and k - 1 not in row["scored"]:  # the first position that has read word k-1 whole
                    (prompt,) = matches
                    row["scored"].add(k - 1)
                    logits[b, p, tag_first] = rule(prompt, k - 1, flags[:k - 1])
        res.logits = logits
        return res

    model.t5.forward = forward


def forward_out(model, prompts):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in prompts]
    scorer = RAHFScorer(model, device="cpu")
    return scorer, scorer.forward(images, [clean_prompt(p) for p in prompts])


def test_each_word_is_tagged_iff_its_logit_difference_beats_the_margin(model):
    prompts = list(CASES)
    _, out = forward_out(model, prompts)
    for margin in MARGINS:
        res, margins = constrained_tag_flags(model, out, prompts, margin=margin, return_margins=True)
        for p, (words, flags), got in zip(prompts, res, margins):
            want = CASES[p]
            assert words == split_words(p)
            assert got == want, (p, got)  # the decision reads the decoder's tag − continue difference ...
            assert flags == [d > margin for d in want], (p, margin, flags)  # ... and tags strictly above the margin
    tagged = constrained_tagging(model, out, prompts, margin=0.5)
    for p, t in zip(prompts, tagged):
        words, flags = parse_tagged(t)
        assert words == split_words(p) and flags == [d > 0.5 for d in CASES[p]], t


def test_prompt_alone_gets_the_same_decisions_as_in_a_batch(model):
    """Padding a prompt inside a batch of longer ones does not move its probes."""
    prompts = list(CASES)
    _, out = forward_out(model, prompts)
    together = constrained_tag_flags(model, out, prompts, return_margins=True)[1]
    for j, p in enumerate(prompts):
        _, one = forward_out(model, [p])
        assert constrained_tag_flags(model, one, [p], return_margins=True)[1] == [together[j]]


def test_scorer_and_predict_report_the_decoded_words(model):
    """Through the one inference path (default decoding, margin 0): the misaligned words are known."""
    prompts = list(CASES)
    scorer = RAHFScorer(model, device="cpu")
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (40, 56, 3), dtype=np.uint8) for _ in prompts]
    results = scorer.score(images, prompts, batch_size=3)
    for p, r in zip(prompts, results):
        want = [w for w, d in zip(split_words(p), CASES[p]) if d > 0]
        assert r.misaligned_words == want, (p, r.tagged_prompt)
    batch = scorer.prepare([Image.fromarray(im) for im in images], [clean_prompt(p) for p in prompts])
    pred = predict_batch(model, batch)
    assert pred.tagged == [r.tagged_prompt for r in results]


@pytest.mark.parametrize("kind", KINDS)
def test_decisions_are_fed_back(kind, tmp_path_factory):
    """The decoder reads its own earlier tags: with a rule that tags a word iff the word before it is
    not tagged in the prefix, the words alternate tagged / untagged. (Deciding on an untagged prefix
    would tag every word.)"""
    m = build(kind, tmp_path_factory)
    force_tag_logits(m, lambda prompt, i, flags: 1.0 if i == 0 or not flags[i - 1] else -1.0)
    prompts = list(CASES)
    _, out = forward_out(m, prompts)
    for p, (words, flags) in zip(prompts, constrained_tag_flags(m, out, prompts)):
        assert flags == [i % 2 == 0 for i in range(len(words))], (p, flags)
    # a run of misaligned words, as in training targets ("red_0 car_0"): tag iff the word before is tagged
    force_tag_logits(m, lambda prompt, i, flags: 1.0 if i == 0 or flags[i - 1] else -1.0)
    for p, (words, flags) in zip(prompts, constrained_tag_flags(m, out, prompts)):
        assert all(flags), (p, flags)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_equals_a_teacher_forced_pass(kind, tmp_path_factory):
    """On an unpatched model, the decoding's logit differences (read step by step with the key/value
    cache) equal those of one teacher-forced pass over the tagged prompt it produced, read at each
    word's first position where its two continuations differ."""
    m = build(kind, tmp_path_factory)
    prompts = list(CASES)
    _, out = forward_out(m, prompts)
    res, margins = constrained_tag_flags(m, out, prompts, return_margins=True)
    all_flags = [f for _, flags in res for f in flags]
    assert any(all_flags) and not all(all_flags)  # both decisions occur, so tags are fed back
    tok = m.tokenizer
    for b, ((words, flags), got) in enumerate(zip(res, margins)):
        segments = word_segments(tok, words)
        target, probes = [], []
        for i, (plain, tagged) in enumerate(segments):
            cont = plain + [next((q[0] for q, _ in segments[i + 1:] if q), tok.eos_token_id)]
            c = _common_prefix(cont, tagged)
            probes.append((len(target) + c, tagged[c], cont[c]))
            target += tagged if flags[i] else plain
        dec_in = torch.tensor([[m.t5.config.decoder_start_token_id] + target])
        with torch.no_grad():
            logits = m.t5(encoder_outputs=BaseModelOutput(last_hidden_state=out.encoder_hidden[b:b + 1]),
                          attention_mask=out.encoder_mask[b:b + 1], decoder_input_ids=dec_in).logits[0]
        want = [float(logits[p, t] - logits[p, c]) for p, t, c in probes]
        assert got == pytest.approx(want, abs=1e-4), (prompts[b], got, want)
        assert flags == [d > 0 for d in got]


def test_other_decode_pairs_modes_and_prefers_the_word_head():
    from rahf.eval.predict import other_decode

    assert other_decode(None) is None and other_decode(None, word_head=True) is None
    assert other_decode("constrained") == "free" and other_decode("free") == "constrained"
    assert other_decode("word_head") == "constrained" and other_decode("word_head", word_head=True) == "constrained"
    assert other_decode("constrained", word_head=True) == other_decode("free", word_head=True) == "word_head"
