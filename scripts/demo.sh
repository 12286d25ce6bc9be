#!/usr/bin/env bash
# The README's first command: set up .venv on a fresh machine (Python 3.11), then run the whole
# system once — simulated buffers, broker, one worker per source, no RabbitMQ — retrieve a run,
# check it and print the report. Extra arguments go to `sf-daq-broker demo`
# (e.g. scripts/demo.sh --pulses 200 --keep; scripts/demo.sh --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/sf-daq-broker demo "$@"
