"""The package as a packager sees it: a wheel that runs outside the checkout, light start-up.

The wheel test builds the real wheel and installs it into a fresh virtual environment in a
temporary directory, then runs a short demo from there (``scripts/wheel-demo.sh``, which CI
runs with the dependencies from the registry; here they come from ``.venv``, so the test
needs no network).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Heavy modules a process that does not convert detector data must not load.
CONVERSION_MODULES = ("numba", "sf_daq_broker.jungfrau.kernel", "sf_daq_broker.jungfrau.converter")


def modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code``."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO
    )
    return set(json.loads(result.stdout.splitlines()[-1]))


def top_level(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def test_help_loads_no_numba_h5py_numpy_nor_aiohttp() -> None:
    modules = modules_after(
        "import contextlib, io\n"
        "from sf_daq_broker.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])"
    )
    assert not top_level(modules) & {"numba", "h5py", "numpy", "aiohttp", "hdf5plugin", "tqdm"}
    # Only the command parsers, the errors and the options of the Jungfrau package (its
    # __init__ imports on use).
    jungfrau = {name for name in modules if name.startswith("sf_daq_broker.jungfrau")}
    assert jungfrau == {
        "sf_daq_broker.jungfrau",
        "sf_daq_broker.jungfrau.cli",
        "sf_daq_broker.jungfrau.detectors",
        "sf_daq_broker.jungfrau.errors",
        "sf_daq_broker.jungfrau.options",
        "sf_daq_broker.jungfrau.pedestal_cli",
    }
    assert len(modules) < 400  # 840 before imports moved to where they are used


def test_channel_workers_load_no_numba_nor_the_conversion() -> None:
    modules = modules_after(
        "from sf_daq_broker.config import load_settings\n"
        "from sf_daq_broker.jobs import SourceKind\n"
        "from sf_daq_broker.transport import create_transport\n"
        "from sf_daq_broker.workers.cli import make_source\n"
        "from sf_daq_broker.workers.loop import Worker\n"
        "settings = load_settings(environ={})\n"
        "for kind in ('databuffer', 'imagebuffer', 'archiver'):\n"
        "    make_source(SourceKind(kind), settings)"
    )
    assert not any(name in modules for name in CONVERSION_MODULES)
    jungfrau = {name for name in modules if name.startswith("sf_daq_broker.jungfrau")}
    # The options a request carries, and their names; no conversion, geometry or numpy code.
    assert jungfrau == {
        "sf_daq_broker.jungfrau",
        "sf_daq_broker.jungfrau.detectors",
        "sf_daq_broker.jungfrau.errors",
        "sf_daq_broker.jungfrau.options",
    }
    # They write HDF5 (h5py, bitshuffle for the cameras), which is their job.
    assert {"h5py", "aiohttp"} <= top_level(modules)


def test_the_detector_worker_does_load_the_conversion() -> None:
    """The other side of the test above: the lazy imports still import what is used."""
    modules = modules_after(
        "from sf_daq_broker.config import load_settings\n"
        "from sf_daq_broker.jobs import SourceKind\n"
        "from sf_daq_broker.workers.cli import make_source\n"
        "make_source(SourceKind.DETECTOR, load_settings(environ={}))\n"
        "from sf_daq_broker.jungfrau import Converter"
    )
    assert all(name in modules for name in CONVERSION_MODULES)


def test_license_is_an_spdx_expression_and_setuptools_understands_it() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "BSD-3-Clause"
    assert project["build-system"]["requires"] == ["setuptools>=77"]
    assert project["tool"]["setuptools"]["package-data"] == {
        "sf_daq_broker": ["configs/*.toml"],
        "sf_daq_broker.web": ["templates/*.html", "static/*"],  # the page's files
    }


def test_the_package_reads_the_configs_directory_not_a_copy() -> None:
    """One set of files: ``sf_daq_broker/configs`` is a link to the documented ``configs/``."""
    from sf_daq_broker.config import DEFAULT_CONFIG
    from sf_daq_broker.defaults import default_config
    from sf_daq_broker.jungfrau.geometry import DEFAULT_GEOMETRY_FILE
    from sf_daq_broker.simulation.config import DEFAULT_CONFIG as SIMULATION_DEFAULT

    link = REPO / "sf_daq_broker" / "configs"
    assert link.is_symlink() and os.readlink(link) == "../configs"
    for path, name in [
        (DEFAULT_CONFIG, "sf-daq-broker.toml"),
        (SIMULATION_DEFAULT, "simulation.toml"),
        (DEFAULT_GEOMETRY_FILE, "geometry.toml"),
    ]:
        assert path == default_config(name) == link / name
        assert path.resolve() == REPO / "configs" / name


@pytest.mark.slow
def test_the_wheel_runs_the_demo_from_a_fresh_environment(tmp_path: Path) -> None:
    env = dict(os.environ, SF_DAQ_WHEEL_DEPS="link", TMPDIR=str(tmp_path))
    result = subprocess.run(
        [str(REPO / "scripts" / "wheel-demo.sh"), "--pulses", "20", "--no-cameras"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    installed = next(line for line in lines if line.startswith("installed wheel: "))
    site = f"{tmp_path}/sf-daq-wheel-"
    package, configuration = installed.removeprefix("installed wheel: ").split(", configuration ")
    assert package.startswith(site) and configuration.startswith(site)
    assert package.endswith("/venv/lib/python3.11/site-packages/sf_daq_broker/__init__.py")
    assert configuration.endswith("/site-packages/sf_daq_broker/configs/sf-daq-broker.toml")
    assert not list(tmp_path.glob("sf-daq-wheel-*"))  # the script removed its directory
    assert lines[-1] == "demo passed"
