"""Encryption at rest: the key provider, the sealed format, encrypted models served (and refused
with the reason while the others serve), the observation journal sealed row by row, key rotation
and the command line. Every key here is random and every file private to the test."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import shlex
import sqlite3
import stat
import struct
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
import typer
from typer.testing import CliRunner

from bedside.cli import keys as keys_cli
from bedside.repository.manager import RepositoryManager, State
from bedside.repository.store import ModelStore
from bedside.security import keys as keys_module
from bedside.security.keys import KeyProviderError, KeyRing, key_id, load_keyring, new_key, write_key_file
from bedside.security.sealed import (
    JOURNAL,
    MODEL,
    OVERHEAD,
    SealedError,
    open_sealed,
    reseal,
    seal,
    seal_file,
    sealed_key_id,
)
from bedside.settings import DEFAULTS
from bedside.streams import ingest
from bedside.streams.hl7v2 import Observation
from bedside.streams.journal import JOURNAL_FILE, JournalWriter, Skipped, read_rows, reseal_rows
from tests.models import SCALE_CONFIG, scale_model, write_config
from tests.test_journal import write_all

NOW = time.time()
BED, HEART_RATE = "ICU-SECRET-7", 137.625  # what must not be found in clear on disk


def ring(*keys: bytes) -> KeyRing:
    return KeyRing(list(keys) or [new_key()])


# --- the sealed format -----------------------------------------------------------------------


def test_round_trip_names_the_key_by_id_and_never_shows_it():
    key = new_key()
    keys = KeyRing([key])
    blob = seal(b"weights" * 100, keys, MODEL)
    assert open_sealed(blob, keys, MODEL) == b"weights" * 100
    assert blob.startswith(b"BEDSIDE-SEALED1\n") and b"weights" not in blob
    assert sealed_key_id(blob) == keys.current_id == key_id(key) and len(key_id(key)) == 16
    assert seal(b"x", keys, MODEL) != seal(b"x", keys, MODEL)  # a fresh nonce every time
    assert key.hex() not in repr(keys) and keys.current_id in repr(keys)


def test_a_wrong_key_is_told_apart_from_damage():
    blob = seal(b"model bytes", ring(), MODEL)
    other = ring()
    with pytest.raises(
        SealedError,
        match=rf"encrypted with key {sealed_key_id(blob)}, which the key provider does not have \(wrong key\?\)",
    ):
        open_sealed(blob, other, MODEL)


def test_one_flipped_byte_anywhere_is_detected():
    keys = ring()
    blob = seal(b"a small model graph", keys, MODEL)
    seen: dict[str, set[str]] = {}
    for i in range(len(blob)):  # magic, key id, nonce, ciphertext and tag: every byte
        damaged = bytearray(blob)
        damaged[i] ^= 0x01
        with pytest.raises(SealedError) as caught:
            open_sealed(bytes(damaged), keys, MODEL)
        region = "magic" if i < 16 else "key id" if i < 24 else "nonce" if i < 36 else "sealed data and tag"
        message = str(caught.value)
        reason = next(r for r in ("not a bedside", "which the key provider does not have", "integrity") if r in message)
        seen.setdefault(region, set()).add(reason)
    assert seen == {
        "magic": {"not a bedside"},
        "key id": {"which the key provider does not have"},  # a key id nobody has: named, not guessed at
        "nonce": {"integrity"},
        "sealed data and tag": {"integrity"},
    }


def test_truncated_and_foreign_files():
    keys = ring()
    blob = seal(b"0123456789" * 10, keys, MODEL)
    for size in (1, 16, 30, OVERHEAD - 1):
        with pytest.raises(SealedError, match="is truncated"):
            open_sealed(blob[:size], keys, MODEL)
    for size in (OVERHEAD, len(blob) - 1):
        with pytest.raises(SealedError, match="integrity check"):
            open_sealed(blob[:size], keys, MODEL)
    for foreign in (b"", b"\x08\x07onnx protobuf", b"BEDSIDE-SEALED2\n" + bytes(60)):
        with pytest.raises(SealedError, match="not a bedside encrypted file"):
            open_sealed(foreign, keys, MODEL)


def test_a_journal_blob_does_not_open_as_a_model():
    keys = ring()
    with pytest.raises(SealedError, match="integrity check"):
        open_sealed(seal(b"[1]", keys, JOURNAL), keys, MODEL)


def test_reseal_moves_to_the_current_key_and_leaves_current_blobs_alone():
    old, new = new_key(), new_key()
    blob = seal(b"payload", KeyRing([old]), MODEL)
    both = KeyRing([new, old])
    moved = reseal(blob, both, MODEL)
    assert sealed_key_id(moved) == key_id(new) and open_sealed(moved, KeyRing([new]), MODEL) == b"payload"
    assert reseal(moved, both, MODEL) is moved


# --- the key provider ------------------------------------------------------------------------


def key_file(path: Path, text: str, mode: int = 0o600) -> str:
    path.write_text(text)
    path.chmod(mode)
    return f"file:{path}"


def test_key_file_formats_current_first_older_after(tmp_path):
    a, b, c = new_key(), new_key(), new_key()
    text = (
        f"# keys\n\n{base64.b64encode(a).decode()}\n"
        f"{base64.urlsafe_b64encode(b).decode().rstrip('=')}  # older\n{c.hex().upper()}\n"
    )
    keys = load_keyring(key_file(tmp_path / "k", text), {})
    assert keys is not None and keys.ids == [key_id(a), key_id(b), key_id(c)] and keys.current == a
    assert load_keyring("", {}) is None


def test_key_file_refused_when_others_may_read_it_or_it_is_not_ours(tmp_path, monkeypatch):
    key = new_key()
    spec = key_file(tmp_path / "k", key.hex(), 0o640)
    with pytest.raises(KeyProviderError) as caught:
        load_keyring(spec, {})
    message = str(caught.value)
    assert "the key file named in security.key" in message and "chmod 600" in message
    assert str(tmp_path) not in message and key.hex() not in message
    (tmp_path / "k").chmod(0o606)
    with pytest.raises(KeyProviderError, match="group or others"):
        load_keyring(spec, {})
    (tmp_path / "k").chmod(0o600)
    monkeypatch.setattr(keys_module.os, "geteuid", lambda: os.getuid() + 1)
    with pytest.raises(KeyProviderError, match="not owned by the user bedside runs as"):
        load_keyring(spec, {})


def test_bad_key_texts_are_refused_without_quoting_them(tmp_path):
    secret = base64.b64encode(new_key()).decode()
    for text, reason in (
        ("", "holds no key"),
        ("# only a comment\n", "holds no key"),
        (f"{secret}\n{secret[:-4]}\n", "key 2 in the key file named in security.key is not a 32-byte key"),
        ("00" * 31, "key 1 .* is not a 32-byte key"),
    ):
        with pytest.raises(KeyProviderError, match=reason) as caught:
            load_keyring(key_file(tmp_path / "k", text), {})
        assert secret not in str(caught.value) and secret[:-4] not in str(caught.value)
    with pytest.raises(KeyProviderError, match="cannot be read: No such file"):
        load_keyring(f"file:{tmp_path / 'missing'}", {})


def test_a_refused_key_file_is_warned_about_once_per_change(tmp_path, caplog):
    a, b = new_key(), new_key()
    path = tmp_path / "k"
    keys = load_keyring(key_file(path, a.hex()), {})
    assert keys is not None
    path.chmod(0o644)  # refused from now on: the journal calls refresh() on every commit
    with caplog.at_level("WARNING", logger=keys_module.log.name):
        assert not keys.refresh() and not keys.refresh() and not keys.refresh()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "keeping the keys read before" in warnings[0].getMessage()
    assert keys.ids == [key_id(a)]
    key_file(path, f"{b.hex()}\n{a.hex()}\n")  # fixed: read again
    assert keys.refresh() and keys.ids == [key_id(b), key_id(a)]


def test_env_and_command_providers():
    a, b = new_key(), new_key()
    keys = load_keyring("env:BEDSIDE_TEST_KEYS", {"BEDSIDE_TEST_KEYS": f" {a.hex()} {base64.b64encode(b).decode()}\n"})
    assert keys is not None and keys.ids == [key_id(a), key_id(b)]
    with pytest.raises(KeyProviderError, match=r"variable named in security.key \(NOPE\) is not set"):
        load_keyring("env:NOPE", {})
    command = shlex.join([sys.executable, "-c", f"print('{a.hex()}')"])
    keys = load_keyring(f"command:{command}", {})
    assert keys is not None and keys.ids == [key_id(a)]
    failing = shlex.join([sys.executable, "-c", f"import sys; print('{a.hex()}', file=sys.stderr); sys.exit(3)"])
    with pytest.raises(KeyProviderError, match=r"the key command in security.key failed \(exit code 3\)") as caught:
        load_keyring(f"command:{failing}", {})
    assert a.hex() not in str(caught.value)  # what it said on stderr is not repeated
    with pytest.raises(KeyProviderError, match="cannot be run"):
        load_keyring("command:/nonexistent/tpm-tool --key", {})


def test_a_key_command_that_hangs_is_cut_off(monkeypatch):
    monkeypatch.setattr(keys_module, "COMMAND_TIMEOUT_S", 0.3)
    hang = shlex.join([sys.executable, "-c", "import time; time.sleep(60)"])
    with pytest.raises(KeyProviderError, match=r"did not answer within 0.3 s"):
        load_keyring(f"command:{hang}", {})


def test_write_key_file_is_owner_only_and_new_never_overwrites(tmp_path):
    path = tmp_path / "keys"
    first = new_key()
    write_key_file(path, [first], replace=False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and first.hex() not in path.read_text()
    with pytest.raises(FileExistsError):
        write_key_file(path, [new_key()], replace=False)
    keys = load_keyring(f"file:{path}", {})
    assert keys is not None and keys.ids == [key_id(first)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys"]  # no temporary file left


# --- encrypted models ------------------------------------------------------------------------


def make_repo(root: Path, keys: KeyRing) -> Path:
    """sealed: served; damaged: one byte flipped; foreign: another key; plain: not encrypted;
    both: model.onnx and model.onnx.enc (ambiguous)."""
    for name in ("sealed", "damaged", "foreign", "plain", "both"):
        write_config(root / name, SCALE_CONFIG)
        scale_model(root / name / "1" / "model.onnx", factor=2.0)
    for name in ("sealed", "damaged", "both"):
        seal_file(root / name / "1" / "model.onnx", keys)
    seal_file(root / "foreign" / "1" / "model.onnx", ring())
    for name in ("sealed", "damaged", "foreign"):
        (root / name / "1" / "model.onnx").unlink()
    enc = root / "damaged" / "1" / "model.onnx.enc"
    data = bytearray(enc.read_bytes())
    data[len(data) // 2] ^= 0x40
    enc.write_bytes(bytes(data))
    return root


def manager(root: Path, keys: KeyRing | None) -> RepositoryManager:
    attached: list[str] = []
    repo = RepositoryManager(
        ModelStore(root, keys=keys), lambda model, stats: attached.append(model.name), lambda n, v: None
    )
    repo.load_all()
    return repo


def test_an_encrypted_model_serves_while_damaged_and_foreign_ones_are_unavailable(tmp_path):
    keys = ring()
    repo = manager(make_repo(tmp_path, keys), keys)
    state = {e.name: (e.state, e.reason) for e in repo.entries()}
    assert state["sealed"] == (State.READY, "") and state["plain"] == (State.READY, "")
    assert state["damaged"][0] is State.UNAVAILABLE
    assert "damaged/1/model.onnx.enc fails its integrity check (altered or damaged)" in state["damaged"][1]
    assert state["foreign"][0] is State.UNAVAILABLE
    assert "which the key provider does not have (wrong key?)" in state["foreign"][1]
    assert state["both"][0] is State.UNAVAILABLE and "both model.onnx and model.onnx.enc" in state["both"][1]
    for reason in (r for _, r in state.values()):
        assert str(tmp_path) not in reason and keys.current.hex() not in reason
    model = repo.entry("sealed").versions[1].model
    assert model is not None
    out = model.run({"x": np.ones((2, 4), np.float32)})
    np.testing.assert_array_equal(out["y"], np.full((2, 4), 2.0, np.float32))
    assert not list(tmp_path.glob("sealed/1/model.onnx"))  # decrypted in memory only


def test_an_encrypted_model_without_a_configured_key_says_so(tmp_path):
    repo = manager(make_repo(tmp_path, ring()), None)
    entry = repo.entry("sealed")
    assert entry.state is State.UNAVAILABLE
    assert "sealed/1/model.onnx.enc is encrypted and no key is configured (security.key)" in entry.reason
    assert repo.entry("plain").state is State.READY


# --- the observation journal -----------------------------------------------------------------


def write_journal(path: Path, keys: KeyRing | None, messages: list[tuple[str, list[Observation]]]) -> JournalWriter:
    writer = JournalWriter(path, "normal", keys=keys)
    write_all(writer, messages)
    return writer


def raw_files(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


MESSAGES = [
    (BED, [Observation("heart_rate", HEART_RATE, NOW - 30), Observation("consciousness", "V", NOW - 30)]),
    ("ICU-2", [Observation("spo2", 97, NOW - 20), Observation("supplemental_o2", True, NOW - 20)]),
]


def test_journal_rows_are_sealed_on_disk_and_restored(tmp_path):
    keys = ring()
    path = tmp_path / JOURNAL_FILE
    write_journal(path, keys, MESSAGES)
    raw = raw_files(path)
    assert BED.encode() not in raw and b"heart_rate" not in raw and b"ICU-2" not in raw
    assert struct.pack("<d", HEART_RATE) not in raw and struct.pack(">d", HEART_RATE) not in raw
    skipped = Skipped()
    rows = sorted(read_rows(path, NOW - 3600, keys, skipped), key=lambda r: (r[0], r[1]))
    assert rows == [
        ("ICU-2", "spo2", 97, NOW - 20),
        ("ICU-2", "supplemental_o2", True, NOW - 20),
        (BED, "consciousness", "V", NOW - 30),
        (BED, "heart_rate", HEART_RATE, NOW - 30),
    ]
    assert skipped.rows == 0


def test_journal_rows_that_do_not_open_are_skipped_and_counted(tmp_path):
    keys = ring()
    path = tmp_path / JOURNAL_FILE
    write_journal(path, keys, MESSAGES)
    write_journal(path, None, [("WARD-9", [Observation("heart_rate", 60.0, NOW - 10)])])  # before a key was set
    for given, reason in ((None, "no key is configured"), (ring(), "which the key provider does not have")):
        skipped = Skipped()
        assert list(read_rows(path, 0, given, skipped)) == [("WARD-9", "heart_rate", 60.0, NOW - 10)]
        assert skipped.rows == 4 and reason in skipped.reason
    db = sqlite3.connect(path)  # moved in time, or one byte altered: refused, the rest restored
    with db:
        db.execute("UPDATE observations SET time = time + 1 WHERE rowid = 1")
        (blob,) = db.execute("SELECT value FROM observations WHERE rowid = 3").fetchone()
        db.execute(
            "UPDATE observations SET value = ? WHERE rowid = 3", (blob[:60] + bytes([blob[60] ^ 1]) + blob[61:],)
        )
    db.close()
    skipped = Skipped()
    assert len(list(read_rows(path, 0, keys, skipped))) == 3 and skipped.rows == 2


def test_the_ingest_child_builds_its_ring_from_the_spec(tmp_path, monkeypatch):
    key = new_key()
    monkeypatch.setenv("BEDSIDE_TEST_JOURNAL_KEY", key.hex())
    security = dataclasses.replace(DEFAULTS.security, key="env:BEDSIDE_TEST_JOURNAL_KEY")
    process = ingest.IngestProcess(lambda m: None, port=0, state=tmp_path, security=security)
    config = orjson.loads(process._config())  # what the child is started with: the spec, never the key
    assert config["security"]["key"] == "env:BEDSIDE_TEST_JOURNAL_KEY" and key.hex() not in process._config()

    async def prepared() -> KeyRing | None:
        _, _, journal = ingest._prepare(config)
        assert journal is not None
        journal.close()
        return journal.keys

    keys = asyncio.run(prepared())
    assert keys is not None and keys.ids == [key_id(key)]
    config["security"]["key"] = "env:BEDSIDE_NOT_SET"
    with pytest.raises(KeyProviderError, match="is not set"):  # the child reports it as its start error
        asyncio.run(prepare_only(config))


async def prepare_only(config: dict) -> None:
    ingest._prepare(config)


# --- rotation and the command line -----------------------------------------------------------

runner = CliRunner()


def cli() -> typer.Typer:
    """The commands as `bedside` registers them."""
    app = typer.Typer()
    app.command()(keys_cli.encrypt)
    app.add_typer(keys_cli.keys_app, name="keys")
    return app


def run(*args: str, env: dict[str, str] | None = None):
    result = runner.invoke(cli(), list(args), env=env)
    return result.exit_code, " ".join(result.output.split())


def test_cli_new_key_then_encrypt_the_repository(tmp_path):
    path = tmp_path / "keys" / "bedside.key"
    path.parent.mkdir()
    code, out = run("keys", "new", str(path))
    keys = load_keyring(f"file:{path}", {})
    assert code == 0 and keys is not None and f"key {keys.current_id}" in out
    assert keys.current.hex() not in out and base64.b64encode(keys.current).decode() not in out
    assert run("keys", "new", str(path))[0] == 2  # never overwritten
    assert load_keyring(f"file:{path}", {}).ids == keys.ids  # type: ignore[union-attr]

    repo = tmp_path / "repo"
    for name in ("a", "b"):
        write_config(repo / name, SCALE_CONFIG)
        scale_model(repo / name / "1" / "model.onnx")
    plain_a = (repo / "a" / "1" / "model.onnx").read_bytes()
    code, out = run("encrypt", str(repo), "--model", "a", "--key", f"file:{path}")
    assert code == 0 and "a/1: model.onnx.enc written" in out and "remove them" in out
    assert (repo / "a" / "1" / "model.onnx").exists()  # kept without --remove-plain
    code, out = run("encrypt", str(repo), "--remove-plain", env={"BEDSIDE_SECURITY_KEY": f"file:{path}"})
    assert code == 0 and "2 model file(s) encrypted" in out and "model.onnx removed" in out
    assert sorted(p.name for p in repo.glob("*/1/*")) == ["model.onnx.enc", "model.onnx.enc"]
    assert open_sealed((repo / "a" / "1" / "model.onnx.enc").read_bytes(), keys, MODEL) == plain_a
    assert stat.S_IMODE((repo / "a" / "1" / "model.onnx.enc").stat().st_mode) == 0o600
    repo_manager = manager(repo, keys)
    assert [e.state for e in repo_manager.entries()] == [State.READY, State.READY]

    assert run("encrypt", str(repo))[0] == 2  # no key given
    code, out = run("encrypt", str(repo), "--key", "env:BEDSIDE_NOT_SET_ANYWHERE")
    assert code == 2 and "is not set" in out
    code, out = run("encrypt", str(repo), "--model", "nope", "--key", f"file:{path}")
    assert code == 2 and "no model 'nope'" in out


def test_rotation_re_encrypts_models_and_journal_and_retires_the_old_key(tmp_path):
    path = tmp_path / "bedside.key"
    old = new_key()
    write_key_file(path, [old])
    spec = f"file:{path}"
    serving = load_keyring(spec, {})  # what a running server read at its start: the old key only
    assert serving is not None
    repo = tmp_path / "repo"
    for name in ("a", "b"):
        write_config(repo / name, SCALE_CONFIG)
        seal_file(scale_model(repo / name / "1" / "model.onnx"), serving).parent.joinpath("model.onnx").unlink()
    state = tmp_path / "state"
    state.mkdir()
    write_journal(state / JOURNAL_FILE, serving, MESSAGES)

    code, out = run("keys", "rotate", str(repo), "--key", spec, "--journal", str(state))
    assert code == 0, out
    rotated = load_keyring(spec, {})
    assert rotated is not None and len(rotated) == 1 and rotated.current_id != key_id(old)
    assert f"current key {rotated.current_id}" in out and "4 row(s) re-encrypted" in out
    assert old.hex() not in out and rotated.current.hex() not in out
    only_old = KeyRing([old])
    for enc in repo.glob("*/1/model.onnx.enc"):
        blob = enc.read_bytes()
        assert sealed_key_id(blob) == rotated.current_id
        with pytest.raises(SealedError, match="which the key provider does not have"):
            open_sealed(blob, only_old, MODEL)
    skipped = Skipped()
    assert list(read_rows(state / JOURNAL_FILE, 0, only_old, skipped)) == [] and skipped.rows == 4
    assert len(list(read_rows(state / JOURNAL_FILE, 0, rotated))) == 4
    # the running server's ring follows the key file: a model reloaded after the rotation opens
    assert [e.state for e in manager(repo, serving).entries()] == [State.READY, State.READY]
    assert serving.ids == rotated.ids
    assert run("keys", "rotate", str(repo), "--key", spec)[0] == 0  # again: nothing stuck half-way


def test_rotation_keeps_the_old_key_when_a_file_cannot_be_re_encrypted(tmp_path):
    path = tmp_path / "bedside.key"
    old = new_key()
    write_key_file(path, [old])
    repo = tmp_path / "repo"
    (repo / "m" / "1").mkdir(parents=True)
    (repo / "m" / "1" / "model.onnx.enc").write_bytes(seal(b"x" * 100, ring(), MODEL))  # another key's
    code, out = run("keys", "rotate", str(repo), "--key", f"file:{path}")
    assert code == 1 and "1 file(s) could not be re-encrypted" in out
    keys = load_keyring(f"file:{path}", {})
    assert keys is not None and len(keys) == 2 and keys.ids[1] == key_id(old)
    assert run("keys", "rotate", str(repo), "--key", "env:SOMETHING")[0] == 2
    assert run("keys", "rotate", str(repo), "--key", f"file:{path}", "--journal", str(tmp_path / "none"))[0] == 2


def test_journal_rows_reseal_in_place(tmp_path):
    old, new = new_key(), new_key()
    path = tmp_path / JOURNAL_FILE
    write_journal(path, KeyRing([old]), MESSAGES)
    both = KeyRing([new, old])
    assert reseal_rows(path, both) == (4, 0)
    assert reseal_rows(path, both) == (0, 0)
    assert len(list(read_rows(path, 0, KeyRing([new])))) == 4


def test_a_running_journal_writer_follows_a_rotated_key_file(tmp_path):
    path = tmp_path / "bedside.key"
    old, new = new_key(), new_key()
    write_key_file(path, [old])
    keys = load_keyring(f"file:{path}", {})
    journal = tmp_path / JOURNAL_FILE
    writer = JournalWriter(journal, "normal", keys=keys)

    async def main() -> None:
        writer.start()
        try:
            await writer.write("B1", [Observation("heart_rate", 70.0, NOW - 2)])
            write_key_file(path, [new, old])  # `keys rotate`, first step
            await writer.write("B2", [Observation("heart_rate", 71.0, NOW - 1)])
        finally:
            writer.close()

    asyncio.run(main())
    db = sqlite3.connect(journal)
    ids = [sealed_key_id(blob) for (blob,) in db.execute("SELECT value FROM observations ORDER BY rowid")]
    db.close()
    assert ids == [key_id(old), key_id(new)]


def test_optimize_refuses_an_encrypted_version_clearly(tmp_path):
    from bedside.errors import InvalidInput
    from bedside.pipeline.optimize import NotApplicable
    from bedside.pipeline.workflow import optimize_version

    repo = tmp_path / "repo"
    write_config(repo / "m", SCALE_CONFIG)
    seal_file(scale_model(repo / "m" / "1" / "model.onnx"), ring()).parent.joinpath("model.onnx").unlink()
    eval_x = {"x": np.ones((2, 4), np.float32)}
    with pytest.raises(NotApplicable) as caught:
        optimize_version(repo, "m", "int8-dynamic", eval_x, None, metric="agreement")
    assert isinstance(caught.value, InvalidInput)  # the CLI: its message on one line, exit 2
    assert str(caught.value) == (
        "model m version 1 is encrypted (model.onnx.enc): optimize a plain model, then bedside encrypt the result"
    )
