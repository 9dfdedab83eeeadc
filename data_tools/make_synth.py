"""Generate the synthetic dataset; same as ``rahf data synth``.

    python data_tools/make_synth.py --out data/synth --train 3000 --dev 200 --test 300 --size 128 --seed 0
"""

import argparse
import sys

from rahf.cli.data import add_synth_arguments, cmd_synth


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_synth_arguments(parser)
    return cmd_synth(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
