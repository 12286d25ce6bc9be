"""Start/stop data taking through the broker, as the facility's ``client_example.py`` did.

From the command line (the broker from ``--broker``, else ``$SF_DAQ_BROKER``)::

    python examples/client_example.py --pulses 200 --rate-multiplicator 2

or in ipython, as the facility's users do::

    In [1]: import client_example as client
    In [2]: daq = client.BrokerClient(pgroup="p12345")
    In [3]: daq.configure(output_directory="test/daq", channels_file="channel_list",
       ...:               rate_multiplicator=2, detectors_file="jf_jf13.json")
    In [4]: daq.run(1000)

``run`` takes the current pulse id from the broker, waits for the pulses and then asks the
broker for them; Ctrl-C in the middle asks whether to keep what was taken so far.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sf_daq_broker.tools.client import BrokerClient

HERE = Path(__file__).resolve().parent

__all__ = ["BrokerClient", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="take one run with the start/stop client")
    parser.add_argument("--pgroup", default="p12345")
    parser.add_argument("--broker", help="default: $SF_DAQ_BROKER, else http://localhost:10002")
    parser.add_argument("--pulses", type=int, default=100, help="beam pulses (default 100)")
    parser.add_argument("--rate-multiplicator", type=int, default=1)
    parser.add_argument("--output-directory", default="client_example")
    parser.add_argument("--no-detector", action="store_true", help="leave jf_jf13.json out")
    args = parser.parse_args(argv)

    daq = BrokerClient(args.pgroup, broker=args.broker)
    daq.configure(
        output_directory=args.output_directory,
        channels_file=HERE / "channel_list",
        epics_file=HERE / "epics_list",
        detectors_file=None if args.no_detector else HERE / "jf_jf13.json",
        rate_multiplicator=args.rate_multiplicator,
    )
    run = daq.run(args.pulses, wait=True)  # returns once the files are written
    if run is None or daq.last_result is None:
        return 1
    return daq.last_result.exit_status


if __name__ == "__main__":
    sys.exit(main())
