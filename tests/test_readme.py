"""Every command in README.md's ```bash blocks runs, so the README cannot rot.

The commands run in the README's order, from the repository's root, against the live system the
README's "Try it by hand" section starts (``sf-daq-broker demo --stay``), which this test starts
itself on a free port and a temporary data root. Substitutions: ``localhost:10002`` becomes the
live broker, ``/tmp/sf-demo`` the temporary data root; ``SF_DAQ_BROKER`` points at the live
broker. A command is skipped only when its line ends in ``# not run by tests: <reason>``
(servers that run until stopped, Docker, systemd, the test suite itself); the skips are counted
and listed. Every command must exit 0. A ```json block right after a command's block is its
reply: the real reply must have the same status and the same keys. A ```text block is its
output: every documented line must appear in the real output.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import wait_until

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SKIP = re.compile(r"#\s*not run by tests:\s*(?P<reason>\S.*)$")
HEREDOC = re.compile(r"<<-?\s*'?(?P<word>\w+)'?")
pytestmark = pytest.mark.slow


@dataclass
class Command:
    text: str
    line: int  # in README.md, for messages
    skip_reason: str | None = None
    reply: tuple[str, str] | None = None  # (language, text) of the block that follows


def _blocks(markdown: str) -> list[tuple[str, str, int]]:
    """(language, body, first line number) of every fenced block."""
    blocks = []
    lines = markdown.splitlines()
    index = 0
    while index < len(lines):
        match = re.match(r"^```(\w*)\s*$", lines[index])
        if match:
            start = index + 1
            end = start
            while not lines[end].startswith("```"):
                end += 1
            blocks.append((match.group(1), "\n".join(lines[start:end]), start + 1))
            index = end
        index += 1
    return blocks


def _commands(body: str, first_line: int) -> list[Command]:
    """Commands of one bash block: comment lines dropped, ``\\`` continuations and heredocs
    joined."""
    commands: list[Command] = []
    lines = body.splitlines()
    index = 0
    while index < len(lines):
        line, number = lines[index], first_line + index
        index += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        text = line
        while text.endswith("\\") and index < len(lines):
            text += "\n" + lines[index]
            index += 1
        heredoc = HEREDOC.search(text)
        if heredoc:
            while index < len(lines):
                text += "\n" + lines[index]
                index += 1
                if lines[index - 1].strip() == heredoc.group("word"):
                    break
        skip = SKIP.search(text.splitlines()[0])
        commands.append(Command(text, number, skip.group("reason") if skip else None))
    return commands


def readme_commands() -> list[Command]:
    commands: list[Command] = []
    blocks = _blocks(README.read_text(encoding="utf-8"))
    for position, (language, body, first_line) in enumerate(blocks):
        if language != "bash":
            continue
        found = _commands(body, first_line)
        following = blocks[position + 1] if position + 1 < len(blocks) else None
        if found and following and following[0] in ("json", "text"):
            found[-1].reply = (following[0], following[1])
        commands += found
    return commands


COMMANDS = readme_commands()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Live:
    port: int
    data_root: Path

    def substitute(self, text: str) -> str:
        text = text.replace("--broker-port 10002", f"--broker-port {self.port}")
        text = text.replace("localhost:10002", f"127.0.0.1:{self.port}")
        return text.replace("/tmp/sf-demo", str(self.data_root))

    @property
    def environment(self) -> dict[str, str]:
        return {**os.environ, "SF_DAQ_BROKER": f"http://127.0.0.1:{self.port}"}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The README's own ``demo --stay`` command, on a free port and a temporary data root."""
    (stay,) = [c for c in COMMANDS if "demo --stay" in c.text]
    system = Live(_free_port(), tmp_path_factory.mktemp("readme") / "sf-demo")
    command = system.substitute(SKIP.sub("", stay.text)).strip()
    with subprocess.Popen(
        ["bash", "-c", f"exec {command}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**system.environment, "PYTHONUNBUFFERED": "1"},
    ) as process:
        assert process.stdout is not None
        stdout = process.stdout
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=lambda: list(map(lines.put, stdout)))
        reader.start()
        seen: list[str] = []

        def ready() -> bool:
            while not lines.empty():
                seen.append(lines.get())
            if process.poll() is not None:
                raise AssertionError("the demo ended early:\n" + "".join(seen))
            return any(line.startswith("ready: ") for line in seen)

        try:
            wait_until(ready, timeout=240, what="the README's demo --stay to be ready")
            assert "demo passed\n" in seen
            yield system
        finally:
            process.send_signal(signal.SIGINT)
            try:
                code = process.wait(timeout=60)
            finally:
                if process.poll() is None:
                    process.kill()
                reader.join()
    assert code == 130  # Ctrl-C, as the README says


def test_the_two_commands_come_first() -> None:
    assert [c.text.split("#")[0].strip() for c in COMMANDS[:2]] == [
        "scripts/demo.sh",
        "scripts/test.sh",
    ]
    assert COMMANDS[0].skip_reason is None  # the main job is really run


def test_skipped_commands_say_why_and_are_few() -> None:
    skipped = [c for c in COMMANDS if c.skip_reason]
    print(f"{len(COMMANDS) - len(skipped)} README commands run, {len(skipped)} not run:")
    for command in skipped:
        print(f"  README.md:{command.line}: {command.text.splitlines()[0]}")
    assert all(len(c.skip_reason or "") > 10 for c in skipped)
    assert len(skipped) <= 10
    assert len(COMMANDS) - len(skipped) >= 25


def _check_reply(command: Command, live: Live, output: str) -> None:
    assert command.reply is not None
    language, documented = command.reply
    documented = live.substitute(documented)
    if language == "json":
        expected, actual = json.loads(documented), json.loads(output)
        assert actual["status"] == expected["status"], (command.text, output)
        assert sorted(actual) == sorted(expected), (command.text, output)
    else:
        missing = [line for line in documented.splitlines() if line not in output.splitlines()]
        assert not missing, (command.text, missing, output)


def _report_demo_time(result: subprocess.CompletedProcess[str], seconds: float) -> None:
    """The README says how long the demo takes, and under which load: measured here, on every
    run of this test (shown with ``pytest -s`` or ``-rP``)."""
    match = re.search(r"^time taken: (\d+\.\d) s ", result.stdout, re.MULTILINE)
    assert match, result.stdout
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(
        f"README's scripts/demo.sh: {seconds:.1f} s in all, the demo's own 'time taken' "
        f"{match.group(1)} s, on {os.cpu_count()} cores with load average {load}"
    )


def test_every_readme_command_runs(live: Live) -> None:
    for command in COMMANDS:
        if command.skip_reason or "demo --stay" in command.text:
            continue
        began = time.monotonic()
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", live.substitute(command.text)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            env=live.environment,
        )
        where = f"README.md:{command.line}: {command.text}"
        assert result.returncode == 0, f"{where}\n{result.stdout}\n{result.stderr}"
        if command.text.startswith("scripts/demo.sh"):
            _report_demo_time(result, time.monotonic() - began)
        if command.reply is not None:
            language = command.reply[0]
            output = result.stdout if language == "json" else result.stdout + result.stderr
            _check_reply(command, live, output)
