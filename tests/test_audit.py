"""The tamper-evident audit log: batched writes off the calling thread, one hash chain (also with
two writers on one file), every kind of tampering named, lost entries on the record, retention,
export and the `bedside audit` commands."""

from __future__ import annotations

import io
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from bedside.cli.audit import app
from bedside.security import audit
from bedside.security.audit import FIELDS, AuditLog, entry_hash, head_file
from bedside.security.auditcheck import AuditFileError, export, last_entries, verify, verify_jsonl

runner = CliRunner()


def make_log(path: Path, **options: object) -> AuditLog:
    settings = {"buffer_max": 100_000, "flush_ms": 20.0, "retention_days": 0} | options
    return AuditLog(path, **settings)  # type: ignore[arg-type]


def record(log: AuditLog, count: int, start: int = 0) -> None:
    for i in range(start, start + count):
        log.record("infer", "alice", "ward-3", "rest", "ecg_rhythm", "1", f"req-{i}", "ok", 100 + i)


@pytest.fixture
def ten(tmp_path: Path) -> Path:
    """A closed log of ten entries, seq 1-10."""
    path = tmp_path / "state" / "audit.sqlite"
    log = make_log(path)
    record(log, 10)
    log.close()
    return path


def edit(path: Path, *statements: str, params: tuple[object, ...] = ()) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    for statement in statements:
        db.execute(statement, params if "?" in statement else ())
    db.close()


def row(path: Path, seq: int) -> tuple[object, ...]:
    db = sqlite3.connect(path)
    found = db.execute(f"SELECT {', '.join(FIELDS)}, prev_hash, hash FROM entries WHERE seq = ?", (seq,)).fetchone()
    db.close()
    return tuple(found)


def bad(path: Path) -> tuple[int | None, str]:
    result = verify(path)
    assert not result.intact
    return result.bad_seq, result.reason


def test_entries_are_written_in_batches_off_the_calling_thread(tmp_path):
    log = make_log(tmp_path / "audit.sqlite", flush_ms=500.0)
    batches: list[tuple[str, int]] = []
    write = log._write
    log._write = lambda batch: (batches.append((threading.current_thread().name, len(batch))), write(batch))[1]  # type: ignore[method-assign]
    log.start()
    record(log, 500)
    assert log.stats()["pending"] > 0  # record() only queued them
    deadline = time.monotonic() + 5
    while log.stats()["written"] < 500 and time.monotonic() < deadline:
        time.sleep(0.01)
    log.close()
    assert log.stats() == {"written": 500, "lost": 0, "pending": 0, "last_error": None}
    assert {name for name, _ in batches} == {"audit-writer"}
    assert len(batches) <= 3  # written together, not an entry to a transaction
    result = verify(tmp_path / "audit.sqlite")
    assert result.intact and result.checked == 500 and result.head_seq == 500
    entries = last_entries(tmp_path / "audit.sqlite", 2)
    assert entries[-1]["request_id"] == "req-499" and entries[-1]["latency_us"] == 599
    assert entries[-1]["kind"] == "infer" and entries[-1]["caller"] == "alice" and entries[-1]["tenant"] == "ward-3"


def test_the_file_and_folder_are_owner_only(ten):
    assert ten.stat().st_mode & 0o777 == 0o600
    assert ten.parent.stat().st_mode & 0o077 == 0
    assert head_file(ten).stat().st_mode & 0o777 == 0o600


def test_an_intact_log_verifies(ten):
    result = verify(ten)
    assert result.intact and result.checked == 10 and result.head_seq == 10 and result.warnings == ()
    assert result.head_hash == row(ten, 10)[-1]


def test_an_edited_field_is_named(ten):
    edit(ten, "UPDATE entries SET outcome = 'error' WHERE seq = 5")
    assert bad(ten) == (5, "entry 5 was edited (its hash does not match its contents)")


def test_an_edited_hash_is_caught_by_the_next_entry(ten):
    edit(ten, "UPDATE entries SET hash = ? WHERE seq = 5", params=("ab" * 32,))
    seq, reason = bad(ten)
    assert seq == 5 and "edited" in reason


