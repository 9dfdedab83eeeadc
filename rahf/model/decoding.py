"""Constrained decoding of the tagged prompt: the output is always the prompt's own words, in order.

Free generation (``RAHF.generate_tagged``) may drop, repeat or invent words. Here the decoder only
decides, per prompt word, whether to append the misalignment tag ``_0`` — and, as in training, it
reads its own earlier decisions: the prefix it continues from is the tagged prompt decided so far
(``a red_0 car_0 ...``), so runs of misaligned words are judged the way the decoder learned them.

Method (greedy over the two continuations of each word, one decoder step per output token):

1. Each word ``w_i`` is tokenized twice, as its *plain* segment ``(" " if i else "") + w_i`` and as
   its *tagged* segment (the same + ``_0``), without special tokens.
2. For word i the two branches are "tagged" (``tagged_i``) and "continue" (``plain_i`` followed by
   the first token of the next word, or ``</s>`` after the last word). Their shared first tokens are
   fed; at the first differing token position ``c`` the decoder's logits are compared: the word is
   tagged iff ``logit(tagged_i[c]) - logit(continue[c]) > margin`` (equivalently the log-probability,
   since both are read from the same softmax). For the built-in ``words`` tokenizer ``_0`` is one
   token and the position is the word boundary; for sentencepiece T5 the tag is several pieces (e.g.
   ``▁yellow _ 0``) and the branches are judged by their first differing piece (the rest of a
   started tag is near-deterministic for a trained model); if the tagged word tokenizes differently
   from plain word + suffix, the divergence point is found generally. A word whose two branches do
   not diverge (e.g. a word that is itself ``_0``) is never tagged.
3. The chosen branch's remaining tokens are fed (the whole ``_0`` when tagged), and the next word is
   decided after them.
4. The tagged prompt is rebuilt from the words themselves: ``" ".join(w + "_0" if tagged else w)``.

The decoder runs one token per step for the whole batch with its key/value cache (T5's
``past_key_values``), so each step costs one token's attention over the cached prefix; every
sequence advances one token per step (no padding inside a sequence, so a prompt gets the same
decisions alone as in a batch), and the loop stops at the batch's last decision. The cost is that of
greedy generation of the tagged prompt, without its length risk (the output has the prompt's words).

A model trained with a word head (``model.word_head``) can also tag without the decoder:
:func:`word_head_tagging` tags each word whose word-head probability is above a threshold (the
``word_head`` decoding of :mod:`rahf.eval.predict`).
"""

from __future__ import annotations

import inspect
from typing import Optional, Sequence

import torch
from transformers.modeling_outputs import BaseModelOutput

from ..schema import TAG, clean_prompt, misaligned_words, split_words, tag_words  # noqa: F401

__all__ = ["constrained_tagging", "constrained_tag_flags", "word_head_tag_flags", "word_head_tagging", "word_segments",
           "WORD_HEAD_THRESHOLD"]

#: A word is tagged by the word head when its probability (the highest over its tokens) is above this.
WORD_HEAD_THRESHOLD = 0.5


