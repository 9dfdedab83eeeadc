"""``python -m rahf.cli`` = the ``rahf`` command."""

import sys

from . import main

sys.exit(main())
