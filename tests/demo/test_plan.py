"""What the demo requests: diverse names, only sources a worker serves, every beam pulse."""

from __future__ import annotations

from sf_daq_broker.buffers.jungfrau_format import PULSES_PER_FILE, file_first_pulse
from sf_daq_broker.demo.plan import Content, PulseRange, build_plan, pick_diverse
from sf_daq_broker.jobs import SourceKind
from sf_daq_broker.simulation.config import load_simulation_config

CONFIG = load_simulation_config()
PULSES = PulseRange.for_run(CONFIG.clock.start_pulse_id, 1000)


def test_range_is_history_in_a_closed_jungfrau_file_when_the_demo_starts() -> None:
    assert PULSES.stop - PULSES.start + 1 == 1000
    assert PULSES.start - 1 >= CONFIG.clock.start_pulse_id  # a widened edge exists too
    assert PULSES.clock_at_start > file_first_pulse(PULSES.stop) + PULSES_PER_FILE - 1


def test_sources_without_a_worker_are_left_out_with_the_reason() -> None:
    plan = build_plan(
        CONFIG,
        Content(),
        [SourceKind.DATABUFFER],
        "p12345",
        PULSES,
        why_not={SourceKind.ARCHIVER: "the archiver worker cannot start: boom"},
    )
    assert set(plan.request) == {
        "pgroup",
        "start_pulseid",
        "stop_pulseid",
        "rate_multiplicator",
        "channels_list",
    }
    assert plan.left_out == [
        "cameras: no imagebuffer worker is registered yet",
        "PVs: the archiver worker cannot start: boom",
        "detectors: no detector worker is registered yet",
    ]


def test_every_kind_requested_when_every_worker_exists() -> None:
    plan = build_plan(CONFIG, Content(), list(SourceKind), "p12345", PULSES, "demo")
    assert plan.left_out == []
    assert plan.request["directory_name"] == "demo"
    assert plan.detectors == ["JF13T01V01", "JF06T04V02"]
    assert all(
        o == {"adc_to_energy": True, "compression": True}
        for o in plan.request["detectors"].values()
    )
    assert plan.summary() == "6 channels, 1 camera, 3 PVs, 2 detectors"


def test_channels_differ_and_have_an_event_at_every_beam_pulse() -> None:
    specs = {c.name: c for c in CONFIG.databuffer.channels}
    for rate in (1, 4, 10):
        plan = build_plan(CONFIG, Content(rate_multiplicator=rate), list(SourceKind), "p1", PULSES)
        chosen = [specs[name] for name in plan.request["channels_list"]]
        assert all(rate % c.rate_divisor == 0 for c in chosen)
        assert len({c.type for c in chosen}) == len(chosen)  # six different types
    at_4 = build_plan(CONFIG, Content(rate_multiplicator=4), list(SourceKind), "p1", PULSES)
    assert {specs[n].rate_divisor for n in at_4.request["channels_list"]} == {1, 2, 4}


def test_pick_diverse_prefers_new_features_then_file_order() -> None:
    items = ["a1", "a2", "b1", "b2", "c3"]
    assert pick_diverse(items, 3, lambda s: (s[0], s[1])) == ["a1", "b2", "c3"]
    assert pick_diverse(items, 0, lambda s: (s[0],)) == []
    assert pick_diverse(items, 9, lambda s: (s[0],)) == ["a1", "b1", "c3", "a2", "b2"]
