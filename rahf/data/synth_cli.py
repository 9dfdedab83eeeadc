"""``rahf data synth`` and ``rahf data validate``."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_synth(args: argparse.Namespace) -> int:
    from .synth import generate

    res = generate(args.out, train=args.train, dev=args.dev, test=args.test, size=args.size, seed=args.seed,
                   workers=args.workers)
    for split, st in res["stats"].items():
        print(f"{split}: {st['records']} records, empty maps: implausibility {st['empty_implausibility']:.0%}, "
              f"misalignment {st['empty_misalignment']:.0%}; score means {json.dumps(st['score_mean'])}")
    total = sum(res["splits"].values())
    print(f"wrote {total} records to {res['out']} in {res['seconds']:.1f} s ({res['rate']:.1f} records/s)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .validate import validate_dataset

    report = validate_dataset(args.root, splits=args.split or None)
    for p in report.problems:
        print(p)
    print(report.summary(), file=sys.stdout)
    return 0 if report.ok else 1


def add_synth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--train", type=int, default=2000, help="train records (default 2000)")
    p.add_argument("--dev", type=int, default=200, help="dev records (default 200)")
    p.add_argument("--test", type=int, default=200, help="test records (default 200)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=None, help="processes (default min(4, CPUs)); output does not depend on it")


def register(subparsers) -> None:
    p = subparsers.add_parser("synth", help="generate the synthetic dataset with exact rich-feedback labels")
    add_synth_arguments(p)
    p.set_defaults(func=cmd_synth)
    v = subparsers.add_parser("validate", help="check every record of a dataset directory")
    v.add_argument("root", metavar="DIR", help="dataset directory")
    v.add_argument("--split", action="append", help="split to check (repeatable; default: all present)")
    v.set_defaults(func=cmd_validate)
