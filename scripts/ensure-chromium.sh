#!/usr/bin/env bash
# Make sure Debian's Chromium is installed for the browser tests (tests/web/test_browser.py):
# Playwright drives /usr/bin/chromium and never downloads a browser of its own. Installed from
# Debian's packages when SF_DAQ_REQUIRE_BROWSER is set (CI); quick when it is already there.
set -euo pipefail
[ -x /usr/bin/chromium ] && exit 0
if [ -z "${SF_DAQ_REQUIRE_BROWSER:-}" ]; then
  echo "Chromium is not installed (apt-get install chromium): the browser tests will be skipped" >&2
  exit 0
fi
echo "installing Chromium for the browser tests" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq chromium >/dev/null 2>&1 \
  || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }
