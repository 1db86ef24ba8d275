"""The edge box's packaging (packaging/): the systemd unit, its user, the OCI image recipe and the
image's health probe. Images are not built here (packaging/build-image.sh does that); every check
reads the files as systemd, podman or the server would, and names what it found."""

from __future__ import annotations

import http.server
import importlib.util
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import typer

from bedside.cli import app
from bedside.settings import DEFAULTS, SettingsError, from_environment

PACKAGING = Path(__file__).resolve().parent.parent / "packaging"
UNIT = PACKAGING / "bedside.service"
SYSUSERS = PACKAGING / "bedside.sysusers"
CONTAINERFILE = PACKAGING / "Containerfile"
HEALTHCHECK = PACKAGING / "healthcheck.py"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


# --- reading the files ------------------------------------------------------------------------


def unit_entries(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value given, in order (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"a key outside any section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit_environment(service: dict[str, list[str]]) -> dict[str, str]:
    """The variables Environment= lines set (each line holds one or more NAME=VALUE words)."""
    env: dict[str, str] = {}
    for line in service.get("Environment", []):
        for word in shlex.split(line):
            name, _, value = word.partition("=")
            env[name] = value
    return env


def containerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "the Containerfile ends inside a continued line"
    out = []
    for line in logical:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def env_instruction(rest: str) -> dict[str, str]:
    return dict(word.partition("=")[::2] for word in shlex.split(rest))


def serve_params(argv: list[str]) -> dict[str, object]:
    """Parse `bedside ARGV` as the CLI would and return serve's parameters: an option that does not
    exist raises click's NoSuchOption."""
    assert argv[0] == "serve", f"the command is not `bedside serve`: {argv}"
    command = typer.main.get_command(app)
    serve = command.commands["serve"]  # type: ignore[attr-defined]
    return dict(serve.make_context("serve", argv[1:]).params)


def check_reachable_settings(env: dict[str, str], where: str) -> None:
    """The settings these variables give are valid, and a listener beyond loopback has TLS and
    authentication (what the server itself demands unless --insecure)."""
    try:
        settings, _ = from_environment(env)
    except SettingsError as exc:  # an unknown BEDSIDE_* name or a bad value stops the server too
        pytest.fail(f"{where}: {exc}")
    security = settings.security
    if settings.server.host not in LOOPBACK and not security.insecure:
        assert security.tls_cert and security.tls_key and security.auth, (
            f"{where}: listens on {settings.server.host} without TLS and authentication; the server would refuse"
        )


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return unit_entries(UNIT.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return containerfile_instructions(CONTAINERFILE.read_text(encoding="utf-8"))


# --- the systemd unit ---------------------------------------------------------------------------

SANDBOX = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "KillSignal": "SIGTERM",
    "KillMode": "mixed",
    "Restart": "on-failure",
    "RestartPreventExitStatus": "2",
}


def test_unit_sandbox_keys(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    wrong = {key: service.get(key) for key, value in SANDBOX.items() if service.get(key) != [value]}
    assert not wrong, f"sandbox keys missing or not as expected (key: values found): {wrong}"
    assert set(service["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert service["SystemCallFilter"][0] == "@system-service", service["SystemCallFilter"]
    # the scheduler lowers routine threads with setpriority (@resources): no filter may take it away
    assert not any("@resources" in value for value in service["SystemCallFilter"]), service["SystemCallFilter"]
    assert int(service["LimitNOFILE"][0]) >= DEFAULTS.server.max_connections + DEFAULTS.streams.mllp_max_connections
    # restarts during an upgrade and after a passing failure are never refused by a start limit
    assert unit["Unit"].get("StartLimitIntervalSec") == ["0"], unit["Unit"]


def test_unit_runs_as_the_sysusers_user(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    users = [line.split() for line in SYSUSERS.read_text(encoding="utf-8").splitlines() if line.startswith("u ")]
    assert [fields[1] for fields in users] == service["User"], (users, service["User"])
    assert service.get("DynamicUser", ["no"]) == ["no"]


def test_unit_exec_start_is_a_real_serve_command(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    (exec_start,) = service["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/bin/bedside"), argv
    params = serve_params(argv[1:])
    repository = Path(str(params["repository"]))
    env = unit_environment(service)
    check_reachable_settings(env, "the unit's Environment=")
    state = Path(env["BEDSIDE_STREAMS_STATE_DIR"])
    # ProtectSystem=strict: the server may write only under its StateDirectory= (or ReadWritePaths=)
    writable = [Path("/var/lib") / d for d in " ".join(service["StateDirectory"]).split()]
    writable += [Path(p) for p in " ".join(service.get("ReadWritePaths", [])).split()]
    for needed in (repository, state):
        assert any(needed == w or w in needed.parents for w in writable), f"{needed} is not writable in {writable}"


def test_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here (Debian: the systemd package)")
    # verify wants ExecStart's program to exist: point it at this checkout's own bedside
    bedside = Path(sys.executable).with_name("bedside")
    if not bedside.exists():
        pytest.skip(f"no bedside command beside {sys.executable} to stand in for /opt/bedside/venv/bin/bedside")
    text = UNIT.read_text(encoding="utf-8")
    text, count = re.subn(r"^ExecStart=\S+", f"ExecStart={bedside}", text, flags=re.M)
    assert count == 1
    copy = tmp_path / "bedside.service"
    copy.write_text(text, encoding="utf-8")
    done = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=30)
    # unknown keys and bad values are only warnings (exit 0): any line about the unit counts
    about_unit = [line for line in done.stderr.splitlines() if copy.name in line]
    assert done.returncode == 0 and not about_unit, f"systemd-analyze verify: {done.returncode}\n{done.stderr}"


def test_sysusers_creates_the_user(tmp_path: Path) -> None:
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.skip("systemd-sysusers is not installed here (Debian: the systemd package)")
    (tmp_path / "etc").mkdir()
    done = subprocess.run([sysusers, f"--root={tmp_path}", str(SYSUSERS)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text(encoding="utf-8").splitlines()
    (entry,) = [line.split(":") for line in passwd if line.startswith("bedside:")]
    assert entry[5:] == ["/var/lib/bedside", "/usr/sbin/nologin"], entry
    assert int(entry[2]) < 1000, f"not a system user: uid {entry[2]}"


# --- the OCI image recipe ---------------------------------------------------------------------------


def test_containerfile_builds_from_a_local_base(instructions: list[tuple[str, str]]) -> None:
    args = {}
    stages: list[str] = []
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
        if word != "FROM":
            continue
        parts = rest.split()
        image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), parts[0])
        local = image == "scratch" or image in stages or image.startswith("localhost/")
        assert local, f"FROM {parts[0]} ({image}) would be pulled from a registry"
        if len(parts) == 3 and parts[1].upper() == "AS":
            stages.append(parts[2])
    assert stages, "no FROM at all"


def test_containerfile_runs_as_a_user(instructions: list[tuple[str, str]]) -> None:
    users = [rest for word, rest in instructions if word == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"USER {users[-1]}"


def test_containerfile_exposes_the_default_ports(instructions: list[tuple[str, str]]) -> None:
    exposed = {int(p.split("/")[0]) for word, rest in instructions if word == "EXPOSE" for p in rest.split()}
    expected = {DEFAULTS.server.http_port, DEFAULTS.server.grpc_port}
    assert expected <= exposed, f"EXPOSE {sorted(exposed)}, bedside's defaults are {sorted(expected)}"
    env = {k: v for word, rest in instructions if word == "ENV" for k, v in env_instruction(rest).items()}
    # a port moved by the image's own variables would no longer be the one exposed
    assert "BEDSIDE_SERVER_HTTP_PORT" not in env and "BEDSIDE_SERVER_GRPC_PORT" not in env, env


def test_containerfile_settings_and_command(instructions: list[tuple[str, str]]) -> None:
    env = {k: v for word, rest in instructions if word == "ENV" for k, v in env_instruction(rest).items()}
    bedside_env = {k: v for k, v in env.items() if k.startswith("BEDSIDE_")}
    assert bedside_env.get("BEDSIDE_SERVER_HOST") == "0.0.0.0", "inside a container it must listen beyond loopback"
    check_reachable_settings(bedside_env, "the image's ENV")
    volumes = " ".join(rest for word, rest in instructions if word == "VOLUME")
    (entrypoint,) = [rest for word, rest in instructions if word == "ENTRYPOINT"]
    (cmd,) = [rest for word, rest in instructions if word == "CMD"]
    argv = json.loads(entrypoint) + json.loads(cmd)
    assert argv[0].endswith("/bin/bedside"), argv
    params = serve_params(argv[1:])
    assert params["repository"] and str(params["repository"]) in volumes, (params["repository"], volumes)
    assert bedside_env["BEDSIDE_STREAMS_STATE_DIR"] in volumes, volumes
    assert [rest for word, rest in instructions if word == "STOPSIGNAL"] in ([], ["SIGTERM"])


def test_containerfile_healthcheck(instructions: list[tuple[str, str]]) -> None:
    checks = [rest for word, rest in instructions if word == "HEALTHCHECK"]
    assert len(checks) == 1 and " CMD " in f" {checks[0]} ", checks
    assert "/opt/bedside/healthcheck.py" in checks[0]
    copies = [rest for word, rest in instructions if word == "COPY"]
    assert any(rest.split() == ["packaging/healthcheck.py", "/opt/bedside/healthcheck.py"] for rest in copies), copies


# --- the health probe the image runs ---------------------------------------------------------------


@pytest.fixture(scope="module")
def probe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bedside_packaging_healthcheck", HEALTHCHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def answering() -> Iterator[tuple[int, list[int], list[str]]]:
    """A local HTTP server: (port, [status it answers], [paths asked])."""
    status = [200]
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(status[0])
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], status, asked
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_probe_asks_readiness(probe: ModuleType, answering: tuple[int, list[int], list[str]]) -> None:
    port, status, asked = answering
    env = {"BEDSIDE_SERVER_HOST": "0.0.0.0", "BEDSIDE_SERVER_HTTP_PORT": str(port)}
    assert probe.probe(env, timeout=5) == (True, f"http://127.0.0.1:{port}/v2/health/ready: 200")
    status[0] = 503
    ready, line = probe.probe(env, timeout=5)
    assert not ready and line.endswith(": 503"), line
    assert asked == ["/v2/health/ready", "/v2/health/ready"]


def test_probe_fails_without_a_server(probe: ModuleType) -> None:
    with socket.socket() as sock:  # a port nothing listens on once it is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ready, line = probe.probe({"BEDSIDE_SERVER_HTTP_PORT": str(port)}, timeout=5)
    assert not ready and line.startswith(f"http://127.0.0.1:{port}/v2/health/ready: "), line


def test_probe_refuses_what_the_server_refuses(probe: ModuleType) -> None:
    ready, line = probe.probe({"BEDSIDE_SERVER_HTTP_PRT": "9000"}, timeout=5)  # a typo the server would refuse
    assert not ready and "BEDSIDE_SERVER_HTTP_PRT" in line, line


def test_probe_speaks_tls_when_the_server_does(probe: ModuleType) -> None:
    url, context = probe.target({"BEDSIDE_SERVER_HOST": "::", "BEDSIDE_SECURITY_TLS_CERT": "/etc/bedside/tls/s.pem"})
    assert url == f"https://[::1]:{DEFAULTS.server.http_port}/v2/health/ready"
    assert context is not None
    url, context = probe.target({})
    assert url == f"http://{DEFAULTS.server.host}:{DEFAULTS.server.http_port}/v2/health/ready" and context is None
