"""The observation journal: an AA means the observations are on disk. A kill -9 of the server (or
of the ingest process) loses nothing acknowledged, the per-bed windows come back at start, the
journal stays bounded, and a message written twice (NAK, then resent) is restored once."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import time
from pathlib import Path

import pytest

from bedside.streams import journal as journal_module
from bedside.streams.beds import states_from
from bedside.streams.hl7v2 import Observation
from bedside.streams.journal import JOURNAL_FILE, JournalWriter, read_rows
from bedside.streams.mllp import END, START, frame
from tests.conftest import Server, free_port, start_server

NOW = time.time()


def rows(path: Path) -> list[tuple]:
    return list(read_rows(path, 0.0))


def write_all(writer: JournalWriter, messages: list[tuple[str, list[Observation]]]) -> None:
    async def main() -> None:
        writer.start()
        try:
            await asyncio.gather(*(writer.write(bed, obs) for bed, obs in messages))
        finally:
            writer.close()

    asyncio.run(main())


def test_concurrent_messages_share_commits_and_the_folder_is_private(tmp_path):
    path = tmp_path / "state" / JOURNAL_FILE
    writer = JournalWriter(path, "full")
    messages = [(f"B{i}", [Observation("heart_rate", 70 + i, NOW), Observation("spo2", 95, NOW)]) for i in range(200)]
    write_all(writer, messages)
    assert writer.rows == 400 and len(rows(path)) == 400
    assert writer.commits < 50, writer.commits  # group commit: 200 messages, a handful of fsyncs
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700 and stat.S_IMODE(path.stat().st_mode) == 0o600
    values = {(bed, vital): value for bed, vital, value, _ in rows(path)}
    assert values[("B7", "heart_rate")] == 77 and values[("B7", "spo2")] == 95


def test_restore_keeps_one_reading_per_time_and_only_the_recent_ones(tmp_path):
    path = tmp_path / JOURNAL_FILE
    write_all(
        JournalWriter(path, "normal"),
        [
            ("ICU-1", [Observation("heart_rate", 80.0, NOW - 20), Observation("consciousness", "V", NOW - 20)]),
            ("ICU-1", [Observation("heart_rate", 80.0, NOW - 20)]),  # written, NAKed, resent
            ("ICU-1", [Observation("heart_rate", 90.0, NOW - 10), Observation("on_oxygen", True, NOW - 10)]),
            ("ICU-2", [Observation("spo2", 93.0, NOW - 7200)]),  # older than the window
        ],
    )
    states = dict(states_from(read_rows(path, NOW - 3600)))
    assert set(states) == {"ICU-1"}
    bed = states["ICU-1"]
    assert list(bed.series["heart_rate"]) == [(NOW - 20, 80.0), (NOW - 10, 90.0)]
    assert bed.consciousness == (NOW - 20, "V") and bed.oxygen == (NOW - 10, True) and bed.updated == NOW - 10


def test_the_journal_prunes_old_rows_and_caps_its_size(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "PRUNE_EVERY_S", 0.0)  # prune after every commit
    path = tmp_path / JOURNAL_FILE
    writer = JournalWriter(path, "normal", max_age_s=3600, max_rows=100)

    async def main() -> None:
        writer.start()
        try:
            await writer.write("OLD", [Observation("heart_rate", 70, NOW - 7200) for _ in range(10)])
            for i in range(25):  # one at a time: a commit each, so the cap applies as they go
                await writer.write(f"B{i}", [Observation("heart_rate", 70, NOW - 60 + i * 0.1) for _ in range(10)])
        finally:
            writer.close()

    asyncio.run(main())
    kept = rows(path)
    assert len(kept) == 100 and "OLD" not in {bed for bed, *_ in kept}
    assert [bed for bed, *_ in kept[::10]] == [f"B{i}" for i in range(15, 25)]  # the newest writes stay


def test_a_journal_that_cannot_be_written_naks_instead_of_acking(tmp_path):
    path = tmp_path / JOURNAL_FILE
    writer = JournalWriter(path, "full")

    async def main() -> str:
        writer.start()
        writer._db.execute("PRAGMA query_only=ON")  # stands in for a full or read-only disk
        try:
            await writer.write("B1", [Observation("heart_rate", 70, NOW)])
        except OSError as exc:
            return str(exc)
        finally:
            writer.close()
        return ""

    assert "the observation journal could not be written" in asyncio.run(main())
    assert writer.failures == 1 and writer.rows == 0


# --- end to end: a real server, killed ---------------------------------------------------------


def oru(bed: int, control: str, hr: int, stamp: str) -> bytes:
    return frame(
        f"MSH|^~\\&|MON|WARD|BEDSIDE|HOSP|{stamp}||ORU^R01|{control}|P|2.5\r"
        f"PID|1||X{bed}\rPV1|1|I|WARD^{bed}\r"
        f"OBX|1|NM|8867-4^HR^LN||{hr}|/min|||||F\r"
        f"OBX|2|NM|59408-5^SpO2^LN||{90 + bed % 10}|%|||||F\r"
        f"OBX|3|NM|9279-1^RR^LN||{12 + bed % 8}|/min|||||F\r"
    )


def send_all(port: int, messages: list[bytes]) -> list[str]:
    """Messages over a few connections, one at a time on each, as monitors do; the MSA lines."""
    answers: list[str] = []
    for start in range(0, len(messages), 25):
        with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
            buffer = b""
            for message in messages[start : start + 25]:
                sock.sendall(message)
                while END not in buffer:
                    chunk = sock.recv(65536)
                    assert chunk, "connection closed before the answer"
                    buffer += chunk
                answer, _, buffer = buffer.partition(END)
                answers.append(answer.strip(START + b"\r").decode().split("\r")[1])
    return answers


def get_json(server: Server, path: str):
    client = server.client()
    try:
        return client.request("GET", path)
    finally:
        client.close()


def kill(server: Server) -> None:
    """kill -9 of the server and its ingest process together: nothing gets to close the journal."""
    child = get_json(server, "/v2/streams")["mllp"]["ingest_pid"]
    server.process.send_signal(signal.SIGKILL)
    os.kill(child, signal.SIGKILL)
    server.process.wait(10)


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "state"
    monkeypatch.setenv("BEDSIDE_STREAMS_STATE_DIR", str(folder))  # both servers of a test share it
    return folder


@pytest.fixture
def servers(tmp_path):
    started: list[Server] = []
    repo = tmp_path / "repo"
    repo.mkdir()

    def start(*extra: str) -> tuple[Server, int]:
        port = free_port()
        server = start_server(repo, tmp_path / f"server-{len(started)}.log", "--mllp-port", str(port), *extra)
        started.append(server)
        return server, port

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)


def vitals_by_bed(server: Server) -> dict[str, dict]:
    return {b["bed"]: b["vitals"] for b in get_json(server, "/v2/beds")}


def test_every_acknowledged_bed_survives_a_kill_9_of_the_server(state, servers):
    first, port = servers()
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    answers = send_all(port, [oru(bed, f"C{bed}", 60 + bed % 40, stamp) for bed in range(150)])
    assert answers == [f"MSA|AA|C{bed}" for bed in range(150)]
    before = vitals_by_bed(first)
    kill(first)
    second, _ = servers()
    after = vitals_by_bed(second)
    assert len(after) == 150 and after == before
    ward7 = after["WARD-7"]
    assert ward7["heart_rate"] == 67 and ward7["spo2"] == 97 and ward7["respiratory_rate"] == 19
    status = get_json(second, "/v2/streams")
    assert status["journal"]["restored"]["beds"] == 150 and status["beds"] == 150


def test_a_kill_9_of_the_ingest_process_loses_nothing_acknowledged(state, servers):
    server, port = servers()
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    assert send_all(port, [oru(bed, f"A{bed}", 70, stamp) for bed in range(40)]) == [f"MSA|AA|A{b}" for b in range(40)]
    child = get_json(server, "/v2/streams")["mllp"]["ingest_pid"]
    os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while get_json(server, "/v2/streams")["mllp"]["ingest_restarts"] < 1:
        assert time.monotonic() < deadline, "the ingest process was not restarted"
        time.sleep(0.05)  # polling for the restart, bounded
    assert send_all(port, [oru(bed, f"B{bed}", 75, stamp) for bed in range(40, 80)]) == [
        f"MSA|AA|B{b}" for b in range(40, 80)
    ]
    live = vitals_by_bed(server)
    assert len(live) == 80
    kill(server)  # and what both ingest processes journaled comes back
    restarted, _ = servers()
    assert vitals_by_bed(restarted) == live


def test_no_journal_when_it_is_switched_off(state, servers, monkeypatch):
    monkeypatch.setenv("BEDSIDE_STREAMS_JOURNAL", "false")
    server, port = servers()
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    assert send_all(port, [oru(1, "N1", 70, stamp)]) == ["MSA|AA|N1"]
    assert get_json(server, "/v2/streams")["journal"] is None
    assert not (state / JOURNAL_FILE).exists()
    kill(server)
    assert vitals_by_bed(servers()[0]) == {}


def test_a_state_folder_that_cannot_hold_the_key_stops_the_start(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("BEDSIDE_STREAMS_STATE_DIR", str(blocker / "state"))
    repo = tmp_path / "repo"
    repo.mkdir()
    log = tmp_path / "server.log"
    with pytest.raises(RuntimeError, match="server exited early"):
        start_server(repo, log, "--mllp-port", str(free_port()))
    lines = [line for line in log.read_text().splitlines() if "cannot start" in line]
    # the audit log is the first to need the folder (the box key, the journal come next): one clear line
    assert len(lines) == 1 and "state folder, streams.state_dir" in lines[0], log.read_text()
    assert "Traceback" not in log.read_text()
