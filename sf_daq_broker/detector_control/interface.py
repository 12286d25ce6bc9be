"""What the broker needs from a Jungfrau detector, and nothing more.

``DetectorControl`` is the contract. Two things implement it here: the simulated detector of
``sf-daq-broker simulate`` (``simulation.jungfrau_detector.SimulatedJungfrau``, in its own
process) and ``detector_control.http.HttpDetectorControl``, which reaches that simulation over
HTTP. A **production adapter** for the facility's detector library (``slsdet``'s ``Jungfrau``
class) implements the same methods, one call or a few each:

==========================  ==============================================================
method                      slsdet (UPSTREAM_HEAD §4, §5)
==========================  ==============================================================
``status``                  ``status`` (per module), ``powerchip``, ``pedestalmode``
``start`` / ``stop``        ``startDetector()`` / ``stopDetector()``
``power_on``                stop (may fail), ``freeSharedMemory()``, connect, apply the
                            detector's configuration, ``powerchip``/``highvoltage`` on,
                            ``startDetector()`` — with the beamline's trigger stopped around it
``power_modules``           ``setPowerChip(on, modules)`` and ``setHighVoltage(120|0, modules)``
``settings``                ``exptime``, ``delay``, ``settings`` (GAIN0 = normal, HIGHGAIN0 =
                            low_noise), ``gainmode`` (DYNAMIC, FORCE_SWITCH_G1/G2)
``apply_settings``          the setters of the changed ones, trigger stopped around them
``enable_pedestal_mode``    ``pedestalmode = pedestalParameters(enable, frames, loops)``
``temperatures``            ``getTemperature(t)`` for ``getTemperatureList()``, and
                            ``getThresholdTemperature()``
``monitor``                 the module power controller (JFCtrl) readings
``pings``                   an ICMP ping of each module's control board
==========================  ==============================================================

Every method blocks (the detector library does), so the broker calls them in a thread. A
method raises ``DetectorUnreachable`` when the detector does not answer and
``DetectorRefused`` when it answers but will not do it (e.g. pedestal mode while acquiring);
values are checked before they reach the detector (``DetectorSettings.with_changes``), so
the library never sees a value a user mistyped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Protocol

#: The settings ``get_detector_settings`` reports and ``set_detector_settings`` changes, in
#: upstream's order.
SETTING_NAMES = ("delay", "detector_mode", "exptime", "gain_mode")
#: One pulse period at 100 Hz: an exposure or delay this long would miss the next trigger.
PULSE_PERIOD_S = 0.01
#: slsdet's pedestalParameters: frames is a uint8, loops a uint16.
PEDESTAL_MODE_FRAMES = (1, 255)
PEDESTAL_MODE_LOOPS = (1, 65535)


class GainMode(StrEnum):
    """How the pixels choose their gain stage: by themselves, or forced to G1 or G2."""

    DYNAMIC = "dynamic"
    FIXED_GAIN1 = "fixed_gain1"
    FIXED_GAIN2 = "fixed_gain2"

    @property
    def forced_stage(self) -> int | None:
        """The gain stage every pixel is forced into (None: dynamic switching)."""
        return {GainMode.DYNAMIC: None, GainMode.FIXED_GAIN1: 1, GainMode.FIXED_GAIN2: 2}[self]


class DetectorMode(StrEnum):
    """``normal`` (GAIN0) or ``low_noise`` (HIGHGAIN0: the high-gain G0, ``daq_rec`` bit 0)."""

    NORMAL = "normal"
    LOW_NOISE = "low_noise"


class ModuleState(StrEnum):
    """What one module does (slsdet's run status, plus ``off`` for a module without power)."""

    RUNNING = "running"
    IDLE = "idle"
    #: A finite acquisition (pedestal mode) has taken all its frames.
    FINISHED = "run_finished"
    OFF = "off"


class DetectorControlError(Exception):
    """A detector command failed; the message says which detector and why."""


class DetectorUnreachable(DetectorControlError):
    """The detector (or its control service) does not answer."""


class DetectorRefused(DetectorControlError):
    """The detector answered but will not do it in its current state."""


@dataclass(frozen=True)
class DetectorSettings:
    """The four settings of ``get_detector_settings`` (times in seconds)."""

    delay: float
    detector_mode: DetectorMode
    exptime: float
    gain_mode: GainMode

    def to_json(self) -> dict[str, Any]:
        return {
            "delay": self.delay,
            "detector_mode": self.detector_mode.value,
            "exptime": self.exptime,
            "gain_mode": self.gain_mode.value,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> DetectorSettings:
        return cls(
            delay=float(document["delay"]),
            detector_mode=DetectorMode(document["detector_mode"]),
            exptime=float(document["exptime"]),
            gain_mode=GainMode(document["gain_mode"]),
        )

    def with_changes(self, changes: Mapping[str, Any]) -> DetectorSettings:
        """These settings with ``changes`` applied; ``None`` values leave a setting as it is
        (upstream's rule). ValueError names the key and what is allowed."""
        unknown = [name for name in changes if name not in SETTING_NAMES]
        if unknown:
            raise ValueError(
                f"parameters: unknown setting {unknown[0]!r} (known: {', '.join(SETTING_NAMES)})"
            )
        values: dict[str, Any] = {}
        for name, value in changes.items():
            if value is not None:
                values[name] = _parse_setting(name, value)
        return replace(self, **values)

    def changed(self, new: DetectorSettings) -> dict[str, list[Any]]:
        """``{name: [old, new]}`` of the settings that differ (upstream's changed_parameters)."""
        old_json, new_json = self.to_json(), new.to_json()
        return {
            name: [old_json[name], new_json[name]]
            for name in SETTING_NAMES
            if old_json[name] != new_json[name]
        }


def _parse_setting(name: str, value: Any) -> Any:
    if name in ("exptime", "delay"):
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise ValueError(f"parameters.{name} must be a number of seconds, got {value!r}")
        low_ok = value > 0 if name == "exptime" else value >= 0
        if not low_ok or value >= PULSE_PERIOD_S:
            bound = "0 < exptime" if name == "exptime" else "0 <= delay"
            raise ValueError(
                f"parameters.{name} must be in seconds with {bound} < {PULSE_PERIOD_S} "
                f"(one pulse period), got {value!r}"
            )
        return float(value)
    enum: type[GainMode] | type[DetectorMode] = GainMode if name == "gain_mode" else DetectorMode
    if not isinstance(value, str) or value not in {member.value for member in enum}:
        allowed = ", ".join(member.value for member in enum)
        raise ValueError(f"parameters.{name} must be one of {allowed}, got {value!r}")
    return enum(value)


@dataclass(frozen=True)
class PedestalMode:
    """The detector's pedestal mode: ``frames`` frames per gain stage, ``loops`` times."""

    frames: int
    loops: int

    def __post_init__(self) -> None:
        for what, value, (low, high) in (
            ("frames", self.frames, PEDESTAL_MODE_FRAMES),
            ("loops", self.loops, PEDESTAL_MODE_LOOPS),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"pedestal mode {what} must be an integer {low}..{high}")


@dataclass(frozen=True)
class DetectorStatus:
    """Per module: its state and whether its chips are powered; the pedestal mode if on."""

    modules: tuple[ModuleState, ...]
    pedestal_mode: PedestalMode | None = None

    @property
    def summary(self) -> str | list[str]:
        """One state when every module agrees, else the list (as upstream shows it)."""
        states = {state.value for state in self.modules}
        if len(states) == 1:
            return states.pop()
        return [state.value for state in self.modules]

    @property
    def powered_modules(self) -> list[int]:
        return [m for m, state in enumerate(self.modules) if state is not ModuleState.OFF]

    def to_json(self) -> dict[str, Any]:
        mode = self.pedestal_mode
        return {
            "modules": [state.value for state in self.modules],
            "pedestal_mode": None if mode is None else {"frames": mode.frames, "loops": mode.loops},
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> DetectorStatus:
        mode = document.get("pedestal_mode")
        return cls(
            modules=tuple(ModuleState(state) for state in document["modules"]),
            pedestal_mode=None if mode is None else PedestalMode(mode["frames"], mode["loops"]),
        )


class DetectorControl(Protocol):
    """One Jungfrau detector, as the broker drives it. See the module docstring."""

    @property
    def name(self) -> str: ...

    @property
    def n_modules(self) -> int: ...

    def status(self) -> DetectorStatus: ...

    def start(self) -> None:
        """Start acquiring (no-op when already acquiring)."""

    def stop(self) -> None:
        """Stop acquiring (no-op when stopped)."""

    def power_on(self) -> None:
        """The whole power-on sequence: stop, power every module, apply the detector's
        configured settings, start. Takes minutes on a real detector."""

    def power_modules(self, modules: Sequence[int], on: bool) -> None:
        """Chip power and high voltage of ``modules`` on or off."""

    def settings(self) -> DetectorSettings: ...

    def apply_settings(self, settings: DetectorSettings) -> None:
        """Make these the detector's settings (only the changed ones are sent)."""

    def enable_pedestal_mode(self, mode: PedestalMode) -> int:
        """Switch pedestal mode on (the detector must be stopped); returns how many frames the
        detector takes once started, after which it stops by itself."""

    def disable_pedestal_mode(self) -> None:
        """Switch pedestal mode off (the detector must be stopped)."""

    def temperatures(self) -> dict[str, list[float | None]]:
        """Per sensor name, one value per module (None for a module without power)."""

    def monitor(self) -> dict[str, list[Any]]:
        """The power controller's readings, per quantity one value per module."""

    def pings(self) -> list[bool]:
        """Whether each module's control board answers."""


#: Gives the control of a detector by name (the broker asks for one per request).
DetectorConnector = Callable[[str], DetectorControl]