def test_a_deleted_middle_entry_is_named(ten):
    edit(ten, "DELETE FROM entries WHERE seq = 5")
    assert bad(ten) == (5, "entry 5 was deleted")


def test_deleted_middle_entries_are_named_as_a_range(ten):
    edit(ten, "DELETE FROM entries WHERE seq BETWEEN 4 AND 6")
    assert bad(ten) == (4, "entries 4-6 were deleted")


def test_a_deleted_tail_is_caught_by_the_head_file_and_by_the_anchor(ten):
    edit(ten, "DELETE FROM entries WHERE seq >= 8")
    seq, reason = bad(ten)
    assert seq == 8 and reason.startswith("the last 3 entries were deleted (the head file names entry 10")
    head_file(ten).unlink()
    seq, reason = bad(ten)
    assert seq == 8 and reason.startswith("the last 3 entries were deleted (the anchor names entry 10")


def test_a_dropped_anchor_table_with_the_tail_is_caught_by_the_head_file(ten):
    edit(ten, "DELETE FROM entries WHERE seq >= 9", "DROP TABLE anchor")
    seq, reason = bad(ten)
    assert seq == 9 and reason.startswith("the last 2 entries were deleted (the head file names entry 10")


def test_a_dropped_anchor_table_alone_is_caught(ten):
    edit(ten, "DROP TABLE anchor")
    assert bad(ten) == (None, "the anchor table is missing or emptied: the file was edited")


def test_a_writer_keeps_a_deleted_tail_visible(ten):
    """New entries after a deleted tail continue from the anchor, leaving the gap in place."""
    edit(ten, "DELETE FROM entries WHERE seq >= 9")
    log = make_log(ten)
    record(log, 2)
    log.close()
    assert bad(ten) == (9, "entries 9-10 were deleted")


def test_an_inserted_entry_is_caught(ten):
    """A forged entry put between 5 and 6 (the later seqs shifted up to make room)."""
    edit(ten, "UPDATE entries SET seq = -seq - 1 WHERE seq >= 6", "UPDATE entries SET seq = -seq WHERE seq < 0")
    values = (time.time_ns(), "infer", "mallory", "ward-3", "rest", "ecg_rhythm", "1", "forged", "ok", 1, "")
    prev = str(row(ten, 5)[-1])
    forged = (6, *values, prev, entry_hash(prev, 6, values))
    edit(ten, f"INSERT INTO entries VALUES ({', '.join('?' * 14)})", params=forged)
    seq, reason = bad(ten)
    assert seq == 7 and reason.startswith("entry 7 was moved or replaced")


def test_an_appended_entry_with_a_valid_hash_is_caught_by_the_anchor(ten):
    values = (time.time_ns(), "admin", "mallory", "ward-3", "cli", "", "", "", "ok", 0, "forged")
    prev = str(row(ten, 10)[-1])
    edit(
        ten,
        f"INSERT INTO entries VALUES ({', '.join('?' * 14)})",
        params=(11, *values, prev, entry_hash(prev, 11, values)),
    )
    assert bad(ten) == (11, "entry 11 was added outside the audit writer (the anchor names entry 10)")


def test_a_rewritten_tail_with_its_anchor_is_caught_by_the_head_file(ten):
    values = row(ten, 10)[:-2]
    prev = str(row(ten, 10)[-2])
    forged = (*values[:-1], "rewritten")
    digest = entry_hash(prev, 10, forged)
    edit(ten, "UPDATE entries SET detail = 'rewritten', hash = ? WHERE seq = 10", params=(digest,))
    edit(ten, "UPDATE anchor SET hash = ? WHERE name = 'head'", params=(digest,))
    assert bad(ten) == (10, "entry 10 does not match the head file: the chain was rewritten from it")


def test_an_entry_from_elsewhere_that_hashes_on_its_own_is_caught(ten):
    values, prev = row(ten, 5)[:-2], "ab" * 32
    edit(ten, "UPDATE entries SET prev_hash = ?, hash = ? WHERE seq = 5", params=(prev, entry_hash(prev, 5, values)))
    seq, reason = bad(ten)
    assert seq == 5 and reason.startswith("entry 5 is missing or entries were reordered/inserted")
    assert "(its prev_hash does not match entry 4" in reason


