"""The ``rahf`` console script.

One package, one module per command group, imported plainly (a broken command module is an error,
never a silently missing command). Heavy libraries (torch, transformers, accelerate) are imported
inside the command functions, so ``rahf --help`` and ``rahf data ...`` start fast.

=====================  ================================================================
module                 commands
=====================  ================================================================
``rahf.cli.data``      ``data synth``, ``data validate``, ``data convert-richhf``
``rahf.cli.train``     ``train``, ``eval``
``rahf.cli.predict``   ``predict``, ``select``, ``mask``
``rahf.cli.reward``    ``cbm``, ``textnorm``, ``ensemble``
``rahf.cli.hub``       ``push``
``rahf.cli.serve``     ``serve``
=====================  ================================================================
"""

from __future__ import annotations

import argparse
import sys

from .._extras import MissingExtra
from . import data, hub, predict, reward, serve, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rahf", description="Rich Automatic Human Feedback for text-to-image models")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    data_parser = sub.add_parser("data", help="generate, convert and validate datasets")
    data.register(data_parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND"))
    for module in (train, predict, reward, hub, serve):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        rc = func(args)
    except MissingExtra as e:  # an optional library the command needs: one line naming the pip install
        print(f"error: {e}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
