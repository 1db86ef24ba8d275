"""Checking and exporting the audit log (`bedside.security.audit`), read-only.

`verify()` walks the entries in seq order from the anchor's retention boundary and names the first
bad one: an edited entry (its hash does not match its contents), a deleted one (a gap in seq), one
moved or replaced (neither its hash nor its prev_hash fits), and at the end a deleted tail or
entries added after the anchor (the anchor table and `<audit file>.head`).

What a bare hash chain cannot show: whoever can write the file can append entries, or rewrite the
chain from some entry on, with correctly computed hashes (SHA-256 has no secret). Such a chain is
caught only where it disagrees with the anchor table or the head file, e.g. entries appended after
the anchor, or a rewritten tail whose hash differs from the head file's. The retention boundary is
taken as recorded in the anchor table. Keep a copy of the head file (or of exports) elsewhere for
more.

`export()` writes JSON lines, one object per entry with its hashes, over a run of consecutive
entries; `verify_jsonl()` checks such an export elsewhere (each entry's hash, and the links between
them; the first entry's prev_hash is taken as given).
"""

from __future__ import annotations

import sqlite3
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from bedside.security.auditstore import FIELDS, GENESIS, entry_hash, head_file, read_head_file

_COLUMNS = ", ".join(("seq", *FIELDS, "prev_hash", "hash"))
_FETCH = 10_000


class AuditFileError(Exception):
    """The file is missing or is not an audit log; the message says which."""


@dataclass(frozen=True)
class VerifyResult:
    intact: bool
    checked: int  # entries whose hash and link to the one before were checked and found good
    head_seq: int  # the last good entry (the boundary's seq when none was checked)
    head_hash: str
    bad_seq: int | None = None  # the first bad entry, where one entry can be named
    reason: str = ""  # why the log is not intact
    warnings: tuple[str, ...] = ()


def connect(path: Path) -> sqlite3.Connection:
    """A read-only connection to the audit log at `path`; AuditFileError when there is none."""
    if not path.is_file():
        raise AuditFileError(f"no audit log at {path} (security.audit_file; see --file)")
    uri = "file:" + urllib.parse.quote(str(path.resolve())) + "?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True, isolation_level=None)
        db.execute("PRAGMA busy_timeout=5000")
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise AuditFileError(f"{path} is not a readable audit log: {exc}") from None
    if not tables & {"entries", "anchor"}:
        db.close()
        raise AuditFileError(f"{path} is not a bedside audit log (no entries table)")
    return db


def _span(first: int, last: int) -> str:
    return f"entry {first} was" if first == last else f"entries {first}-{last} were"


def _anchors(db: sqlite3.Connection) -> dict[str, tuple[int, str]]:
    try:
        return {str(name): (int(seq), str(h)) for name, seq, h in db.execute("SELECT name, seq, hash FROM anchor")}
    except (sqlite3.Error, TypeError, ValueError):
        return {}  # dropped, or damaged past reading: reported as a missing anchor


def _check(row: tuple[Any, ...], prev_seq: int, prev_hash: str) -> str:
    """Why `row` does not follow (prev_seq, prev_hash), or ""."""
    seq, values, row_prev, row_hash = row[0], row[1:-2], row[-2], row[-1]
    if not isinstance(seq, int):
        return f"an entry has the seq {seq!r}, not a number: the file was edited"
    before = "the start of the chain" if prev_hash == GENESIS else f"entry {prev_seq}"
    if seq <= prev_seq:
        return (
            f"entry {seq} lies at or before the retention boundary (entry {prev_seq}): inserted, or the boundary edited"
        )
    if seq > prev_seq + 1:
        return f"{_span(prev_seq + 1, seq - 1)} deleted"
    try:
        computed = entry_hash(row_prev, seq, values) if isinstance(row_prev, str) else None
    except (ValueError, TypeError):  # orjson.JSONEncodeError is a TypeError
        computed = None
    if computed != row_hash:
        if row_prev != prev_hash:
            return (
                f"entry {seq} was moved or replaced (neither its hash nor its prev_hash matches): "
                "entries were reordered or inserted"
            )
        return f"entry {seq} was edited (its hash does not match its contents)"
    if row_prev != prev_hash:
        return (
            f"entry {seq} is missing or entries were reordered/inserted "
            f"(its prev_hash does not match {before}, entry {seq} hashes correctly on its own)"
        )
    return ""


