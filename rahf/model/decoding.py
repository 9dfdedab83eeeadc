"""Constrained decoding of the tagged prompt: the output is always the prompt's own words, in order.

Free generation (``RAHF.generate_tagged``) may drop, repeat or invent words. Here the decoder only
decides, per prompt word, whether to append the misalignment tag ``_0``.

Method (one teacher-forced decoder pass, no autoregressive loop):

1. Each word ``w_i`` is tokenized twice, as its *plain* segment ``(" " if i else "") + w_i`` and
   as its *tagged* segment (the same + ``_0``), without special tokens. The untagged token
   sequence ``plain_1 + plain_2 + ... + plain_n + </s>`` is fed once through the T5 decoder
   (teacher forcing, batched over the batch), giving next-token logits at every position.
2. For word i the two branches are "tagged" (``tagged_i``) and "continue" (``plain_i`` followed
   by the first token of the next word, or ``</s>`` after the last word). At their first
   differing token position ``c`` the decoder's logits are compared: the word is tagged iff
   ``logit(tagged_i[c]) - logit(continue[c]) > margin`` (equivalently the log-probability,
   since both are read from the same softmax). For the built-in ``words`` tokenizer ``_0`` is
   one token and the position is the word boundary; for sentencepiece T5 the tag is several
   pieces (e.g. ``▁yellow _ 0``) and the branches are judged by their first differing piece
   (the rest of a started tag is near-deterministic for a trained model); if the tagged word
   tokenizes differently from plain word + suffix, the divergence point is found generally.
3. The tagged prompt is rebuilt from the words themselves: ``" ".join(w + "_0" if tagged else w)``.

Approximation: the decoder's context at word i is the *untagged* prefix (earlier tags are not
fed back). This keeps it to a single parallel pass (much faster than greedy generation, which
needs one decoder step per output token); a model trained on tagged targets sees a context that
differs from training only by the absence of earlier ``_0`` tokens.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from transformers.modeling_outputs import BaseModelOutput

from ..schema import TAG, clean_prompt, misaligned_words, split_words, tag_words  # noqa: F401

__all__ = ["constrained_tagging", "constrained_tag_flags", "word_segments"]


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


@torch.no_grad()
def constrained_tag_flags(model, out, prompts: Sequence[str], margin: float = 0.0,
                          return_margins: bool = False):
    """Per prompt: the words (the package's word split) and a misaligned flag per word (see module docstring).

    ``out`` is the model's forward output for the same batch (its ``encoder_hidden``/``encoder_mask``
    are the keyword task's encoder states). Returns a list of ``(words, flags)`` (and, with
    ``return_margins``, per-word logit differences tag − continue).
    """
    tok = model.tokenizer
    eos = tok.eos_token_id if tok.eos_token_id is not None else 1
    start = model.t5.config.decoder_start_token_id or 0
    pad = model.t5.config.pad_token_id or 0
    words_b = [split_words(clean_prompt(p)) for p in prompts]
    B = len(words_b)
    if out.encoder_hidden.shape[0] != B:
        raise ValueError(f"{B} prompts but encoder states for {out.encoder_hidden.shape[0]} examples")

    seqs: list[list[int]] = []  # untagged target tokens (without start, with eos)
    probes: list[list[tuple[int, int, int]]] = []  # per word: (position, tagged token, continue token)
    for words in words_b:
        segs = word_segments(tok, words)
        ids: list[int] = []
        bounds = []
        for plain, _ in segs:
            bounds.append(len(ids))
            ids.extend(plain)
        ids.append(eos)
        pw = []
        for i, (plain, tagged) in enumerate(segs):
            s = bounds[i]
            cont = ids[s:s + len(plain) + 1]  # plain word + the next token (next word's first, or eos)
            c = _common_prefix(cont, tagged)
            if c >= len(tagged) or c >= len(cont):  # degenerate (e.g. a word that is itself "_0"): never tag
                pw.append((-1, 0, 0))
                continue
            # the logits predicting target position s + c come from decoder input position s + c
            pw.append((s + c, tagged[c], cont[c]))
        seqs.append(ids)
        probes.append(pw)

    result_flags: list[list[bool]] = [[False] * len(w) for w in words_b]
    result_margins: list[list[float]] = [[float("-inf")] * len(w) for w in words_b]
    if any(p[0] >= 0 for pw in probes for p in pw):
        device = out.encoder_hidden.device
        T = max(len(s) for s in seqs)
        dec_in = torch.full((B, T), pad, dtype=torch.long)
        for b, s in enumerate(seqs):
            dec_in[b, 0] = start
            dec_in[b, 1:len(s)] = torch.tensor(s[:-1], dtype=torch.long)  # shifted right
        dec_in = dec_in.to(device)
        enc = out.encoder_hidden
        wdtype = model.t5.lm_head.weight.dtype
        if not torch.is_autocast_enabled(device.type) and enc.dtype != wdtype:
            enc = enc.to(wdtype)
        logits = model.t5(encoder_outputs=BaseModelOutput(last_hidden_state=enc), attention_mask=out.encoder_mask,
                          decoder_input_ids=dec_in).logits  # (B, T, V)
        bi, pos, t_tag, t_cont, slots = [], [], [], [], []
        for b, pw in enumerate(probes):
            for i, (p, a, c) in enumerate(pw):
                if p >= 0:
                    bi.append(b), pos.append(p), t_tag.append(a), t_cont.append(c), slots.append((b, i))
        bi_t = torch.tensor(bi, device=device)
        pos_t = torch.tensor(pos, device=device)
        lg = logits[bi_t, pos_t].float()  # (K, V)
        diff = (lg.gather(1, torch.tensor(t_tag, device=device)[:, None])
                - lg.gather(1, torch.tensor(t_cont, device=device)[:, None]))[:, 0].cpu().tolist()
        for (b, i), d in zip(slots, diff):
            result_margins[b][i] = float(d)
            result_flags[b][i] = d > margin
    res = list(zip(words_b, result_flags))
    return (res, result_margins) if return_margins else res


def constrained_tagging(model, out, prompts: Sequence[str], margin: float = 0.0) -> list[str]:
    """Tagged prompts (``"a yellow_0 cat"``) whose words are exactly each prompt's words, in order."""
    return [tag_words(words, flags) for words, flags in constrained_tag_flags(model, out, prompts, margin=margin)]
