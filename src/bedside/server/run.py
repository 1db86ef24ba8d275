"""Start the server: one process, one event loop for REST, gRPC and the streams, worker threads per
model (no process hop). Only the HL7 ingest runs in a child process (see streams.ingest)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import signal
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from bedside.dataplane import Dataplane
from bedside.dataplane.access import Access
from bedside.dataplane.warmup import WarmupTask, start_warmup
from bedside.errors import BedsideError
from bedside.monitoring import redact
from bedside.security.audit import AuditLog
from bedside.security.callers import CallerRegistry, CallersError
from bedside.security.keys import KeyProviderError, KeyRing, load_keyring
from bedside.security.tls import TLSConfigError, grpc_credentials_args, server_context
from bedside.server.connections import PeerWebSocketProtocol, protocol_for
from bedside.server.rest import App
from bedside.server.status import StatusBoard
from bedside.settings import SecuritySettings, Settings, audit_path, callers_path, state_dir
from bedside.streams.mllp_auth import listener_security
from bedside.streams.service import Streams
from bedside.updates.agent import UpdateAgent

log = logging.getLogger("bedside.server")


class StartupError(Exception):
    """The server cannot start as configured (a port is taken, ...); the message says why."""


# What each listener is, and the option that moves it: a taken port names the fix.
_LISTENERS = {
    "HTTP": "--port (make run PORT=...)",
    "gRPC": "--grpc-port, -1 for none (make run GRPC_PORT=...)",
    "HL7 MLLP": "--mllp-port, -1 for none (make run MLLP_PORT=...)",
}


def _bind(host: str, port: int, what: str = "HTTP") -> socket.socket:
    """A listening socket's bind, here so a taken port is a clear start-up error, not uvicorn's exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):  # the address is wrong
            fix = " (not an address of this machine); choose another with --host"
        else:
            taken = " (another bedside or another server uses it)" if exc.errno == errno.EADDRINUSE else ""
            fix = f"{taken}; choose another with {_LISTENERS[what]}"
        raise StartupError(f"{what} cannot listen on {host}:{port}: {exc.strerror or exc}{fix}") from None
    return sock


def check_ports(settings: Settings) -> None:
    """Raise StartupError if a port the server will listen on is taken, before anything slow
    (building the demo, loading models) is done. The listeners bind again for real at start."""
    server, streams = settings.server, settings.streams
    wanted = [("HTTP", server.host, server.http_port)]
    if server.grpc_port >= 0:
        wanted.append(("gRPC", server.host, server.grpc_port))
    if streams.enabled and streams.mllp_port >= 0:
        wanted.append(("HL7 MLLP", streams.mllp_host or server.host, streams.mllp_port))
    ports = [port for _, _, port in wanted if port]
    if len(set(ports)) != len(ports):
        raise StartupError(
            "two listeners are given the same port: " + ", ".join(f"{what} {port}" for what, _, port in wanted)
        )
    for what, host, port in wanted:
        _bind(host, port, what).close()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may well be the ward network's


def check_security(settings: Settings) -> None:
    """Raise StartupError for TLS files that cannot serve, a callers file that cannot be read, a key
    that cannot be had, or a listener beyond loopback without TLS and authentication (unless
    `security.insecure`, which is then warned about on every start)."""
    security, server, streams = settings.security, settings.server, settings.streams
    try:
        tls = server_context(security) is not None
        if security.auth:
            registry = CallerRegistry(callers_path(settings, os.environ), security.max_callers)
            if not registry.records:
                raise StartupError(
                    "authentication is on but no caller is registered, so every request would be refused; "
                    "add one with `bedside tokens add NAME --tenant T --role R` (or `bedside certs client`)"
                )
        if streams.enabled and streams.mllp_port >= 0:
            listener_security(security, state_dir(streams.state_dir, os.environ))  # monitors must be identifiable
    except (TLSConfigError, CallersError) as exc:
        raise StartupError(str(exc)) from None
    mllp_host = streams.mllp_host or server.host
    mllp_open = streams.enabled and streams.mllp_port >= 0 and not is_loopback(mllp_host)
    open_ports = []
    if not is_loopback(server.host) and not (tls and security.auth):
        open_ports.append("HTTP and gRPC")
    if mllp_open and not (tls and security.mllp_tls and security.auth):
        open_ports.append("HL7 MLLP")
    if open_ports:
        exposed = " and ".join(open_ports)
        if not security.insecure:
            raise StartupError(
                f"{exposed} would listen beyond this box without TLS and authentication, open to anyone on the "
                "network: give --tls-cert, --tls-key and --auth (see `bedside certs`, `bedside tokens`), "
                "or --insecure to accept that risk"
            )
        log.warning(
            "INSECURE: %s listen beyond this box without TLS and authentication (security.insecure); "
            "anyone on the network can read results and feed beds",
            exposed,
        )


def build_access(settings: Settings) -> tuple[Access, AuditLog | None]:
    """Who may do what (the callers file when authentication is on) and the audit log, started."""
    security = settings.security
    registry = CallerRegistry(callers_path(settings, os.environ), security.max_callers) if security.auth else None
    audit = None
    if security.audit:
        audit = AuditLog(
            audit_path(settings, os.environ),
            buffer_max=security.audit_buffer,
            flush_ms=security.audit_flush_ms,
            retention_days=security.audit_retention_days,
        )
        audit.start()
    return Access(registry, audit, security.audit_auth_failures_per_s), audit


def serve(repository: Path, settings: Settings) -> None:
    server = settings.server
    redact.install(server.log_level, server.log_format)
    runner = asyncio.run
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # not on Linux/macOS: the standard loop
        pass
    runner(_serve(repository, settings))


