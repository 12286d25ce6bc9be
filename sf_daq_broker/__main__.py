"""`python -m sf_daq_broker` is the same as the `sf-daq-broker` command."""

import sys

from sf_daq_broker.cli import main

sys.exit(main())
