"""``daq_client.py`` copied out of the repository runs with Python and requests alone, and
``--follow`` picks a run up again (also after Ctrl-C of ``--wait``).

The requests-only environment is a virtual environment without pip whose site-packages holds
exactly requests and the distributions it needs, linked from the test's own environment (no
network, built once per session); it cannot import tqdm, pydantic or sf_daq_broker.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from sf_daq_broker.buffers.horizon import WAITING_PREFIX as BROKER_WAITING_PREFIX
from sf_daq_broker.jobs import SourceKind
from sf_daq_broker.retrieval import CAMERA_SUFFIX as BROKER_CAMERA_SUFFIX
from sf_daq_broker.tools import daq_client
from sf_daq_broker.tools.daq_client import CAMERA_SUFFIX, main
from tests.support import PATIENCE
from tests.tools.support import (
    REPO,
    SEED_START,
    SEED_STOP,
    LiveBroker,
    read_until,
    take_job,
    write_job,
)


def _needed_distributions(name: str, seen: set[str]) -> set[str]:
    """``name`` and every distribution it requires (without extras), recursively."""
    if name in seen:
        return seen
    seen.add(name)
    for requirement in importlib.metadata.requires(name) or []:
        if "extra ==" in requirement:
            continue
        match = re.match(r"[A-Za-z0-9._-]+", requirement)
        assert match is not None, requirement
        _needed_distributions(match.group(0).lower().replace("_", "-"), seen)
    return seen


@pytest.fixture(scope="session")
def requests_only_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Python of a virtual environment holding requests and what it needs, nothing else."""
    venv = tmp_path_factory.mktemp("requests-only") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    ours = Path(sysconfig.get_path("purelib"))
    for name in _needed_distributions("requests", set()):
        distribution = importlib.metadata.distribution(name)
        for top in {file.parts[0] for file in distribution.files or [] if file.parts[0] != ".."}:
            target = site / top
            if not target.exists():
                target.symlink_to(ours / top)
    return python


def run(python: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=2 * PATIENCE,
        check=False,
    )


@pytest.fixture
def copied(tmp_path: Path) -> Path:
    """The user's folder with a copy of daq_client.py (a copy follows the repository's link)."""
    folder = tmp_path / "user"
    folder.mkdir()
    shutil.copy(REPO / "daq_client.py", folder / "daq_client.py")
    (folder / "channel_list").write_text("SAR-CVME-TIFALL5:EvtSet\nSARES11-SPEC125-M1:FPICTURE\n")
    return folder


def test_the_environment_has_requests_and_nothing_of_the_package(
    requests_only_python: Path, tmp_path: Path
) -> None:
    probe = (
        "import importlib.util, requests\n"
        "for name in ('tqdm', 'pydantic', 'numpy', 'aiohttp', 'sf_daq_broker'):\n"
        "    print(name, importlib.util.find_spec(name) is not None)"
    )
    result = run(requests_only_python, "-c", probe, cwd=tmp_path)
    assert result.stdout.split("\n") == [
        "tqdm False",
        "pydantic False",
        "numpy False",
        "aiohttp False",
        "sf_daq_broker False",
        "",
    ]


def test_the_file_is_the_package_module_and_agrees_with_the_broker() -> None:
    assert (REPO / "daq_client.py").resolve() == Path(daq_client.__file__).resolve()
    assert CAMERA_SUFFIX == BROKER_CAMERA_SUFFIX
    assert daq_client.WAITING_PREFIX == BROKER_WAITING_PREFIX


def test_help_of_the_copy(requests_only_python: Path, copied: Path) -> None:
    result = run(requests_only_python, "daq_client.py", "-h", cwd=copied)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("usage: daq_client.py [-h] [-p PGROUP] [-d OUTPUT_DIRECTORY]")
    assert "--follow PGROUP RUN" in result.stdout