def test_entries_before_the_retention_boundary_are_caught(ten):
    edit(ten, "INSERT INTO anchor VALUES ('boundary', 3, ?)", params=(row(ten, 3)[-1],))
    assert bad(ten) == (
        1,
        "entry 1 lies at or before the retention boundary (entry 3): inserted, or the boundary edited",
    )
    edit(ten, "DELETE FROM entries WHERE seq <= 3")
    assert verify(ten).intact and verify(ten).checked == 7


def test_swapped_contents_are_caught(ten):
    columns = [*FIELDS, "prev_hash", "hash"]
    four, five = row(ten, 4), row(ten, 5)
    assignments = ", ".join(f"{c} = ?" for c in columns)
    edit(ten, f"UPDATE entries SET {assignments} WHERE seq = 4", params=five)
    edit(ten, f"UPDATE entries SET {assignments} WHERE seq = 5", params=four)
    seq, reason = bad(ten)
    assert seq == 4 and "moved or replaced" in reason and "reordered" in reason


def test_swapped_seqs_are_caught(ten):
    edit(ten, "UPDATE entries SET seq = 100 WHERE seq = 4", "UPDATE entries SET seq = 4 WHERE seq = 5")
    edit(ten, "UPDATE entries SET seq = 5 WHERE seq = 100")
    seq, reason = bad(ten)
    assert seq == 4 and "moved or replaced" in reason


def test_a_full_buffer_counts_lost_entries_and_records_the_loss(tmp_path):
    log = make_log(tmp_path / "audit.sqlite", buffer_max=5)
    record(log, 8)  # never blocks, never raises
    assert log.stats()["lost"] == 3 and log.stats()["pending"] == 5
    assert log.flush() == 6
    entries = last_entries(tmp_path / "audit.sqlite", 10)
    assert [e["kind"] for e in entries] == ["infer"] * 5 + ["audit_lost"]
    assert entries[-1]["detail"].startswith("3 audit entries were lost")
    record(log, 1)
    log.close()
    assert [e["kind"] for e in last_entries(tmp_path / "audit.sqlite", 1)] == ["infer"]  # the loss is noted once
    assert verify(tmp_path / "audit.sqlite").intact


def test_record_truncates_and_never_raises(tmp_path):
    log = make_log(tmp_path / "audit.sqlite")
    log.record("infer", "alice", "ward-3", "rest", "m" * 1000, request_id="r" * 1000, detail="d" * 1000)
    log.record("infer", None, 3, "rest", request_id="bad \udc80 surrogate", latency_us=10**30)  # type: ignore[arg-type]
    log.close()
    first, second = last_entries(tmp_path / "audit.sqlite", 2)
    assert len(first["request_id"]) == 128 and len(first["model"]) == 256 and len(first["detail"]) == 256
    assert second["caller"] == "None" and second["tenant"] == "3" and second["request_id"] == "bad ? surrogate"
    assert verify(tmp_path / "audit.sqlite").intact


def test_a_failed_write_keeps_the_entries_and_logs_one_line(tmp_path, caplog, monkeypatch):
    log = make_log(tmp_path / "audit.sqlite")
    opened = log._open

    def full() -> sqlite3.Connection:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(log, "_open", full)
    record(log, 3)
    with caplog.at_level(logging.ERROR, logger="bedside.audit"):
        assert log.flush() == 0
        assert log.flush() == 0
    assert [r.getMessage() for r in caplog.records] == [
        "audit log writing failed (database or disk is full); kept in memory and retried"
    ]
    assert log.stats()["pending"] == 3 and log.stats()["last_error"] == "writing: database or disk is full"
    monkeypatch.setattr(log, "_open", opened)
    assert log.flush() == 3 and log.stats()["last_error"] is None
    log.close()
    assert [e["request_id"] for e in last_entries(tmp_path / "audit.sqlite", 5)] == ["req-0", "req-1", "req-2"]


