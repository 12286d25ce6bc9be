"""sf-daq-broker: retrieve-based data acquisition for a pulsed X-ray free-electron laser."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sf-daq-broker")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
