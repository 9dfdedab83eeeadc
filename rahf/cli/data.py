"""``rahf data synth``, ``rahf data validate`` and ``rahf data convert-richhf``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..schema import SPLITS, DataError


def cmd_synth(args: argparse.Namespace) -> int:
    from ..data.synth import generate

    res = generate(args.out, train=args.train, dev=args.dev, test=args.test, size=args.size, seed=args.seed,
                   workers=args.workers)
    for split, st in res["stats"].items():
        print(f"{split}: {st['records']} records, empty maps: implausibility {st['empty_implausibility']:.0%}, "
              f"misalignment {st['empty_misalignment']:.0%}; score means {json.dumps(st['score_mean'])}")
    total = sum(res["splits"].values())
    print(f"wrote {total} records to {res['out']} in {res['seconds']:.1f} s ({res['rate']:.1f} records/s)")
    return 0


def add_token_arguments(p: argparse.ArgumentParser, intro: str = "") -> None:
    p.add_argument("--config", metavar="YAML",
                   help=intro + "Training config whose model.text settings (tokenizer, max_prompt_tokens, "
                        "max_target_tokens, encoder_prompt) token lengths are measured against (default: "
                        "configs/default.yaml, as training)")
    p.add_argument("--tokenizer", metavar="SPEC",
                   help="count tokens of this tokenizer instead of the config's: words, byt5, or a T5 tokenizer "
                        "directory / hub name")


class TokenSettings:
    """The tokenizer, limits and encoder prompt that ``--config`` / ``--tokenizer`` name."""

    def __init__(self, args: argparse.Namespace):
        from ..training.config import default_config_path, resolve_config

        from ..configtools import ConfigError

        config = args.config or (str(default_config_path()) if default_config_path() else None)
        try:
            text = resolve_config(config).model.text
        except (ConfigError, OSError) as e:
            raise DataError(None, str(e), config or "--config") from None
        self.spec = args.tokenizer or text.tokenizer
        self.max_prompt_tokens, self.max_target_tokens = text.max_prompt_tokens, text.max_target_tokens
        self.encoder = text.encoder_prompt
        self.source = f"model.text of {config or 'the defaults'}" + (", tokenizer from --tokenizer" if args.tokenizer else "")
        from ..model.tokenizer import load_tokenizer

        try:
            self.tokenizer = load_tokenizer(self.spec)
        except (OSError, ValueError, ImportError) as e:
            raise DataError(None, f"cannot load tokenizer {self.spec!r} ({e.__class__.__name__}); give --tokenizer: a local "
                                  f"T5 tokenizer directory, words or byt5", "--tokenizer") from None

    def header(self) -> str:
        return (f"token lengths in tokenizer {self.spec!r} ({self.source}); the encoder reads the "
                f"{'prompt as written' if self.encoder == 'original' else 'clean prompt'}")


def cmd_validate(args: argparse.Namespace) -> int:
    """Every problem, one line each; with ``--config`` / ``--tokenizer`` also the token lengths per split
    (percentiles, and how many texts the config's limits cut); then the summary line."""
    from ..data.tokens import truncation_lines
    from ..data.validate import token_lengths, validate_dataset

    tokens = None
    if args.config or args.tokenizer:
        try:
            tokens = TokenSettings(args)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    report = validate_dataset(args.root, splits=args.split or None)
    for p in report.problems:
        print(p)
    lengths = tokens and token_lengths(args.root, tokens.tokenizer, args.split or None,
                                       max_prompt_tokens=tokens.max_prompt_tokens,
                                       max_target_tokens=tokens.max_target_tokens, encoder=tokens.encoder)
    if lengths:
        print(tokens.header())
        for split, info in lengths.items():
            for line in truncation_lines(split, info):
                print(line)
    print(report.summary(), file=sys.stdout)
    return 0 if report.ok else 1


def add_synth_arguments(p: argparse.ArgumentParser) -> None:
    from ..data.synth import SYNTH_DEFAULTS as d

    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--train", type=int, default=d.train, help=f"train records (default {d.train})")
    p.add_argument("--dev", type=int, default=d.dev, help=f"dev records (default {d.dev})")
    p.add_argument("--test", type=int, default=d.test, help=f"test records (default {d.test})")
    p.add_argument("--size", type=int, default=d.size, help=f"image side in pixels (default {d.size})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    p.add_argument("--workers", type=int, default=None, help="processes (default min(4, CPUs)); output does not depend on it")


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tfrecords", required=True, metavar="DIR",
                   help="directory with train.tfrecord, dev.tfrecord, test.tfrecord (RichHF-18K labels)")
    p.add_argument("--images", required=True, metavar="SOURCE",
                   help="Pick-a-Pic v1 parquet directory, or a folder of <uid>.<jpg|jpeg|png|webp> images "
                        "with captions.jsonl / captions.csv / captions.tsv (columns uid, caption)")
    p.add_argument("--out", required=True, metavar="DIR", help="output dataset directory")
    p.add_argument("--captions", metavar="FILE", default=None,
                   help="captions file for a folder SOURCE (default: SOURCE/captions.{jsonl,csv,tsv})")
    p.add_argument("--strict", action="store_true", help="fail (exit 1) instead of skipping any record")
    p.add_argument("--heatmap-size", type=int, default=None, metavar="PX",
                   help="resize heatmaps to PX×PX (default: keep their original size, 512×512)")
    p.add_argument("--clip-scores", action="store_true",
                   help="clip scores outside [0, 1] into range instead of skipping the record")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes for image decode-checks and heatmap re-encoding (default 1)")
    p.add_argument("--splits", default=",".join(SPLITS), help="comma-separated splits to convert (default: all three)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_token_arguments(p)


def cmd_convert_richhf(args: argparse.Namespace) -> int:
    from ..data.richhf import REPORT_NAME, convert_richhf, summary_lines

    def log(msg):
        print(msg, file=sys.stderr)

    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        log(f"error: unknown split(s) {bad}; choose from {list(SPLITS)}")
        return 2
    if args.heatmap_size is not None and args.heatmap_size <= 0:
        log("error: --heatmap-size must be a positive number of pixels")
        return 2
    if args.workers < 1:
        log("error: --workers must be at least 1")
        return 2
    try:
        tokens = TokenSettings(args)
    except DataError as e:
        log(f"error: {e}")
        return 2
    try:
        report = convert_richhf(args.tfrecords, args.images, args.out, strict=args.strict,
                                heatmap_size=args.heatmap_size, workers=args.workers,
                                clip_scores=args.clip_scores, captions=args.captions, splits=splits,
                                progress=not args.quiet, log=log, tokenizer=tokens.tokenizer,
                                token_limits=(tokens.max_prompt_tokens, tokens.max_target_tokens),
                                encoder_prompt=tokens.encoder, tokenizer_name=tokens.spec)
    except DataError as e:
        log(f"error: {e}")
        return 1
    for line in summary_lines(report):
        print(line)
    print(f"wrote {report['kept']} of {report['total']} records to {args.out} "
          f"(report: {Path(args.out) / REPORT_NAME})")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("synth", help="generate the synthetic dataset with exact rich-feedback labels")
    add_synth_arguments(p)
    p.set_defaults(func=cmd_synth)
    v = subparsers.add_parser("validate", help="check every record of a dataset directory")
    v.add_argument("root", metavar="DIR", help="dataset directory")
    v.add_argument("--split", action="append", help="split to check (repeatable; default: all present)")
    add_token_arguments(v, "with either, also report token lengths: percentiles of the prompts (as the encoder "
                           "reads them) and of the tagged prompts, and how many the limits cut. ")
    v.set_defaults(func=cmd_validate)
    c = subparsers.add_parser("convert-richhf", help="convert RichHF-18K TFRecords + Pick-a-Pic images",
                              description="Convert RichHF-18K (TFRecord labels) and Pick-a-Pic v1 images to the "
                                          "package's dataset format; every record is accounted for in the report.")
    add_convert_arguments(c)
    c.set_defaults(func=cmd_convert_richhf)


def convert_richhf_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="convert_richhf", description="Convert RichHF-18K to the rahf dataset format")
    add_convert_arguments(p)
    return cmd_convert_richhf(p.parse_args(argv))
