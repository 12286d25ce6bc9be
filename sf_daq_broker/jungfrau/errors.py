"""Errors of the Jungfrau conversion, each with a one-line message a person can act on.

They all derive from ``ConversionError`` so a caller (the ``convert`` command, the detector
worker) can catch one type, print the message and fail the job without a traceback: none of
them can be cured by retrying.
"""

from __future__ import annotations


class ConversionError(Exception):
    """The conversion cannot be done as asked; the message says what to fix."""


class CalibrationError(ConversionError):
    """A gain or pedestal file is missing, unreadable or has the wrong shape or dtype."""


class DetectorError(ConversionError):
    """The detector name, its geometry entry or its sensor type does not allow the conversion."""


class GeometryConfigError(ConversionError):
    """The geometry configuration file is malformed; the message names the file and the key."""


class NoGoodPixel(ConversionError):
    """A pedestal file was written, but every pixel in it is flagged bad (the reference writes
    it too, then fails: the file shows which gain stage had no usable frame)."""
