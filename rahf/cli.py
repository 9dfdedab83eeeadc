"""The ``rahf`` console script. Each command group lives in its own module with a ``register`` function."""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, function) pairs that add subcommands under ``rahf data``.
DATA_COMMANDS = [
    ("rahf.data.synth_cli", "register"),
    ("rahf.data.richhf", "register"),
]
# (module, function) pairs that add top-level subcommands (train, eval, predict, ...).
TOP_COMMANDS: list[tuple[str, str]] = [
    ("rahf.training.cli", "register"),  # train, eval
    ("rahf.predict_cli", "register"),  # predict, select, mask
    ("rahf.beyond_cli", "register"),  # cbm, textnorm, ensemble
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rahf", description="Rich Automatic Human Feedback for text-to-image models")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    data = sub.add_parser("data", help="generate, convert and validate datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    for groups, target in ((DATA_COMMANDS, data_sub), (TOP_COMMANDS, sub)):
        for mod, fn in groups:
            try:
                module = importlib.import_module(mod)
            except ModuleNotFoundError as e:
                if e.name == mod:  # command module not present in this build
                    continue
                raise
            getattr(module, fn)(target)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    rc = func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
