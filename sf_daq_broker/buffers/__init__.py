"""Clients of the facility's buffers (BUFFERS.md): the workers read through these only.

- ``api1``: data buffer and image buffer (binary api/1 frames; ``api1_format`` and
  ``api1_decoder`` hold the wire format and its incremental decoder);
- ``pulse_map``: pulse id → timestamp, and the readiness check;
- ``archiver``: EPICS PVs;
- ``jungfrau_buffer``: the Jungfrau detector buffer files (``jungfrau_format``: their layout);
- ``errors``: one hierarchy, split into transient (retry) and permanent (give up) errors.
"""
