"""Simulated facility buffers that speak the real protocols (BUFFERS.md).

- ``clock``: the 100 Hz pulse clock (``WallClock``, ``ManualClock``) and pulse timestamps;
- ``channels``, ``archiver``, ``jungfrau_frames``: what every simulated source holds at every
  pulse — public, deterministic functions tests use to compute expected file contents;
- ``api1_server``: data buffer and image buffer (api/1) with the pulse map;
- ``archiver``: the archiver's ``/query``;
- ``jungfrau_writer``, ``calibration``: the Jungfrau buffer files, gain and pedestal files;
- ``faults``: fault injection; ``runner``: everything together; ``cli``: ``sf-daq-broker simulate``.
"""
