"""Tokenizers.

``text.tokenizer`` in the model config selects one:

* ``"words"`` (the embedded default): a WordPiece tokenizer built in memory from the synth dataset's
  closed vocabulary plus every printable ASCII character (with ``##`` continuation pieces), so any
  ASCII prompt is tokenized without unknowns and synth prompts cost one token per word. ``_0`` (the
  misalignment tag) is its own token. Needs no downloaded file; saved as ``tokenizer.json`` with a
  checkpoint so the exact vocabulary travels with the weights.
* ``"byt5"``: transformers' ByT5 byte tokenizer (no file needed; long sequences).
* anything else: a local directory or hub name of a T5 (sentencepiece) tokenizer, e.g. ``t5-base``.
  Hub names resolve only when online; with ``HF_HUB_OFFLINE=1`` use a local directory.

All tokenizers follow T5's conventions: pad id 0 (also the decoder start token), eos id 1, unk id 2,
and an eos appended to each encoded sequence.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..schema import TAG

SPECIAL = ["<pad>", "</s>", "<unk>"]
_TAG_SPACE = re.compile(r"\s+" + re.escape(TAG) + r"(?=\s|$)")


def _base_words() -> list[str]:
    try:
        from ..lexicon import SYNTH_VOCABULARY
    except ImportError:  # pragma: no cover - the generator ships with the package
        SYNTH_VOCABULARY = []
    return list(SYNTH_VOCABULARY)


def build_word_tokenizer(extra_words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """The built-in word-level tokenizer (see module docstring). Deterministic: same vocab every call."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab: dict[str, int] = {}
    for tok in SPECIAL + [TAG]:
        vocab.setdefault(tok, len(vocab))
    chars = [c for c in string.printable if not c.isspace()]
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault("##" + c, len(vocab))
    for w in sorted(set(_base_words()) | set(extra_words or [])):
        if w and not any(ch.isspace() for ch in w):
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>", continuing_subword_prefix="##",
                                      max_input_chars_per_word=200))
    tok.normalizer = normalizers.NFKC()
    # "_0" is split off as its own piece; then words split on whitespace (unknown words fall back
    # to character pieces, so decoding restores them exactly).
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(TAG, behavior="isolated"),
        pre_tokenizers.WhitespaceSplit(),
    ])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.model_max_length = 4096
    return fast


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """Build or load the tokenizer named by ``spec`` (see module docstring)."""
    if spec == "words":
        return build_word_tokenizer()
    if spec == "byt5":
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    path = Path(spec)
    if path.exists():
        return AutoTokenizer.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(spec)


def clean_decoded(text: str) -> str:
    """Normalise decoded text to the tagged-prompt form: single spaces, ``word_0`` glued."""
    text = " ".join(text.replace("<pad>", " ").replace("</s>", " ").split())
    return _TAG_SPACE.sub(TAG, text)


def decode_tagged(tokenizer: PreTrainedTokenizerBase, ids) -> list[str]:
    """Decode generated ids (B, L) to tagged prompts (``"a yellow_0 cat"``)."""
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return [clean_decoded(t) for t in texts]
