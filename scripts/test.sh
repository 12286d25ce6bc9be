#!/usr/bin/env bash
# The test command: installs what is missing, makes sure RabbitMQ runs (and Chromium is there
# for the browser tests), then runs pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/unit -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/ensure-rabbitmq.sh
scripts/ensure-chromium.sh
exec .venv/bin/python -m pytest "$@"
