"""The "did you mean" measure behind the refusal of misspelt request keys."""

from __future__ import annotations

import pytest

from sf_daq_broker.retrieval import REQUEST_KEYS
from sf_daq_broker.spelling import edit_distance, meant


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        ("", "", 0),
        ("abc", "", 3),
        ("kitten", "sitting", 3),
        ("channel_list", "channels_list", 1),
        ("pulesid", "pulseid", 1),  # a swap of neighbours is one edit
        ("ab", "ba", 1),
        ("pv_list", "pv_list", 0),
    ],
)
def test_edit_distance(a: str, b: str, distance: int) -> None:
    assert edit_distance(a, b) == distance == edit_distance(b, a)


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("channel_list", "channels_list"),
        ("camera-list", "camera_list"),
        ("PV_LIST", "pv_list"),
        ("pvlist", "pv_list"),
        ("stop_pulse_id", "stop_pulseid"),
        ("rate_multiplikator", "rate_multiplicator"),
        ("directory_nmae", "directory_name"),
        ("run_numbers", "run_number"),
        ("scaninfo", "scan_info"),
        # metadata of old clients, and words a typo budget must not reach
        ("laser_mode", None),
        ("user_tag", None),
        ("sample", None),
        ("pv", None),
        ("scan_name", None),
        ("channels_list", None),  # known: not a typo
    ],
)
def test_meant(typed: str, expected: str | None) -> None:
    assert meant(typed, REQUEST_KEYS) == expected
