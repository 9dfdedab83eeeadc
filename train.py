"""Train, evaluate and export a RAHF model: ``accelerate launch train.py [--config X.yaml] [key=value ...]``."""

import sys

from rahf.training.trainer import main

if __name__ == "__main__":
    sys.exit(main())