def word_segments(tokenizer, words: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """Per word: (plain token ids, tagged token ids), each of ``(" " if i else "") + word [+ _0]``."""
    texts = [(" " if i else "") + w for i, w in enumerate(words)]
    if not texts:
        return []
    plain = tokenizer(texts, add_special_tokens=False)["input_ids"]
    tagged = tokenizer([t + TAG for t in texts], add_special_tokens=False)["input_ids"]
    return list(zip(plain, tagged))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _cache_name(t5) -> str:
    """The name of T5's key/value cache, as a forward argument and an output field: ``cache``
    (transformers 5) or ``past_key_values`` (earlier)."""
    return "cache" if "cache" in inspect.signature(type(t5).forward).parameters else "past_key_values"


class _Prompt:
    """One prompt's decoding state: the target tokens decided so far and the next decision.

    ``target`` holds the tokens the decoder will be fed (without the start token); ``probe`` is the
    pending decision ``(position, tag token, continue token, c)``: the logits predicting target
    position ``position`` decide word ``i``, whose two branches share their first ``c`` tokens (already
    in ``target``). ``probe`` is None once every word is decided."""

    def __init__(self, segments: list[tuple[list[int], list[int]]], eos: int):
        self.segments, self.eos = segments, eos
        n = len(segments)
        self.flags, self.margins = [False] * n, [float("-inf")] * n
        self.target: list[int] = []
        self.i = 0
        self.probe: Optional[tuple[int, int, int, int]] = None
        self._advance()

    def _next_first(self, i: int) -> int:
        """The first token after word i in the untagged continuation: the next word's, or eos."""
        for plain, _ in self.segments[i + 1:]:
            if plain:
                return plain[0]
        return self.eos

    def _advance(self) -> None:
        """Move to the next word that needs a decision, feeding what precedes it."""
        while self.i < len(self.segments):
            plain, tagged = self.segments[self.i]
            cont = plain + [self._next_first(self.i)]
            c = _common_prefix(cont, tagged)
            if c < len(tagged) and c < len(cont):
                self.target += tagged[:c]
                self.probe = (len(self.target), tagged[c], cont[c], c)
                return
            self.target += plain  # the branches do not diverge: never tagged
            self.i += 1
        self.target.append(self.eos)
        self.probe = None

    def decide(self, diff: float, margin: float) -> None:
        """Word i's logit difference tag − continue: tag it iff above ``margin``, feed the chosen branch."""
        plain, tagged = self.segments[self.i]
        c = self.probe[3]
        tag = diff > margin
        self.flags[self.i], self.margins[self.i] = tag, diff
        self.target += tagged[c:] if tag else plain[c:]
        self.i += 1
        self._advance()


@torch.no_grad()
def constrained_tag_flags(model, out, prompts: Sequence[str], margin: float = 0.0,
                          return_margins: bool = False):
    """Per prompt: the words (the package's word split) and a misaligned flag per word (see module docstring).

    ``out`` is the model's forward output for the same batch (its ``encoder_hidden``/``encoder_mask``
    are the keyword task's encoder states). Returns a list of ``(words, flags)`` (and, with
    ``return_margins``, per-word logit differences tag − continue; ``-inf`` for a word never tagged
    because its branches do not diverge).
    """
    tok = model.tokenizer
    eos = tok.eos_token_id if tok.eos_token_id is not None else 1
    start = model.t5.config.decoder_start_token_id or 0
    pad = model.t5.config.pad_token_id or 0
    words_b = [split_words(clean_prompt(p)) for p in prompts]
    B = len(words_b)
    if out.encoder_hidden.shape[0] != B:
        raise ValueError(f"{B} prompts but encoder states for {out.encoder_hidden.shape[0]} examples")
    rows = [_Prompt(word_segments(tok, words), eos) for words in words_b]

    if any(r.probe is not None for r in rows):
        device = out.encoder_hidden.device
        enc = out.encoder_hidden
        wdtype = model.t5.lm_head.weight.dtype
        if not torch.is_autocast_enabled(device.type) and enc.dtype != wdtype:
            enc = enc.to(wdtype)
        encoder_outputs = BaseModelOutput(last_hidden_state=enc)
        feed = torch.full((B, 1), start, dtype=torch.long, device=device)
        cache_name, past = _cache_name(model.t5), None
        step = 0  # the decoder input position being fed; its logits predict target position `step`
        while any(r.probe is not None for r in rows):
            res = model.t5(encoder_outputs=encoder_outputs, attention_mask=out.encoder_mask, decoder_input_ids=feed,
                           use_cache=True, **{cache_name: past})
            past = getattr(res, cache_name)
            due = [b for b, r in enumerate(rows) if r.probe is not None and r.probe[0] == step]
            if due:
                lg = res.logits[:, -1].float()
                tags = torch.tensor([rows[b].probe[1] for b in due], device=device)
                conts = torch.tensor([rows[b].probe[2] for b in due], device=device)
                idx = torch.tensor(due, device=device)
                diffs = (lg[idx, tags] - lg[idx, conts]).cpu().tolist()
                for b, d in zip(due, diffs):
                    rows[b].decide(d, margin)
                    # a next word whose branches differ at its first token is decided by the same logits
                    while rows[b].probe is not None and rows[b].probe[0] == step:
                        p = rows[b].probe
                        rows[b].decide(float(lg[b, p[1]] - lg[b, p[2]]), margin)
            feed = torch.tensor([[r.target[step] if step < len(r.target) else pad] for r in rows],
                                dtype=torch.long, device=device)
            step += 1
    res_ = [(words, r.flags) for words, r in zip(words_b, rows)]
    return (res_, [r.margins for r in rows]) if return_margins else res_


def constrained_tagging(model, out, prompts: Sequence[str], margin: float = 0.0) -> list[str]:
    """Tagged prompts (``"a yellow_0 cat"``) whose words are exactly each prompt's words, in order."""
    return [tag_words(words, flags) for words, flags in constrained_tag_flags(model, out, prompts, margin=margin)]


@torch.no_grad()
def word_head_tag_flags(model, out, prompts: Sequence[str], threshold: float = WORD_HEAD_THRESHOLD,
                        return_probs: bool = False):
    """Per prompt: the words (the package's word split) and a misaligned flag per word read off the word
    head (``model.word_head``) instead of the decoder.

    The word head scores each prompt token of the fused encoder (``out.word_logits``); a word's
    probability is the highest sigmoid over its tokens, and the word is tagged when it is above
    ``threshold``. Words past the encoder's token limit have no score and are not tagged (probability
    0). The prompts are tokenized as the collator tokenizes the clean prompt (which a word-head model
    reads: it is trained with ``encoder_prompt=clean``). Returns ``(words, flags)`` per prompt (and,
    with ``return_probs``, the per-word probabilities).
    """
    if getattr(out, "word_logits", None) is None:
        raise ValueError("decode 'word_head' needs a model with a word head (model.word_head=true)")
    tok = model.tokenizer
    if not getattr(tok, "is_fast", False):
        raise ValueError("decode 'word_head' needs a fast tokenizer (token-to-word indices)")
    texts = [clean_prompt(p) for p in prompts]
    words_b = [split_words(t) for t in texts]
    if out.word_logits.shape[0] != len(texts):
        raise ValueError(f"{len(texts)} prompts but word logits for {out.word_logits.shape[0]} examples")
    enc = tok(texts, truncation=True, max_length=model.config.text.max_prompt_tokens)
    probs = torch.sigmoid(out.word_logits.float()).cpu()
    L = probs.shape[1]
    res, all_probs = [], []
    for i, words in enumerate(words_b):
        best = [0.0] * len(words)
        for j, w in enumerate(enc.word_ids(i)):
            if w is not None and w < len(words) and j < L:
                best[w] = max(best[w], float(probs[i, j]))
        res.append((words, [p > threshold for p in best]))
        all_probs.append(best)
    return (res, all_probs) if return_probs else res


def word_head_tagging(model, out, prompts: Sequence[str], threshold: float = WORD_HEAD_THRESHOLD) -> list[str]:
    """Tagged prompts from the word head (:func:`word_head_tag_flags`), the prompt's own words in order."""
    return [tag_words(words, flags) for words, flags in word_head_tag_flags(model, out, prompts, threshold)]
