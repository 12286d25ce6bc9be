"""``sf-daq-broker demo``: the whole system on one machine, one command (SPEC §8).

The simulated buffers, the broker's HTTP API and one worker per registered source kind run on
one event loop in a background thread (``system``); the main thread plays the user — it sends a
retrieval request over HTTP, follows the run with progress bars, checks the files with the
consistency check users run, and prints a report (``report``). What is requested is planned
from the simulation's configuration and the worker kinds that exist (``plan``), so a source
whose worker is not written yet is left out, with a line saying so, instead of failing the run.
"""

# The default run (issue 7): kept here, light to import, because `sf-daq-broker --help` builds
# every sub-command's parser and should not pay for numpy and aiohttp.
DEFAULT_PULSES = 1000
#: 25 Hz beam: channels at 100, 50 and 25 Hz all have an event at every beam pulse, so the run
#: shows several rates and still passes the consistency check.
DEFAULT_RATE_MULTIPLICATOR = 4
DEFAULT_CHANNELS = 6
DEFAULT_CAMERAS = 1
DEFAULT_PVS = 3
#: A 1-module and a 4-module Jungfrau with pixel sensors (configs/geometry.toml: strip-sensor
#: detectors such as JF11T04 cannot be converted).
DEFAULT_DETECTORS = ("JF13T01V01", "JF06T04V02")
