"""Datasets: the on-disk format, the synth generator, the RichHF-18K converter, torch loading."""

from .format import (
    MAP_NAMES,
    SCORE_NAMES,
    SPLITS,
    DataError,
    Example,
    SplitWriter,
    clean_prompt,
    open_dataset,
    parse_tagged,
    split_words,
    tag_words,
)

__all__ = [
    "MAP_NAMES", "SCORE_NAMES", "SPLITS", "DataError", "Example", "SplitWriter", "clean_prompt",
    "open_dataset", "parse_tagged", "split_words", "tag_words",
]
