"""Every command in the README runs as written (issue 11).

The shell and Python blocks are read from README.md and run in order, the way a new user follows
it: `make run` first (kept going, as the README asks), then every other command in another
"shell". Commands that never end by themselves (a second server, an event stream, the benchmarks)
are bounded in time and stopped with Ctrl-C (SIGINT). A command fails the test if it exits non-zero
(Ctrl-C's 130 is accepted only for the ones we interrupted), or prints a traceback.

They run in a scratch folder that looks like a fresh clone (the checkout's sources, Makefile and
.venv linked in), so `models/` and `samples/` land there, not in the checkout. `pip install -e`
runs in the checkout itself, where it is a re-install of the same editable package. `make test`
is the one command left out: it is what runs this test.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINKED = (".venv", "src", "bench", "Makefile", "pyproject.toml", "README.md")
README_PORTS = (8000, 8001, 2575)  # the defaults `make run` serves on
# Ctrl-C's exit: 130 from bedside itself, or death by SIGINT from `make`, which re-raises it
INTERRUPTED = (0, 130, -signal.SIGINT)
FAILURE_MARKS = ("Traceback (most recent call last)", "was never awaited")

# How each kind of command is run: (bound in seconds, stopped with Ctrl-C when the bound is reached?)
ENDS = 600.0  # an ordinary command must end by itself within this
STREAM_S = 3.0  # `curl -N` on an event stream: watched this long
SECOND_SERVER_S = 90.0  # a second server: until it is ready (then stopped), at most this long
BENCH_S = 25.0  # a benchmark: this long, then Ctrl-C (each has its own smoke-run option too)


@dataclass(frozen=True)
class Command:
    kind: str  # "sh" or "python"
    text: str
    line: int  # where it is in README.md, for the failure message


def _strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a # inside quotes is kept)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text: str) -> list[Command]:
    commands: list[Command] = []
    fence: str | None = None
    block: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if fence is None:
            if stripped.startswith("```"):
                fence, block = stripped[3:].strip(), []
            continue
        if stripped != "```":
            block.append((number, raw))
            continue
        if fence in ("sh", "bash", "shell"):
            pending, start = "", 0
            for n, line in block:
                line = _strip_comment(line)
                if not line.strip() and not pending:
                    continue
                start = start or n
                if line.endswith("\\"):
                    pending += line[:-1].strip() + " "
                    continue
                commands.append(Command("sh", pending + line.strip(), start))
                pending, start = "", 0
        elif fence == "python":
            commands.append(Command("python", "\n".join(line for _, line in block), block[0][0] if block else number))
        fence = None
    return commands


def test_the_readme_is_read_as_a_user_reads_it():
    sample = "x\n```sh\nmake run PORT=9000   # a comment\n.venv/bin/bedside a \\\n  --b 'c # d'\n```\n"
    assert readme_commands(sample) == [
        Command("sh", "make run PORT=9000", 3),
        Command("sh", ".venv/bin/bedside a --b 'c # d'", 4),
    ]
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert commands[0].text == "make run", "the README starts with `make run`"
    assert any(c.text == "make test" for c in commands)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ready(port: int, tls: bool = False) -> bool:
    # a TLS server's readiness probe: its certificate is the README's own test CA, not checked here
    context = ssl._create_unverified_context() if tls else None
    try:
        with urllib.request.urlopen(
            f"{'https' if tls else 'http'}://127.0.0.1:{port}/v2/health/ready", timeout=2, context=context
        ) as answer:
            return answer.status == 200
    except OSError:
        return False


def _http_port(command: str) -> int:
    """The HTTP port a server command asks for (the README's ways of saying it), else 8000."""
    for pattern in (r"--port[ =](\d+)", r"\bPORT=(\d+)", r"BEDSIDE_SERVER_HTTP_PORT=(\d+)"):
        found = re.search(pattern, command)
        if found:
            return int(found.group(1))
    return 8000


class Shell:
    """Runs README commands the way a user's shell would, and keeps their output for the report."""

    def __init__(self, workdir: Path, env: dict[str, str], logs: Path) -> None:
        self.workdir, self.env, self.logs = workdir, env, logs
        self.count = 0

    def start(self, command: Command) -> tuple[subprocess.Popen[bytes], Path]:
        self.count += 1
        log = self.logs / f"{self.count:02d}-line{command.line}.log"
        cwd = ROOT if re.search(r"pip install -e", command.text) else self.workdir
        argv = ["bash", "-c", command.text] if command.kind == "sh" else [".venv/bin/python", "-c", command.text]
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, cwd=cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return process, log

    @staticmethod
    def interrupt(process: subprocess.Popen[bytes], grace: float = 30.0) -> int:
        """Ctrl-C as a terminal sends it (to the whole process group), then wait for the exit."""
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise AssertionError(f"did not stop within {grace:.0f} s of Ctrl-C") from None
        return process.returncode


def _check_output(command: Command, log: Path) -> None:
    output = log.read_text(errors="replace")
    for mark in FAILURE_MARKS:
        assert mark not in output, f"README line {command.line}: `{command.text[:80]}` printed:\n{output[-4000:]}"


def _wait_for(process: subprocess.Popen[bytes], ready: int, bound: float, tls: bool = False) -> bool:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline and process.poll() is None:
        if _ready(ready, tls):
            return True
        time.sleep(0.2)  # polling a server's readiness, not waiting for a result
    return False


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    work = tmp_path / "clone"
    work.mkdir()
    for name in LINKED:
        (work / name).symlink_to(ROOT / name)
    env = dict(os.environ)
    # the user's own demo repository (built by the first `make run`, kept for the next), as written;
    # only the streams' journal is kept apart, so the test restores no beds of the user's
    env["BEDSIDE_STREAMS_STATE_DIR"] = str(tmp_path / "state")
    env["BENCH_RESULTS"] = str(tmp_path / "bench-results")  # the user's bench/results stay as they are
    env["COLUMNS"] = "120"
    env["MAKEFLAGS"] = ""  # the outer `make test` must not leak -j or -n into `make run`
    yield work, env


def test_every_readme_command_runs_as_written(scratch: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    taken = [port for port in README_PORTS if not _port_free(port)]
    if taken:
        pytest.skip(f"the README's default ports {taken} are in use on this machine")
    work, env = scratch
    logs = tmp_path / "logs"
    logs.mkdir()
    shell = Shell(work, env, logs)
    commands = readme_commands(README.read_text(encoding="utf-8"))
    first, rest = commands[0], commands[1:]
    main, main_log = shell.start(first)  # `make run`, kept going in "another shell"
    try:
        assert _wait_for(main, 8000, 300), f"`make run` not ready within 300 s:\n{main_log.read_text()[-4000:]}"
        for command in rest:
            _run(shell, command)
        assert main.poll() is None, f"`make run` ended while the README was followed:\n{main_log.read_text()[-4000:]}"
    finally:
        code = Shell.interrupt(main)
    assert code in INTERRUPTED, f"`make run` exited {code} on Ctrl-C:\n{main_log.read_text()[-4000:]}"
    _check_output(first, main_log)


def _run(shell: Shell, command: Command) -> None:
    text = command.text
    if text == "make test":
        return  # this test is part of `make test`
    where = f"README line {command.line}: `{text[:100]}`"
    process, log = shell.start(command)
    if re.search(r"(^|\s)make run\b|bedside serve\b", text):
        port = _http_port(text)
        came_up = _wait_for(process, port, SECOND_SERVER_S, "--tls-cert" in text)
        code = Shell.interrupt(process)
        assert came_up, f"{where} did not become ready on port {port} (exit {code}):\n{log.read_text()[-4000:]}"
        assert code in INTERRUPTED, f"{where} exited {code} on Ctrl-C:\n{log.read_text()[-4000:]}"
    elif re.search(r"curl -N\b", text):
        time.sleep(STREAM_S)  # an event stream never ends: watch it for a while, as a user would
        assert process.poll() is None, f"{where} ended early:\n{log.read_text()[-4000:]}"
        Shell.interrupt(process)
        assert log.stat().st_size > 0, f"{where}: the stream sent nothing in {STREAM_S:.0f} s"
    elif re.search(r"make bench|bench/\w+\.py|bedside bench\b", text):
        try:
            code = process.wait(BENCH_S)
        except subprocess.TimeoutExpired:
            code = Shell.interrupt(process)
            assert code in INTERRUPTED[1:], f"{where} exited {code} on Ctrl-C:\n{log.read_text()[-4000:]}"
        else:
            assert code == 0, f"{where} exited {code}:\n{log.read_text()[-4000:]}"
    else:
        try:
            code = process.wait(ENDS)
        except subprocess.TimeoutExpired:
            Shell.interrupt(process)
            raise AssertionError(f"{where} did not end within {ENDS:.0f} s:\n{log.read_text()[-4000:]}") from None
        assert code == 0, f"{where} exited {code}:\n{log.read_text()[-4000:]}"
    _check_output(command, log)
