"""``python -m rahf`` = the ``rahf`` command."""

import sys

from .cli import main

sys.exit(main())