async def test_the_copy_retrieves_and_follows_with_plain_lines(
    requests_only_python: Path, copied: Path, broker: LiveBroker, raw_dir: Path
) -> None:
    argv = ["daq_client.py", "-p", "p12345", "-c", "channel_list", "--broker", broker.url]
    argv += ["--start_pulseid", str(SEED_START), "--stop_pulseid", str(SEED_STOP), "--wait"]
    client = asyncio.create_task(asyncio.to_thread(run, requests_only_python, *argv, cwd=copied))
    for kind in (SourceKind.DATABUFFER, SourceKind.IMAGEBUFFER):
        await write_job(broker.transport, await take_job(broker.transport, kind))
    result = await asyncio.wait_for(client, 2 * PATIENCE)
    raw = raw_dir
    assert result.stdout.splitlines() == [
        "success: run number(request_id) is 1",
        f"BSDATA done: {raw}/run_000001.BSDATA.h5 (complete: 1 of 1 names, no pulse missing)",
        f"CAMERAS done: {raw}/run_000001.CAMERAS.h5 (complete: 1 of 1 names, no pulse missing)",
        "run 1 of p12345 is done: 2 of 2 sources written",
    ]
    assert result.returncode == 0
    # No tqdm: plain progress lines on stderr, the last of each source saying it is done.
    lines = result.stderr.splitlines()
    assert lines, result.stderr
    assert all(re.fullmatch(r"(BSDATA|CAMERAS): \w+.* \[\d\d:\d\d\]", line) for line in lines)
    for source in ("BSDATA", "CAMERAS"):
        last = [line for line in lines if line.startswith(f"{source}: ")][-1]
        assert re.fullmatch(rf"{source}: done 1000/1000 pulses \[\d\d:\d\d\]", last), last


async def test_follow_picks_up_a_run_after_ctrl_c_of_wait(
    broker: LiveBroker, copied: Path, requests_only_python: Path
) -> None:
    argv = ["daq_client.py", "-p", "p12345", "-c", "channel_list", "--broker", broker.url]
    argv += ["--start_pulseid", str(SEED_START), "--stop_pulseid", str(SEED_STOP), "--wait"]
    process = await asyncio.create_subprocess_exec(
        str(requests_only_python),
        "-u",
        *argv,
        cwd=copied,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    await read_until(process.stdout, "success: run number(request_id) is 1\n")
    await read_until(process.stderr, "BSDATA: queued")  # following
    process.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(process.communicate(), PATIENCE)
    assert process.returncode == 130
    assert (
        err.decode()
        .rstrip()
        .endswith(
            "stopped following run 1 of p12345; the broker goes on with it "
            "(follow it again: daq_client --follow p12345 1)"
        )
    )

    follower = asyncio.create_task(
        asyncio.to_thread(
            run,
            requests_only_python,
            "daq_client.py",
            "--follow",
            "p12345",
            "1",
            "--broker",
            broker.url,
            cwd=copied,
        )
    )
    await write_job(broker.transport, await take_job(broker.transport, SourceKind.DATABUFFER))
    camera = await take_job(broker.transport, SourceKind.IMAGEBUFFER)
    await write_job(broker.transport, camera, fail="image buffer: HTTP 500")
    result = await asyncio.wait_for(follower, 2 * PATIENCE)
    assert result.stdout.splitlines()[-1] == "run 1 of p12345 failed: 1 of 2 sources failed"
    assert result.returncode == 1


async def test_follow_of_an_unknown_run_and_a_bad_run_number(
    broker: LiveBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    status = await asyncio.to_thread(main, ["--follow", "p12345", "7", "--broker", broker.url])
    assert status == 1
    assert capsys.readouterr().err == "error: run 7 of p12345 does not exist\n"
    with pytest.raises(SystemExit) as exit_info:
        main(["--follow", "p12345", "seven"])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith("error: --follow: the run number must be a positive integer, got 'seven'")
    )
