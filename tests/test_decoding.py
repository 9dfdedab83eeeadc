"""Constrained decoding's decision (rahf.model.decoding), word by word, for every tokenizer kind.

A tiny RAHF runs for real; only its T5's output logits are replaced by a table: after the untagged
prefix that ends exactly at word i, the first token of the tag (``_0`` for the word tokenizer, ``_``
for bytes and sentencepiece pieces) gets logit ``d_i`` and every other token 0, so the decoder's
logit difference tag − continue for word i is exactly ``d_i``. The real decoding code then has to
find the probe positions and tokens itself and tag exactly the words with ``d_i > margin``.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from rahf import RAHF, RAHFConfig, RAHFScorer
from rahf.eval.predict import predict_batch
from rahf.lexicon import SYNTH_VOCABULARY
from rahf.model.decoding import constrained_tag_flags, constrained_tagging
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


@pytest.fixture(scope="module", params=["words", "byt5", "sentencepiece"])
def model(request, tmp_path_factory):
    spec = sentencepiece_dir(tmp_path_factory) if request.param == "sentencepiece" else request.param
    torch.manual_seed(0)
    m = RAHF(tiny(spec)).eval()
    if request.param == "sentencepiece":
        tok = m.tokenizer
        pieces = tok.convert_ids_to_tokens(tok(" yellow_0", add_special_tokens=False)["input_ids"])
        assert pieces == ["▁yellow", "_", "0"]
    force_tag_logits(m, CASES)
    return m


def force_tag_logits(model: RAHF, cases: dict[str, list[float]]) -> None:
    """Replace the model's decoder logits by the table described in the module docstring."""
    tok = model.tokenizer
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    tag_first = [i for i, p in enumerate(pieces) if isinstance(p, str) and p.lstrip("▁#").startswith("_")]
    assert tag_first
    by_words = {tuple(split_words(clean_prompt(p))): d for p, d in cases.items()}
    real_forward = model.t5.forward

    def text(ids) -> tuple[str, ...]:
        return tuple(tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).split())

    @functools.lru_cache(maxsize=None)
    def boundaries(row: tuple[int, ...]) -> tuple[list[float], dict[int, int]]:
        """The prompt's margins, and {decoder position: index of the word whose last token it has just read}."""
        words = text(row)  # the whole untagged prompt (the decoder input is shifted right)
        ends: dict[int, int] = {}
        for p in range(len(row) + 1):
            seen = text(row[:p])  # what the decoder has read when predicting target position p
            if seen and seen == words[:len(seen)] and len(seen) - 1 not in ends.values():
                ends[p] = len(seen) - 1  # the first position that has read the whole word
        assert sorted(ends.values()) == list(range(len(words)))
        return by_words[words], ends

    def forward(*args, **kw):
        res = real_forward(*args, **kw)
        dec_in = kw["decoder_input_ids"].cpu()
        logits = torch.zeros_like(res.logits)
        for b in range(dec_in.shape[0]):
            margins, ends = boundaries(tuple(t for t in dec_in[b, 1:].tolist() if t != tok.pad_token_id))
            for p, i in ends.items():
                logits[b, p, tag_first] = margins[i]
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