def test_memory_stays_bounded_while_writes_fail(tmp_path, monkeypatch):
    log = make_log(tmp_path / "audit.sqlite", buffer_max=5)
    opened = log._open

    def read_only() -> sqlite3.Connection:
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(log, "_open", read_only)
    for _ in range(3):
        record(log, 4)
        log.flush()
        assert log.stats()["pending"] <= 5
    assert log.stats()["lost"] == 7  # 12 recorded, the 5 oldest kept
    monkeypatch.setattr(log, "_open", opened)
    log.close()
    entries = last_entries(tmp_path / "audit.sqlite", 10)
    assert [e["request_id"] for e in entries[:5]] == ["req-0", "req-1", "req-2", "req-3", "req-0"]
    assert entries[-1]["kind"] == "audit_lost" and entries[-1]["detail"].startswith("7 audit entries were lost")
    assert verify(tmp_path / "audit.sqlite").intact


def test_retention_deletes_old_entries_and_the_chain_verifies_from_the_boundary(tmp_path, monkeypatch):
    monkeypatch.setattr(audit, "BATCH_MAX", 2)  # written and deleted two entries to a transaction
    path = tmp_path / "audit.sqlite"
    log = make_log(path, retention_days=1)
    record(log, 5)
    log.flush()
    third = last_entries(path, 3)[0]
    assert third["seq"] == 3
    assert log.retain(now_ns=third["time_ns"] + 86_400 * 10**9) == 2  # entries 1-2 are older than a day
    record(log, 2, start=5)
    log.close()
    result = verify(path)
    assert result.intact and result.checked == 5 and result.head_seq == 7
    assert [e["seq"] for e in last_entries(path, 100)] == [3, 4, 5, 6, 7]
    log = make_log(path, retention_days=1)
    assert log.retain(now_ns=time.time_ns() + 2 * 86_400 * 10**9) == 5  # every entry: the anchor keeps the head
    log.close()
    result = verify(path)
    assert result.intact and result.checked == 0 and result.head_seq == 7
    edit(path, "DELETE FROM anchor WHERE name = 'boundary'")
    assert not verify(path).intact


def test_export_round_trips_as_json_lines(ten):
    out = io.BytesIO()
    assert export(ten, out) == 10
    lines = out.getvalue().splitlines()
    assert [orjson.loads(line) for line in lines] == last_entries(ten, 10)
    result = verify_jsonl(lines)
    assert result.intact and result.checked == 10 and result.head_hash == verify(ten).head_hash
    middle = io.BytesIO()
    times = [e["time_ns"] for e in last_entries(ten, 10)]
    assert export(ten, middle, since_ns=times[3], until_ns=times[7]) == 4  # entries 4-7
    assert verify_jsonl(middle.getvalue().splitlines()).intact
    tampered = [line.replace(b'"req-5"', b'"req-X"') for line in lines]
    assert not verify_jsonl(tampered).intact and verify_jsonl(tampered).bad_seq == 6
    assert verify_jsonl([*lines[:4], *lines[5:]]).reason == "entry 5 was deleted"


