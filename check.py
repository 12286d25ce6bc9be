"""`python check.py -r run_NNNNNN.json`, as users have always run it (code: sf_daq_broker.tools)."""

import sys

from sf_daq_broker.tools.check import main

if __name__ == "__main__":
    sys.exit(main())