def verify(path: Path) -> VerifyResult:
    """Check the audit log at `path`; AuditFileError when it is missing or no audit log."""
    side = read_head_file(path)  # before the snapshot: the writer replaces it only after a commit
    db = connect(path)
    try:
        db.execute("BEGIN")  # one snapshot: a writer committing meanwhile is not seen half-way
        anchors = _anchors(db)
        prev_seq, prev_hash = anchors.get("boundary", (0, GENESIS))
        boundary = prev_seq
        checked = 0
        warnings: list[str] = []

        def bad(seq: int | None, reason: str) -> VerifyResult:
            return VerifyResult(False, checked, prev_seq, prev_hash, seq, reason, tuple(warnings))

        try:
            cursor = db.execute(f"SELECT {_COLUMNS} FROM entries ORDER BY seq")
        except sqlite3.Error:
            return bad(None, "the entries table is missing: the file was edited")
        while rows := cursor.fetchmany(_FETCH):
            for row in rows:
                reason = _check(row, prev_seq, prev_hash)
                if reason:
                    first = prev_seq + 1 if isinstance(row[0], int) and row[0] > prev_seq + 1 else row[0]
                    return bad(first if isinstance(first, int) else None, reason)
                prev_seq, prev_hash = row[0], row[-1]
                checked += 1
        if side is None and checked:
            warnings.append(f"no head file ({head_file(path).name}): a tail deleted with the anchor would not show")
        if side is not None and side[0] > prev_seq:
            return bad(
                prev_seq + 1,
                f"the last {side[0] - prev_seq} entries were deleted "
                f"(the head file names entry {side[0]}, the log ends at entry {prev_seq})",
            )
        head = anchors.get("head")
        if head is None:
            if checked or boundary:
                return bad(None, "the anchor table is missing or emptied: the file was edited")
        elif head[0] > prev_seq:
            return bad(
                prev_seq + 1,
                f"the last {head[0] - prev_seq} entries were deleted "
                f"(the anchor names entry {head[0]}, the log ends at entry {prev_seq})",
            )
        elif head[0] < prev_seq:
            return bad(
                head[0] + 1,
                f"{_span(head[0] + 1, prev_seq)} added outside the audit writer (the anchor names entry {head[0]})",
            )
        elif head[1] != prev_hash:
            return bad(prev_seq, f"entry {prev_seq} does not match the anchor: the chain was rewritten")
        if side is not None and side[0] >= boundary:
            row = db.execute("SELECT hash FROM entries WHERE seq = ?", (side[0],)).fetchone()
            known = anchors["boundary"][1] if side[0] == boundary and boundary else (row[0] if row else None)
            if side[0] and known != side[1]:
                return bad(side[0], f"entry {side[0]} does not match the head file: the chain was rewritten from it")
        return VerifyResult(True, checked, prev_seq, prev_hash, warnings=tuple(warnings))
    finally:
        db.close()


def _rows(db: sqlite3.Connection, since_ns: int | None, until_ns: int | None) -> Iterator[tuple[Any, ...]]:
    """The entries in seq order from the first at or after `since_ns` to the last before
    `until_ns`: one run of consecutive entries (even where the clock went back), so the export's
    links can be checked."""
    first = last = None
    bound = 1 << 62  # SQLite integers are 64-bit; a time past year 2116 means "no bound"
    since_ns = None if since_ns is None else max(-bound, min(since_ns, bound))
    until_ns = None if until_ns is None else max(-bound, min(until_ns, bound))
    if since_ns is not None:
        row = db.execute("SELECT seq FROM entries WHERE time_ns >= ? ORDER BY seq LIMIT 1", (since_ns,)).fetchone()
        first = row[0] if row else 1 << 62
    if until_ns is not None:
        row = db.execute("SELECT seq FROM entries WHERE time_ns < ? ORDER BY seq DESC LIMIT 1", (until_ns,)).fetchone()
        last = row[0] if row else -1
    cursor = db.execute(
        f"SELECT {_COLUMNS} FROM entries WHERE seq >= coalesce(?, -1) AND seq <= coalesce(?, 1 << 62) ORDER BY seq",
        (first, last),
    )
    while rows := cursor.fetchmany(_FETCH):
        yield from rows


def as_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(("seq", *FIELDS, "prev_hash", "hash"), row, strict=True))


def export(path: Path, out: IO[bytes], since_ns: int | None = None, until_ns: int | None = None) -> int:
    """Write the entries (from the first at or after `since_ns` to the last before `until_ns`) to
    `out` as JSON lines, hashes included; the number written."""
    db = connect(path)
    try:
        db.execute("BEGIN")
        count = 0
        for row in _rows(db, since_ns, until_ns):
            out.write(orjson.dumps(as_dict(row)) + b"\n")
            count += 1
        return count
    finally:
        db.close()


def last_entries(path: Path, count: int) -> list[dict[str, Any]]:
    """The last `count` entries, oldest first."""
    db = connect(path)
    try:
        rows = db.execute(f"SELECT {_COLUMNS} FROM entries ORDER BY seq DESC LIMIT ?", (max(0, count),)).fetchall()
    except sqlite3.Error as exc:
        raise AuditFileError(f"{path} is not a readable audit log: {exc}") from None
    finally:
        db.close()
    return [as_dict(row) for row in reversed(rows)]


def verify_jsonl(lines: Iterable[bytes]) -> VerifyResult:
    """Check an export: each entry's hash, and that each follows the one before (the first
    entry's prev_hash is taken as given). A time-bounded export is one run of consecutive seqs."""
    names = ("seq", *FIELDS, "prev_hash", "hash")
    checked, prev_seq, prev_hash = 0, 0, ""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = orjson.loads(line)
            row = tuple(data[name] for name in names)
        except (orjson.JSONDecodeError, TypeError, KeyError):
            return VerifyResult(False, checked, prev_seq, prev_hash, None, f"line {number} is not an audit entry")
        if not checked:  # mid-chain: the first entry's link is what the export says
            prev_seq, prev_hash = (row[0] - 1 if isinstance(row[0], int) else 0), row[-2]
        reason = _check(row, prev_seq, prev_hash)
        if reason:
            seq = row[0] if isinstance(row[0], int) else None
            return VerifyResult(False, checked, prev_seq, prev_hash, seq, reason)
        prev_seq, prev_hash = row[0], row[-1]
        checked += 1
    return VerifyResult(True, checked, prev_seq, prev_hash)
