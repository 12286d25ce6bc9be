"""Detector control: the small interface the broker drives a Jungfrau detector through.

``interface`` says what a detector must be able to do (the contract a production adapter for
the facility's detector library implements); ``http`` reaches the simulated detectors of
``sf-daq-broker simulate`` through that interface; ``pedestal_procedure`` is the gain-stage
procedure of ``/take_pedestal`` written against it.
"""
