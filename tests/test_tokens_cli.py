"""`bedside tokens` and `bedside certs` through the command line: a token is printed once and
works with the callers file the server reads; a revoked one no longer does; certificates issued
or registered identify their caller; every mistake is one line and exit 2."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from bedside.cli import certs, tokens
from bedside.security.callers import CallerRegistry
from bedside.security.certs import fingerprint, make_ca, make_client, peer_from_pem

runner = CliRunner()
cli = typer.Typer()  # the two groups as `bedside` registers them
cli.add_typer(tokens.app, name="tokens")
cli.add_typer(certs.app, name="certs")


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test its own state folder, the default home of the callers file."""
    for name in ("BEDSIDE_SECURITY_CALLERS_FILE", "BEDSIDE_STREAMS_STATE_DIR", "XDG_STATE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BEDSIDE_STREAMS_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def bedside(*args: str | Path) -> Result:
    return runner.invoke(cli, [str(a) for a in args], terminal_width=200)


def ok(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result: Result, text: str) -> None:
    assert result.exit_code == 2, result.output
    assert text in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_a_token_is_printed_once_and_works_with_the_callers_file(state: Path):
    result = ok(bedside("tokens", "add", "alice", "--tenant", "icu", "--role", "infer", "--role", "monitor"))
    token = result.stdout.strip()  # alone on stdout, so a script can capture it
    assert token.startswith("bst_") and "\n" not in token
    assert "cannot be shown again" in result.stderr
    path = state / "callers.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    caller = CallerRegistry(path).by_token(token)
    assert caller is not None and caller.name == "alice" and caller.tenant == "icu"
    assert caller.roles == frozenset({"infer", "monitor"}) and caller.authenticated
    assert token not in path.read_text()  # only its hash is kept


def test_a_second_token_for_a_known_caller_keeps_its_tenant_and_roles(state: Path):
    first = ok(bedside("tokens", "add", "alice", "--tenant", "icu", "--role", "infer")).stdout.strip()
    second = ok(bedside("tokens", "add", "alice")).stdout.strip()
    registry = CallerRegistry(state / "callers.json")
    assert first != second
    assert registry.by_token(first) == registry.by_token(second)
    assert registry.records["alice"].tenant == "icu" and len(registry.records["alice"].tokens) == 2


def test_list_shows_callers_and_token_ids_never_hashes(state: Path):
    ok(bedside("tokens", "add", "alice", "--tenant", "icu", "--role", "infer"))
    ok(bedside("tokens", "add", "mon-1", "--tenant", "icu", "--role", "device", "--bed", "ICU-*"))
    record = CallerRegistry(state / "callers.json").records["alice"]
    table = ok(bedside("tokens", "list")).output
    assert "alice" in table and "mon-1" in table and "ICU-*" in table and record.tokens[0]["id"] in table
    rows = {r["caller"]: r for r in json.loads(ok(bedside("tokens", "list", "--json")).output)}
    assert rows["mon-1"]["roles"] == ["device"] and rows["mon-1"]["beds"] == ["ICU-*"]
    assert rows["alice"]["tokens"] == [{"id": record.tokens[0]["id"], "created": record.tokens[0]["created"]}]
    assert rows["alice"]["certificates"] == 0
    for text in (table, json.dumps(rows)):
        assert record.tokens[0]["sha256"] not in text


def test_a_revoked_token_or_caller_no_longer_works(state: Path):
    keep = ok(bedside("tokens", "add", "alice", "--tenant", "icu", "--role", "infer")).stdout.strip()
    drop = ok(bedside("tokens", "add", "alice")).stdout.strip()
    other = ok(bedside("tokens", "add", "bob", "--tenant", "ward", "--role", "monitor")).stdout.strip()
    drop_id = drop.split("_")[1]
    assert "revoked token" in ok(bedside("tokens", "revoke", drop_id)).output
    registry = CallerRegistry(state / "callers.json")
    assert registry.by_token(drop) is None and registry.by_token(keep) is not None
    ok(bedside("tokens", "revoke", "bob"))
    registry = CallerRegistry(state / "callers.json")
    assert registry.by_token(other) is None and "bob" not in registry.records
    one_line_error(bedside("tokens", "revoke", "nobody"), "no caller or token id 'nobody'")


def test_mistakes_are_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    one_line_error(bedside("tokens", "add", "alice", "--role", "infer"), "give its --tenant and at least one --role")
    one_line_error(bedside("tokens", "add", "alice", "--tenant", "icu", "--role", "root"), "roles must be some of")
    one_line_error(bedside("tokens", "add", "a/b", "--tenant", "icu", "--role", "infer"), "caller name 'a/b'")
    one_line_error(
        bedside("tokens", "add", "alice", "--tenant", "icu", "--role", "infer", "--bed", "ICU-*"),
        "beds are given to callers with the device role only",
    )
    (tmp_path / "broken.json").write_text("{not json")
    one_line_error(bedside("tokens", "list", "--callers", tmp_path / "broken.json"), "cannot be read")
    monkeypatch.setenv("BEDSIDE_STREAMS_JOURNAL_SYNC", "sometimes")
    one_line_error(bedside("tokens", "list"), "BEDSIDE_STREAMS_JOURNAL_SYNC")


def test_the_callers_file_follows_the_settings_and_the_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("BEDSIDE_SECURITY_CALLERS_FILE", str(tmp_path / "from-env.json"))
    token = ok(bedside("tokens", "add", "alice", "--tenant", "icu", "--role", "infer")).stdout.strip()
    assert CallerRegistry(tmp_path / "from-env.json").by_token(token) is not None
    given = tmp_path / "given.json"
    token = ok(bedside("tokens", "add", "bob", "--tenant", "icu", "--role", "infer", "--callers", given)).stdout
    assert CallerRegistry(given).by_token(token.strip()) is not None
    assert "bob" not in CallerRegistry(tmp_path / "from-env.json").records


# --- certificates ---------------------------------------------------------------------------


def test_certs_init_writes_the_files_once_and_prints_the_serve_options(tmp_path: Path):
    folder = tmp_path / "pki"
    out = ok(bedside("certs", "init", folder, "--host", "box.ward.example")).output
    for name in ("ca.pem", "ca.key", "server.pem", "server.key"):
        assert (folder / name).is_file()
    assert stat.S_IMODE((folder / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((folder / "server.key").stat().st_mode) == 0o600
    assert f"--set security.tls_cert={folder.resolve() / 'server.pem'}" in out
    assert f"--set security.tls_client_ca={folder.resolve() / 'ca.pem'}" in out
    assert "box.ward.example" in out
    before = (folder / "ca.pem").read_bytes()
    one_line_error(bedside("certs", "init", folder), "--force replaces them")
    assert (folder / "ca.pem").read_bytes() == before
    ok(bedside("certs", "init", folder, "--force"))
    assert (folder / "ca.pem").read_bytes() != before


def test_certs_client_issues_and_registers_a_device(tmp_path: Path, state: Path):
    folder = tmp_path / "pki"
    ok(bedside("certs", "init", folder))
    args = ("certs", "client", folder, "mon-7", "--tenant", "icu", "--role", "device", "--bed", "ICU-*")
    out = ok(bedside(*args)).output
    pem = (folder / "mon-7.pem").read_bytes()
    assert stat.S_IMODE((folder / "mon-7.key").stat().st_mode) == 0o600
    peer = peer_from_pem(pem)
    assert peer.common_name == "mon-7" and peer.fingerprint in out
    caller = CallerRegistry(state / "callers.json").by_certificate(peer)
    assert caller is not None and caller.tenant == "icu" and caller.may_feed("ICU-3") and not caller.may_feed("WARD-2")
    one_line_error(bedside(*args), "--force replaces them")
    one_line_error(bedside("certs", "client", tmp_path / "empty", "x", "--tenant", "t", "--role", "device"), "no CA")
    ok(bedside("tokens", "revoke", peer.fingerprint))
    assert CallerRegistry(state / "callers.json").by_certificate(peer) is None


def test_certs_register_takes_a_certificate_from_the_hospital_pki(tmp_path: Path, state: Path):
    hospital = make_ca("Hospital Issuing CA")
    issued = make_client(hospital, "lab-gateway")
    issued.write(tmp_path / "lab.pem", tmp_path / "lab.key")
    ok(
        bedside(
            "certs", "register", "lab-gateway", "--cert", tmp_path / "lab.pem", "--tenant", "lab", "--role", "infer"
        )
    )
    caller = CallerRegistry(state / "callers.json").by_certificate(peer_from_pem(issued.cert_pem))
    assert caller is not None and caller.name == "lab-gateway" and caller.roles == frozenset({"infer"})
    assert CallerRegistry(state / "callers.json").records["lab-gateway"].certificates[0]["sha256"] == fingerprint(
        issued.cert
    )
    one_line_error(
        bedside(
            "certs", "register", "someone-else", "--cert", tmp_path / "lab.pem", "--tenant", "lab", "--role", "infer"
        ),
        "common name is 'lab-gateway', not 'someone-else'",
    )
    one_line_error(
        bedside("certs", "register", "x", "--cert", tmp_path / "lab.key", "--tenant", "lab", "--role", "infer"),
        "--cert is not a PEM certificate",
    )
