#!/usr/bin/env bash
# Build the wheel, install it into a fresh virtual environment outside the checkout and run a
# short `sf-daq-broker demo` from there: proves that a non-editable install runs (its default
# configuration comes from inside the package). CI runs it (.ci/run); extra arguments go to
# the demo. SF_DAQ_WHEEL_DEPS=link takes the dependencies from .venv instead of the package
# registry (the test suite does that: no network, a few seconds instead of minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/sf-daq-wheel-XXXXXX")
trap 'rm -rf "$work"' EXIT
# Build from a copy of the checkout's files: a stale build/ in the checkout cannot leak into
# the wheel, and nothing is written into the checkout.
mkdir "$work/src"
git ls-files --cached --others --exclude-standard -z | tar --null -T - -c | tar -x -C "$work/src"
isolation=()
[ "${SF_DAQ_WHEEL_DEPS:-}" = link ] && isolation=(--no-build-isolation)  # .venv's setuptools
.venv/bin/python -m pip wheel --quiet --no-deps "${isolation[@]}" --wheel-dir "$work/dist" "$work/src"
"$PYTHON" -m venv "$work/venv"
if [ "${SF_DAQ_WHEEL_DEPS:-}" = link ]; then
  # The dependencies as a plain path: the checkout's editable sf_daq_broker in .venv is not
  # importable that way (its finder is started by a .pth file, which only site dirs run).
  purelib=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  .venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))' >"$purelib/sf-daq-deps.pth"
  "$work/venv/bin/python" -m pip install --quiet --no-deps --no-index "$work"/dist/*.whl
else
  "$work/venv/bin/python" -m pip install --quiet "$work"/dist/*.whl
fi
cd "$work"
"$work/venv/bin/python" - <<'PY'
import sys
import sf_daq_broker
from sf_daq_broker.config import DEFAULT_CONFIG
for what, path in (("sf_daq_broker", sf_daq_broker.__file__), ("its configuration", DEFAULT_CONFIG)):
    assert str(path).startswith(sys.prefix), f"{what} comes from {path}, not from the wheel"
print(f"installed wheel: {sf_daq_broker.__file__}, configuration {DEFAULT_CONFIG}")
PY
"$work/venv/bin/sf-daq-broker" demo --pulses 40 "$@"
