#!/usr/bin/env python
"""Convert RichHF-18K to the rahf dataset format (same as ``rahf data convert-richhf``).

    python data_tools/convert_richhf.py --tfrecords richhf-18k/ --images pickapic_v1/data/ --out data/richhf18k
"""

import sys

from rahf.cli.data import convert_richhf_main as main

if __name__ == "__main__":
    sys.exit(main())