def test_two_writers_on_one_file_keep_one_chain(tmp_path):
    path = tmp_path / "audit.sqlite"
    logs = [make_log(path, flush_ms=5.0) for _ in range(2)]
    for log in logs:
        log.start()

    def feed(log: AuditLog) -> None:
        for i in range(20):
            record(log, 50, start=i * 50)
            time.sleep(0.002)

    threads = [threading.Thread(target=feed, args=(log,)) for log in logs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for log in logs:
        log.close()
    result = verify(path)
    assert result.intact and result.checked == 2000, result


def test_missing_or_foreign_files_are_refused(tmp_path):
    with pytest.raises(AuditFileError, match="no audit log"):
        verify(tmp_path / "nowhere.sqlite")
    (tmp_path / "notes.txt").write_text("not a database " * 100)
    with pytest.raises(AuditFileError, match="not a readable audit log"):
        verify(tmp_path / "notes.txt")


def test_cli_verify_exit_codes(ten, tmp_path):
    result = runner.invoke(app, ["verify", "--file", str(ten)])
    assert result.exit_code == 0 and "10 entries checked" in result.output and "intact" in result.output
    result = runner.invoke(app, ["verify", "--file", str(tmp_path / "nowhere.sqlite")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1 and "no audit log" in result.output
    edit(ten, "UPDATE entries SET caller = 'bob' WHERE seq = 3")
    result = runner.invoke(app, ["verify", "--file", str(ten)], terminal_width=200)
    assert result.exit_code == 1 and "entry 3 was edited" in result.output


def test_cli_finds_the_log_from_the_settings(ten):
    state = ten.parent
    result = runner.invoke(app, ["verify"], env={"BEDSIDE_STREAMS_STATE_DIR": str(state)})
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["show"], env={"BEDSIDE_SECURITY_AUDIT_FILE": str(state / "other.sqlite")})
    assert result.exit_code == 2 and "other.sqlite" in result.output
    result = runner.invoke(app, ["show"], env={"BEDSIDE_SECURITY_AUDIT_BUFFER": "1"})
    assert result.exit_code == 2 and "BEDSIDE_SECURITY_AUDIT_BUFFER" in result.output


def test_cli_export_and_show(ten, tmp_path):
    out = tmp_path / "export.jsonl"
    result = runner.invoke(app, ["export", "--file", str(ten), "--out", str(out)])
    assert result.exit_code == 0 and "exported 10 entries" in result.output
    assert verify_jsonl(out.read_bytes().splitlines()).checked == 10 and out.stat().st_mode & 0o777 == 0o600
    result = runner.invoke(app, ["export", "--file", str(ten), "--out", "-"])
    lines = [line.encode() for line in result.output.splitlines() if line.startswith("{")]
    assert result.exit_code == 0 and verify_jsonl(lines).checked == 10
    result = runner.invoke(app, ["export", "--file", str(ten), "--out", str(out), "--since", "yesterday"])
    assert result.exit_code == 2 and "--since wants an ISO 8601 time" in result.output
    result = runner.invoke(app, ["export", "--file", str(ten), "--out", str(out), "--since", "2999-01-01T00:00"])
    assert result.exit_code == 0 and out.read_bytes() == b""
    result = runner.invoke(app, ["show", "--file", str(ten), "--last", "3"])
    assert result.exit_code == 0 and "the last 3 entries" in result.output
    assert [line.split()[1] for line in result.output.splitlines() if line.startswith("│ ") and line[2] != " "] == [
        "8",
        "9",
        "10",
    ]


def test_cli_export_narrows_an_existing_readable_file(ten, tmp_path):
    out = tmp_path / "export.jsonl"
    out.write_bytes(b"old")
    out.chmod(0o644)
    result = runner.invoke(app, ["export", "--file", str(ten), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_mode & 0o777 == 0o600 and verify_jsonl(out.read_bytes().splitlines()).checked == 10


def test_the_writer_process_stores_and_is_started_again_when_it_dies(tmp_path):
    path = tmp_path / "audit.sqlite"
    log = make_log(path, flush_ms=10_000.0)
    log.start()
    child = log._child
    assert child is not None and child.process.pid != os.getpid()
    record(log, 5)
    assert log.flush() == 5
    child.process.kill()
    child.process.wait()
    record(log, 5, start=5)
    assert log.flush() == 5  # a new writer process
    assert log._child is not None and log._child is not child
    log.close()
    assert log._child is None and child.process.returncode is not None
    assert log.stats() == {"written": 10, "lost": 0, "pending": 0, "last_error": None}
    result = verify(path)
    assert result.intact and result.checked == 10


def test_a_writer_process_failure_keeps_the_batch(tmp_path):
    path = tmp_path / "audit.sqlite"
    log = make_log(path, flush_ms=10_000.0)
    log.start()
    assert log._child is not None
    log._child.sock.close()  # the connection breaks mid-way: the batch stays in memory
    record(log, 3)
    assert log.flush() == 0
    assert log.stats()["pending"] == 3 and log.stats()["last_error"].startswith("writing: the audit writer process")
    assert log.flush() == 3 and log.stats()["last_error"] is None
    log.close()
    assert [e["request_id"] for e in last_entries(path, 5)] == ["req-0", "req-1", "req-2"]
