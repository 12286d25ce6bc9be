"""``python daq_client.py -h``, as users have run it for years; the code is in sf_daq_broker."""

import sys

from sf_daq_broker.tools.daq_client import main

if __name__ == "__main__":
    sys.exit(main())