class _HTTPServer(uvicorn.Server):
    """uvicorn, except that SIGINT/SIGTERM only ask it to stop: uvicorn would re-raise the signal
    when `serve` returns and end the process before gRPC, the streams and the model workers are
    shut down in order (systemd and docker stop send SIGTERM)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


async def _serve(repository: Path, settings: Settings) -> None:
    server, security = settings.server, settings.security
    try:
        access, audit = build_access(settings)
    except OSError as exc:
        where = "security.audit_file" if security.audit_file else "in the state folder, streams.state_dir"
        raise StartupError(f"the audit log cannot be opened ({where}): {exc.strerror or exc}") from None
    try:
        keys = load_keyring(security.key, os.environ)
    except KeyProviderError as exc:
        raise StartupError(str(exc)) from None
    dataplane = Dataplane(repository, settings.limits, access, keys=keys, histograms=settings.monitoring.histograms)
    streams = Streams(dataplane, settings, keys=keys) if settings.streams.enabled else None
    board = StatusBoard(dataplane, streams, settings.monitoring)
    app = App(dataplane, server, streams, board)
    http = _HTTPServer(
        uvicorn.Config(
            app,
            host=server.host,
            port=server.http_port,
            http=protocol_for(server),  # httptools, with read timeouts and bounds (server.connections)
            lifespan="off",  # started and stopped here, beside gRPC
            access_log=False,  # no per-request logging on the hot path
            log_config=None,  # uvicorn's loggers go through ours, which withholds exception messages
            log_level=server.log_level,
            timeout_keep_alive=int(server.keepalive_s),
            ws_max_size=settings.limits.max_ws_message_kb << 10,
            ws_per_message_deflate=False,  # float32 ECG samples barely compress; deflate cost CPU on every chunk
            ws=PeerWebSocketProtocol,  # the client certificate in the scope, as for HTTP
            ssl_certfile=_expanded(security.tls_cert),
            ssl_keyfile=_expanded(security.tls_key),
            ssl_ca_certs=_expanded(security.tls_client_ca),
            ssl_cert_reqs=_client_cert_mode(security),
        )
    )
    # Every listener first, so a taken port ends the start at once; then the models load beside
    # the listening server (liveness answers at once, readiness when the models are in).
    sock = _bind(server.host, server.http_port)
    grpc_server = None
    loading: asyncio.Future[None] | None = None
    agent: UpdateAgent | None = None
    warmup: WarmupTask | None = None
    try:
        if streams is not None:
            try:
                await streams.start()
            except OSError as exc:  # e.g. the MLLP port is taken: say so and do not start half a server
                fix = f"; choose another with {_LISTENERS['HL7 MLLP']}" if exc.errno == errno.EADDRINUSE else ""
                raise StartupError(f"streams: {exc}{fix}") from None
        if server.grpc_port >= 0:
            from bedside.server.grpc import start_grpc_server

            try:
                grpc_server = await start_grpc_server(
                    dataplane,
                    server.host,
                    server.grpc_port,
                    server.max_body_mb << 20,
                    server.keepalive_s,
                    server.max_connections,
                    server.inline_decode_kb << 10,
                    grpc_credentials_args(security),
                )
            except OSError as exc:
                raise StartupError(f"gRPC: {exc}; choose another with {_LISTENERS['gRPC']}") from None
        agent = _update_agent(repository, settings, dataplane, keys, audit)  # before loading: it cleans up
        loading = asyncio.get_running_loop().run_in_executor(None, dataplane.start)
        loading.add_done_callback(_report_loading)
        if agent is not None:
            board.updates = agent.reporter.status
            loading.add_done_callback(lambda _: agent.start())
        warmup = start_warmup(dataplane, settings.warmup)  # None unless warmup.times or keep_hot is set
        await http.serve(sockets=[sock])
    finally:
        sock.close()
        if warmup is not None:
            await warmup.stop()  # before the models' workers are closed under it
        if grpc_server is not None:
            await grpc_server.stop(1.0)
        if streams is not None:
            await streams.close()
        if loading is not None:
            with contextlib.suppress(Exception):  # already reported by _report_loading
                await loading
        if agent is not None:
            agent.stop()
        dataplane.close()
        if audit is not None:
            audit.close()  # what is still in memory is written before the process ends


def _update_agent(
    repository: Path, settings: Settings, dataplane: Dataplane, keys: KeyRing | None, audit: AuditLog | None
) -> UpdateAgent | None:
    """The over-the-air update agent when updates.url is set; it starts once the models are in."""
    if not settings.updates.url:
        return None
    state = state_dir(settings.streams.state_dir, os.environ) / "updates"
    try:
        return UpdateAgent(settings.updates, state, repository, keys=keys, audit=audit, lifecycle=dataplane.lifecycle)
    except BedsideError as exc:
        raise StartupError(f"updates: {exc.message}") from None


def _expanded(path: str) -> str | None:
    """A TLS file setting as uvicorn needs it: ~ expanded, as security.tls checked it; None: unset."""
    return str(Path(path).expanduser()) if path else None


def _client_cert_mode(security: SecuritySettings) -> int:
    if not security.tls_client_ca:
        return ssl.CERT_NONE
    return ssl.CERT_REQUIRED if security.client_cert == "required" else ssl.CERT_OPTIONAL


def _report_loading(loading: asyncio.Future[None]) -> None:
    if not loading.cancelled() and loading.exception() is not None:
        error = loading.exception()
        log.error("loading the repository failed (%s); the server stays not ready", type(error).__name__)
