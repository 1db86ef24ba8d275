"""Serving commands: `serve` (with its settings from defaults, BEDSIDE_* variables and options),
`settings`, and the client commands `models` and `infer`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import orjson
import typer
from rich.markup import escape
from rich.table import Column, Table

from bedside.cli.common import RepoOption, UrlOption, _call, _repository, console, fail
from bedside.settings import DEFAULTS, Settings, SettingsError, env_name, from_environment

# `serve` option (parameter name) -> (flag, setting); an option given wins over its BEDSIDE_* variable
OPTIONS = {
    "host": ("--host", "server.host"),
    "port": ("--port", "server.http_port"),
    "grpc_port": ("--grpc-port", "server.grpc_port"),
    "max_body_mb": ("--max-body-mb", "server.max_body_mb"),
    "log_level": ("--log-level", "server.log_level"),
    "mllp_port": ("--mllp-port", "streams.mllp_port"),
    "score_interval": ("--score-interval", "scoring.interval_s"),
    "streams": ("--streams/--no-streams", "streams.enabled"),
    "alerts_hl7": ("--alerts-hl7", "alerts.hl7_target"),
    "auth": ("--auth/--no-auth", "security.auth"),
    "tls_cert": ("--tls-cert", "security.tls_cert"),
    "tls_key": ("--tls-key", "security.tls_key"),
    "tls_client_ca": ("--tls-client-ca", "security.tls_client_ca"),
    "insecure": ("--insecure", "security.insecure"),
}
DEFAULT_SOURCE = "default"


def build_settings(
    environ: Mapping[str, str], options: Mapping[str, Any] | None = None, sets: Sequence[str] = ()
) -> tuple[Settings, dict[str, str]]:
    """The settings `serve` runs with: DEFAULTS <- BEDSIDE_* variables in `environ` <- `sets`
    ("section.key=value") and `options` (parameter name -> value; None: not given). Also where each
    setting came from: "default", the variable's name, the option's flag or "--set".
    SettingsError (naming the setting, and the variable or option it came from) for a bad value."""
    settings, from_env = from_environment(environ)  # errors name the variable
    sources = {dotted: env_name(dotted) if dotted in from_env else DEFAULT_SOURCE for dotted, _, _ in settings.rows()}
    chosen: dict[str, Any] = {}
    for item in sets:
        dotted, sep, value = item.partition("=")
        dotted = dotted.strip()
        if not sep or not dotted:
            raise SettingsError(f"--set wants section.key=value, got {item!r}")
        chosen[dotted] = value  # given twice: the last one counts
        sources[dotted] = "--set"
    try:
        settings = settings.replace(chosen)  # an unknown section.key is refused here
    except SettingsError as exc:
        raise SettingsError(f"--set: {exc}") from None
    for name, value in (options or {}).items():
        if value is None:
            continue
        flags, dotted = OPTIONS[name]
        on, _, off = flags.partition("/")
        flag = off if value is False and off else on
        if dotted in chosen:
            raise SettingsError(f"{dotted} is given twice: by {flag} and by --set")
        try:
            settings = settings.replace({dotted: value})
        except SettingsError as exc:
            raise SettingsError(f"{flag}: {exc}") from None
        sources[dotted] = flag
    return settings, sources


def _settings_or_exit(
    environ: Mapping[str, str], options: Mapping[str, Any] | None = None, sets: Sequence[str] = ()
) -> tuple[Settings, dict[str, str]]:
    try:
        return build_settings(environ, options, sets)
    except SettingsError as exc:
        fail(str(exc), 2)


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe(settings: Settings, repository: Path | None) -> str:
    """One line: what is served where. Names no path but the repository the user gave."""
    server, streams = settings.server, settings.streams
    # the folder's name, not its path: this line lands in the system log (no host paths there)
    where = f"repository {repository.name!r}" if repository is not None else "the demo repository"
    scheme = "https" if settings.security.tls_cert else "http"
    parts = [f"bedside serving {where} on {scheme}://{_netloc(server.host, server.http_port)}/v2"]
    if server.grpc_port >= 0:
        parts.append(f"gRPC on {_netloc(server.host, server.grpc_port)}")
    if not streams.enabled:
        parts.append("streams off")
    else:
        if streams.mllp_port >= 0:
            parts.append(f"HL7 MLLP on {_netloc(streams.mllp_host or server.host, streams.mllp_port)}")
        if settings.alerts.hl7_target:
            parts.append(f"alerts as HL7 to {settings.alerts.hl7_target}")
    security = settings.security
    if security.auth:
        parts.append("callers authenticate" + (" (mutual TLS)" if security.tls_client_ca else ""))
    if security.key:
        parts.append("encrypted models open with the configured key")
    return ", ".join(parts)


def serve(
    repository: RepoOption = None,
    host: Annotated[
        str | None,
        typer.Option(help=f"Interface to listen on. Default: {DEFAULTS.server.host}, which keeps it on this box."),
    ] = None,
    port: Annotated[int | None, typer.Option(help=f"HTTP port. Default: {DEFAULTS.server.http_port}.")] = None,
    grpc_port: Annotated[
        int | None, typer.Option(help=f"OIP v2 gRPC port; -1: no gRPC. Default: {DEFAULTS.server.grpc_port}.")
    ] = None,
    max_body_mb: Annotated[
        int | None,
        typer.Option(
            help=f"Largest request body accepted, in MiB (larger gets 413). Default: {DEFAULTS.server.max_body_mb}."
        ),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help=f"debug, info, warning or error. Default: {DEFAULTS.server.log_level}.")
    ] = None,
    mllp_port: Annotated[
        int | None,
        typer.Option(
            help=f"HL7v2/MLLP listener port for patient monitors; -1: none. Default: {DEFAULTS.streams.mllp_port}."
        ),
    ] = None,
    score_interval: Annotated[
        float | None,
        typer.Option(help=f"Seconds between per-bed vital-sign scorings. Default: {DEFAULTS.scoring.interval_s}."),
    ] = None,
    streams: Annotated[
        bool | None,
        typer.Option(
            "--streams/--no-streams",
            help="Run the bedside streams (HL7 vitals, ECG, alerts). "
            f"Default: {'on' if DEFAULTS.streams.enabled else 'off'}.",
        ),
    ] = None,
    alerts_hl7: Annotated[
        str | None,
        typer.Option(
            metavar="HOST:PORT",
            help="Also send every alert as HL7 ORU^R01 over MLLP to HOST:PORT. "
            f"Default: {DEFAULTS.alerts.hl7_target or 'none'}.",
        ),
    ] = None,
    auth: Annotated[
        bool | None,
        typer.Option(
            "--auth/--no-auth",
            help="Every caller authenticates with a bearer token (`bedside tokens`) or a client certificate "
            f"(`bedside certs`). Default: {'on' if DEFAULTS.security.auth else 'off'}.",
        ),
    ] = None,
    tls_cert: Annotated[
        str | None, typer.Option(metavar="PEM", help="Certificate chain: TLS on HTTP, gRPC and MLLP.")
    ] = None,
    tls_key: Annotated[str | None, typer.Option(metavar="PEM", help="Private key of --tls-cert.")] = None,
    tls_client_ca: Annotated[
        str | None,
        typer.Option(metavar="PEM", help="CA of client certificates: mutual TLS, the certificate names the caller."),
    ] = None,
    insecure: Annotated[
        bool | None,
        typer.Option("--insecure", help="Listen beyond loopback without TLS and authentication (refused otherwise)."),
    ] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="SECTION.KEY=VALUE",
            help="Any other setting, e.g. --set ecg.alert_probability=0.9 (repeatable; `bedside settings` lists them).",
        ),
    ] = None,
) -> None:
    """Serve every model in the repository over OIP v2 REST (KServe / Triton / MLServer clients work),
    with the bedside streams: HL7v2 vitals over MLLP, ECG over WebSocket, alerts over SSE.

    Settings: the defaults, then BEDSIDE_<SECTION>_<KEY> variables, then these options (`bedside settings`)."""
    options = {
        "host": host,
        "port": port,
        "grpc_port": grpc_port,
        "max_body_mb": max_body_mb,
        "log_level": log_level,
        "mllp_port": mllp_port,
        "score_interval": score_interval,
        "streams": streams,
        "alerts_hl7": alerts_hl7,
        "auth": auth,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "tls_client_ca": tls_client_ca,
        "insecure": insecure,
    }
    settings, _ = _settings_or_exit(os.environ, options, sets or ())
    from bedside.server.run import StartupError, check_ports, check_security
    from bedside.server.run import serve as run_server

    try:
        check_security(settings)  # TLS files, the callers file, and no open port on the ward without them
        check_ports(settings)  # before the demo is built or a model loaded: a taken port fails in a second
    except StartupError as exc:
        fail(f"bedside cannot start: {exc}", 1)
    root = _repository(repository)

    console.print(escape(describe(settings, repository)), soft_wrap=True)
    try:
        run_server(root, settings)
    except StartupError as exc:
        fail(f"bedside cannot start: {exc}", 1)


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return '""' if value == "" else str(value)


def show_settings(
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON, for scripts.")] = False,
) -> None:
    """List every server setting: its value, where it came from (default or BEDSIDE_* variable), what it does."""
    current, sources = _settings_or_exit(os.environ)
    rows = [
        {"setting": dotted, "value": value, "source": sources[dotted], "env": env_name(dotted), "help": text}
        for dotted, value, text in current.rows()
    ]
    if as_json:
        typer.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return
    table = Table(
        "setting",
        "value",
        "from",
        "what it does",
        title="bedside settings",
        caption="set one with BEDSIDE_<SECTION>_<KEY>, e.g. BEDSIDE_SERVER_GRPC_PORT=9001, "
        "or `bedside serve --set section.key=value`",
    )
    for row in rows:
        style = "bold" if row["source"] != DEFAULT_SOURCE else "dim"
        table.add_row(
            row["setting"],
            f"[{style}]{escape(_shown(row['value']))}[/{style}]",
            row["source"],
            escape(row["help"]),
        )
    console.print(table)


def models(
    url: UrlOption = "http://127.0.0.1:8000",
    repository: Annotated[
        Path | None,
        typer.Option("--repository", "-r", help="Check a repository folder offline instead of asking a server."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON, for scripts.")] = False,
) -> None:
    """List models with their versions and state (READY / UNAVAILABLE and why)."""
    if repository is not None:
        from bedside.dataplane import Dataplane
        from bedside.protocol.types import SYSTEM

        dataplane = Dataplane(_repository(repository))  # a missing folder: one line, exit 2
        try:
            dataplane.start()
            rows = [row.to_dict() for row in dataplane.repository_index(SYSTEM)]  # offline: this box's operator
        finally:
            dataplane.close()
    else:
        from bedside.tools.client import Client

        rows = _call(lambda: Client(url).request("POST", "/v2/repository/index", {}))
    if as_json:
        typer.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return
    # a weights column only when some version is trained on synthetic data or not at all
    flagged = any(row.get("provenance") not in (None, "trained") for row in rows)
    # names never wrap or shorten (they are what the user types next); the reason column wraps instead
    table = Table(
        Column("model", no_wrap=True), "version", "state", "provider", *(("weights",) if flagged else ()), "reason"
    )
    for row in rows:
        style = "green" if row.get("state") == "READY" else "red"
        weights = row.get("provenance") or ""
        cells = [
            escape(row["name"]),
            escape(row.get("version", "-")),
            f"[{style}]{escape(row.get('state', ''))}[/{style}]",
            (row.get("provider") or "").replace("ExecutionProvider", ""),
        ]
        if flagged:
            cells.append("" if weights in ("", "trained") else f"[yellow]{escape(weights)}[/yellow]")
        table.add_row(*cells, escape(row.get("reason", "")))
    console.print(table)


def infer(
    model: Annotated[str, typer.Argument(help="Model name.")],
    data: Annotated[
        str, typer.Option("--data", "-d", help='Rows as JSON, e.g. "[[1.0, 2.0, ...]]", for a model with one input.')
    ] = "",
    input_file: Annotated[Path | None, typer.Option("--npy", help="A .npy file for a model with one input.")] = None,
    version: Annotated[str | None, typer.Option(help="Model version (default: latest ready).")] = None,
    url: UrlOption = "http://127.0.0.1:8000",
) -> None:
    """Send one inference request and print the result."""
    from bedside.protocol.datatypes import numpy_dtype
    from bedside.tools.client import Client

    client = Client(url)
    meta = _call(lambda: client.request("GET", f"/v2/models/{model}"))
    if len(meta["inputs"]) != 1:
        fail(f"{model} takes {len(meta['inputs'])} inputs; use a client library for that", 2)
    spec = meta["inputs"][0]
    if input_file is not None and data:
        fail("give --data or --npy, not both", 2)
    if input_file is not None:
        array = np.load(input_file, allow_pickle=False)
    elif data:
        array = _rows(data, spec)
    else:
        fail("give --data or --npy", 2)
    dtype = numpy_dtype(spec["datatype"])
    if spec["datatype"] != "BYTES" and array.dtype.kind not in "biuf":
        fail(f"{model} takes {spec['datatype']} numbers; the values given are {array.dtype.name}", 2)
    array = array.astype(dtype)
    result = _call(lambda: client.infer(model, {spec["name"]: array}, version))
    console.print_json(orjson.dumps(result).decode())


def _rows(data: str, spec: dict[str, Any]) -> np.ndarray:
    """--data as an array: valid JSON, numbers (or strings for BYTES), rows of one length."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        fail(f"--data is not valid JSON: {exc}", 2)
    try:
        array = np.asarray(value)
    except ValueError:  # numpy refuses ragged nesting
        fail("--data rows have different lengths; every row needs one value per feature", 2)
    if array.dtype == object:
        fail("--data rows have different lengths or mix numbers with other values", 2)
    if spec["datatype"] != "BYTES" and array.dtype.kind not in "biuf":
        sample = next((v for v in array.ravel() if not isinstance(v, (int, float))), array.ravel()[0])
        fail(f"--data holds {str(sample)[:40]!r}, not a number; {spec['name']} is {spec['datatype']}", 2)
    return array
