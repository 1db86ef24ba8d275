"""Every default of the server in one place: the HTTP and gRPC listeners, the streams, the vitals
scorer, the ECG rhythm alerts, the alert outputs and the bounds on what callers can make us hold.

Precedence, lowest first: the defaults below, `BEDSIDE_<SECTION>_<KEY>` environment variables (e.g.
`BEDSIDE_SERVER_GRPC_PORT=9001`, `BEDSIDE_ECG_ALERT_PROBABILITY=0.9`), then command-line options.
`bedside settings` shows each value and where it came from. A bad value is refused at start-up
with the setting's name and the allowed range, never half-applied.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bedside.settings.cluster import ClusterSettings
from bedside.settings.fields import _KIND, SettingsError
from bedside.settings.fields import option as _opt
from bedside.settings.formats import check_window, parse_window
from bedside.settings.paths import audit_path, callers_file, callers_path, state_dir

__all__ = [
    "ClusterSettings",
    "SettingsError",
    "audit_path",
    "callers_file",
    "callers_path",
    "parse_window",
    "state_dir",
]

ENV_PREFIX = "BEDSIDE_"


def _host_port_or_empty(value: str) -> str | None:
    return "must be HOST:PORT (port 1-65535) or empty" if value and split_host_port(value) is None else None


def _not_empty(value: str) -> str | None:
    return "must not be empty" if not value.strip() else None


@dataclass(frozen=True)
class ServerSettings:
    host: str = _opt("127.0.0.1", "interface the listeners bind; 127.0.0.1 keeps them on this box", check=_not_empty)
    http_port: int = _opt(8000, "OIP v2 REST port", 1, 65535)
    grpc_port: int = _opt(8001, "OIP v2 gRPC port (Triton's default); -1: no gRPC", -1, 65535)
    max_body_mb: int = _opt(64, "largest REST body or gRPC message, MiB (larger: 413 / RESOURCE_EXHAUSTED)", 1, 2047)
    log_level: str = _opt("info", "server log level", None, None, "debug", "info", "warning", "error")
    log_format: str = _opt("text", "server log lines: text, or json (one object a line)", None, None, "text", "json")
    keepalive_s: float = _opt(30.0, "idle HTTP keep-alive connections are closed after this", 1, 3600)
    header_timeout_s: float = _opt(
        10.0, "a request line and headers must arrive within this (slower: 408, closed)", 0.1, 600
    )
    body_timeout_s: float = _opt(
        60.0, "a request body must arrive within this after its headers (slower: 408)", 0.1, 3600
    )
    max_connections: int = _opt(
        1024, "HTTP connections (and gRPC calls) open at once; more: 503 and closed (RESOURCE_EXHAUSTED)", 1, 10**6
    )
    max_header_kb: int = _opt(64, "request line and headers together, KiB (larger: 431)", 1, 1024)
    max_headers: int = _opt(100, "headers in one request (more: 431)", 1, 10_000)
    max_bodies_mb: int = _opt(
        256, "memory all REST bodies being received may hold together, MiB (beyond: 503 + Retry-After)", 1, 65536
    )
    inline_decode_kb: int = _opt(
        256, "bodies larger than this (after decompression) are decoded off the event loop", 1, 1 << 20
    )


@dataclass(frozen=True)
class StreamsSettings:
    enabled: bool = _opt(True, "run the bedside streams (HL7 vitals, ECG, alerts)")
    mllp_host: str = _opt("", "interface of the HL7 MLLP listener; empty: the server's host")
    mllp_port: int = _opt(2575, "HL7v2/MLLP listener port for patient monitors; -1: none", -1, 65535)
    max_beds: int = _opt(2048, "beds held in memory; the least recently heard bed is forgotten beyond it", 1, 100_000)
    ack_timeout_s: float = _opt(5.0, "longest a monitor waits for its ACK before a NAK asks it to resend", 0.1, 60)
    state_dir: str = _opt(
        "",
        "folder for the observation journal, this box's secret key, the callers and the audit log; "
        "empty: $XDG_STATE_HOME/bedside",
    )
    journal: bool = _opt(True, "write accepted observations to a journal before the ACK and restore beds from it")
    journal_sync: str = _opt(
        "full",
        "full: fsync before every ACK (survives power loss); normal: survives a crash of the server",
        None,
        None,
        "full",
        "normal",
    )
    journal_max_rows: int = _opt(
        2_000_000,
        "observations the journal keeps (oldest dropped beyond): beds x vital signs x readings an hour",
        10_000,
        10**9,
    )
    monitor_timezone: str = _opt(
        "UTC", "zone of HL7 times sent without an offset: UTC or an IANA name such as Europe/Berlin", check=_not_empty
    )
    max_observation_age_s: float = _opt(
        3600.0, "observations older than this are refused with the reason (NAK), never stored unused", 60, 86400
    )
    max_clock_skew_s: float = _opt(
        300.0, "observations stamped further ahead of this box's clock are refused", 0, 86400
    )
    mllp_max_frame_kb: int = _opt(1024, "largest HL7 message over MLLP, KiB (larger: NAK, connection closed)", 1, 65536)
    mllp_max_connections: int = _opt(256, "MLLP connections open at once; more are closed at once", 1, 100_000)
    mllp_idle_timeout_s: float = _opt(300.0, "an MLLP connection silent this long is closed", 1, 86400)
    mllp_max_buffered_mb: int = _opt(
        64, "memory all unfinished MLLP frames may hold together, MiB; beyond, the largest is NAKed", 1, 4096
    )


@dataclass(frozen=True)
class ScoringSettings:
    model: str = _opt("vitals_deterioration", "model that scores each bed's last hour of vital signs")
    interval_s: float = _opt(15.0, "seconds between per-bed scorings", 0.1, 3600)
    timeout_ms: float = _opt(500.0, "longest wait for the model before a bed is scored by the rules alone", 1, 60_000)
    risk_threshold: float = _opt(0.5, "model risk at or above which an alert is raised", 0, 1)
    min_completeness: float = _opt(0.5, "share of vital signs present for the model to be asked", 0, 1)


@dataclass(frozen=True)
class ECGSettings:
    model: str = _opt("ecg_rhythm", "model that classifies each 5 s 12-lead window")
    alert_probability: float = _opt(0.8, "rhythm probability at or above which a rhythm change alerts", 0, 1)
    af_min_irregularity: float = _opt(
        0.08, "R-R coefficient of variation needed to confirm (and alert on) atrial fibrillation", 0, 10
    )
    budget_ms: float = _opt(4.0, "window-to-score latency budget reported per result", 0.01, 10_000)
    max_chunk_s: float = _opt(2.0, "longest ECG chunk one message may carry, seconds (longer: refused)", 0.01, 60)


@dataclass(frozen=True)
class AlertSettings:
    hl7_target: str = _opt(
        "", "also send every alert as HL7 ORU^R01 over MLLP to HOST:PORT; empty: no", check=_host_port_or_empty
    )
    hl7_outbox: int = _opt(10_000, "alerts held for the HL7 receiver; the oldest is dropped (counted) beyond", 1, 10**7)
    subscriber_queue: int = _opt(1024, "events held per SSE subscriber; a slow one loses its oldest", 1, 10**6)
    history: int = _opt(512, "recent alerts kept for GET /v2/alerts", 1, 10**6)
    keepalive_s: float = _opt(15.0, "SSE keep-alive comment interval", 1, 3600)


@dataclass(frozen=True)
class LimitSettings:
    max_tenants: int = _opt(1024, "distinct tenants one model version admits; more are refused (429)", 1, 10**5)
    max_tenant_stats: int = _opt(
        256, "tenants with statistics of their own per model version; the rest are counted together", 2, 10**4
    )
    max_ws_message_kb: int = _opt(1024, "largest ECG WebSocket message, KiB", 1, 65536)
    drift_window: int = _opt(2048, "input rows per model version kept in memory for drift (never exported)", 64, 10**6)
    graph_deadline_ms: float = _opt(1000.0, "a graph's deadline when its graph.toml names none, ms", 0.01, 600_000)
    graph_max_deadline_ms: float = _opt(60_000.0, "the longest deadline a graph.toml may set, ms", 1, 3_600_000)
    graph_max_steps: int = _opt(64, "steps one graph may have", 1, 4096)
    cache_max_entries: int = _opt(
        100_000, "answers one model's [cache] may keep, at most (per model version)", 1, 10**7
    )
    cache_max_mb: float = _opt(256.0, "memory one model's [cache] may use, at most, MiB", 0.001, 65_536)
    medication_max_items: int = _opt(
        256, "orders, allergies or medications one medication check's patient context may list", 1, 100_000
    )


def _key_source(value: str) -> str | None:
    kind, _, rest = value.partition(":")
    if value and (kind not in ("file", "env", "command") or not rest.strip()):
        return "must be file:PATH, env:VARIABLE or command:COMMAND, or empty"
    return None


@dataclass(frozen=True)
class SecuritySettings:
    auth: bool = _opt(
        False, "every caller must authenticate (bearer token or client certificate); off: one anonymous caller"
    )
    callers_file: str = _opt("", "callers, their tenants, roles, beds and token hashes; empty: STATE_DIR/callers.json")
    max_callers: int = _opt(10_000, "callers the callers file may hold (it is read whole, into memory)", 1, 10**6)
    tls_cert: str = _opt("", "PEM certificate chain for TLS on HTTP, gRPC and MLLP; empty: no TLS")
    tls_key: str = _opt("", "PEM private key of tls_cert")
    tls_client_ca: str = _opt("", "PEM CA that signs client certificates (mutual TLS); empty: none asked")
    client_cert: str = _opt(
        "required",
        "with tls_client_ca: required (no certificate, no connection) or optional (token callers may connect)",
        None,
        None,
        "required",
        "optional",
    )
    mllp_tls: bool = _opt(True, "MLLP over TLS when tls_cert is set (off: plain MLLP, e.g. for legacy monitors)")
    insecure: bool = _opt(False, "allow listening beyond loopback without TLS and authentication (warned loudly)")
    key: str = _opt(
        "",
        "key for files at rest (AES-256-GCM): file:PATH (owner-only), env:VARIABLE or command:COMMAND; empty: none",
        check=_key_source,
    )
    audit: bool = _opt(True, "append every inference, admin action and authentication failure to the audit log")
    audit_file: str = _opt("", "hash-chained SQLite audit log; empty: STATE_DIR/audit.sqlite")
    audit_buffer: int = _opt(
        100_000, "audit entries held in memory before the writer stores them; beyond, counted as lost", 1000, 10**7
    )
    audit_flush_ms: float = _opt(200.0, "longest an audit entry waits in memory before it is written", 1, 60_000)
    audit_auth_failures_per_s: int = _opt(
        100, "authentication failures logged one by one each second; beyond, counted in one entry", 1, 100_000
    )
    audit_retention_days: int = _opt(
        2190, "audit entries older than this are deleted (2190 days: six years); 0: kept forever", 0, 36_500
    )


@dataclass(frozen=True)
class UpdateSettings:
    url: str = _opt("", "signed update repository (TUF) the agent polls, http(s)://HOST/PATH; empty: no agent")
    root: str = _opt("", "the update repository's first root.json, the device's trust anchor (copied on first use)")
    device_id: str = _opt("", "this box's id in rollouts and reports; empty: one made up once, kept in STATE_DIR")
    groups: str = _opt("", "named rollout groups this box belongs to, comma-separated (e.g. icu,canary)")
    poll_s: float = _opt(300.0, "seconds between two checks of the update repository", 1, 86_400)
    window: str = _opt(
        "", "HH:MM-HH:MM local time when updates install (urgent: always); empty: any", check=check_window
    )
    rate_kb_s: int = _opt(0, "download rate limit, KiB/s (metadata and models together); 0: none", 0, 10**7)
    max_download_mb: int = _opt(
        2048, "largest file an update may download, MiB (a bigger target is refused)", 1, 1 << 20
    )
    watch_s: float = _opt(300.0, "a new version takes traffic under watch this long before it is kept", 0, 604_800)
    watch_max_error_rate: float = _opt(0.01, "failed / all requests under watch above this: rolled back", 0, 1)
    watch_min_requests: int = _opt(20, "requests under watch before the error rate is judged", 1, 10**9)
    max_latency_ms: float = _opt(
        100.0, "p99 latency bound of a new version when its golden file names none (checks and watch)", 0.01, 60_000
    )
    keep_versions: int = _opt(2, "versions of an updated model kept on disk, the serving one included", 1, 100)
    report_url: str = _opt("", "where this box POSTs its de-identified update health; empty: not reported")
    timeout_s: float = _opt(30.0, "network timeout of one update request", 1, 3600)


@dataclass(frozen=True)
class MonitoringSettings:
    histograms: bool = _opt(
        True, "count every request into latency histograms, per priority and tenant, and watch drift (off: counts only)"
    )
    export_k: int = _opt(10, "aggregate export: a count or histogram bin under k is merged or withheld", 1, 10**6)
    export_window_min: int = _opt(
        60, "aggregate export: its times are whole windows of this many minutes, never finer", 1, 10_080
    )
    status_interval_s: float = _opt(2.0, "the status page's live figures are pushed this often (SSE)", 0.2, 3600)
    status_alerts: int = _opt(20, "recent alerts the status page shows", 1, 1000)


def _times_of_day(value: str) -> str | None:
    """warmup.times, by the rules of dataplane.warmup_schedule.parse_times (a test holds them together)."""
    for item in filter(None, (t.strip() for t in value.split(","))):
        hh, sep, mm = item.partition(":")
        digits = hh.isascii() and hh.isdigit() and mm.isascii() and mm.isdigit() and len(hh) <= 2 and len(mm) == 2
        if not (sep and digits and int(hh) <= 23 and int(mm) <= 59):
            return f"must be times of day HH:MM, comma-separated (local time), or empty: {item!r} is not"
    return None


@dataclass(frozen=True)
class WarmupSettings:
    times: str = _opt(
        "", "HH:MM local times, comma-separated: load and exercise every model; empty: none", check=_times_of_day
    )
    keep_hot: str = _opt("", "HH:MM-HH:MM local time when idle models are kept hot; empty: never", check=check_window)
    keep_hot_idle_s: float = _opt(300.0, "in keep_hot, a model version idle this long is exercised", 1, 86_400)
    timeout_s: float = _opt(30.0, "longest one warm-up request may queue and run before it counts as failed", 0.1, 600)
    max_models: int = _opt(256, "model versions one warm-up exercises; beyond, skipped (and named so)", 1, 100_000)


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    streams: StreamsSettings = field(default_factory=StreamsSettings)
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    ecg: ECGSettings = field(default_factory=ECGSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    updates: UpdateSettings = field(default_factory=UpdateSettings)
    monitoring: MonitoringSettings = field(default_factory=MonitoringSettings)
    warmup: WarmupSettings = field(default_factory=WarmupSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)

    def replace(self, values: Mapping[str, Any]) -> Settings:
        """A copy with `section.key` values set (strings are parsed and every value checked)."""
        sections: dict[str, dict[str, Any]] = {}
        for dotted, value in values.items():
            section, key, spec = _lookup(dotted)
            sections.setdefault(section, {})[key] = _check(dotted, spec, value)
        return dataclasses.replace(
            self, **{s: dataclasses.replace(getattr(self, s), **kv) for s, kv in sections.items()}
        )

    def rows(self) -> list[tuple[str, Any, str]]:
        """(section.key, value, help) for every setting, in declaration order."""
        out = []
        for section in dataclasses.fields(self):
            for spec in dataclasses.fields(getattr(self, section.name)):
                value = getattr(getattr(self, section.name), spec.name)
                out.append((f"{section.name}.{spec.name}", value, spec.metadata["help"]))
        return out


DEFAULTS = Settings()


def env_name(dotted: str) -> str:
    return ENV_PREFIX + dotted.replace(".", "_").upper()


def from_environment(environ: Mapping[str, str], base: Settings = DEFAULTS) -> tuple[Settings, set[str]]:
    """Settings with `BEDSIDE_*` variables applied, and the names that came from there. A
    `BEDSIDE_` variable that names no setting is refused, so a typo is not silently ignored."""
    known = {env_name(name): name for name, _, _ in base.rows()}
    # paths read by the demo builder and the TensorRT cache; a client's credentials (tools.client)
    others = {"BEDSIDE_DEMO_DIR", "BEDSIDE_TRT_CACHE", "BEDSIDE_TOKEN", "BEDSIDE_TLS_CA"}
    others |= {"BEDSIDE_TLS_CLIENT_CERT", "BEDSIDE_TLS_CLIENT_KEY"}
    stray = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known and k not in others)
    if stray:
        raise SettingsError(f"unknown setting {stray[0]}; `bedside settings` lists them")
    chosen = {known[k]: v for k, v in environ.items() if k in known}
    for name, value in chosen.items():  # one at a time, so the error names the variable
        try:
            base.replace({name: value})
        except SettingsError as exc:
            raise SettingsError(f"{env_name(name)}: {exc}") from None
    return base.replace(chosen), set(chosen)


def _lookup(dotted: str) -> tuple[str, str, dataclasses.Field[Any]]:
    section, _, key = dotted.partition(".")
    sections = {f.name: f for f in dataclasses.fields(Settings)}
    if section not in sections:
        raise SettingsError(f"unknown setting {dotted!r}; sections are {', '.join(sections)}")
    kinds = {f.name: f for f in dataclasses.fields(getattr(DEFAULTS, section))}
    if key not in kinds:
        raise SettingsError(f"unknown setting {dotted!r}; {section} has {', '.join(kinds)}")
    return section, key, kinds[key]


def _check(dotted: str, spec: dataclasses.Field[Any], value: Any) -> Any:
    kind = type(spec.default)
    if isinstance(value, str) and kind is not str:
        value = _parse(dotted, kind, value.strip())
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SettingsError(f"{dotted} must be {_KIND[kind]}, got {value!r}")
    low, high, choices = spec.metadata["low"], spec.metadata["high"], spec.metadata["choices"]
    if kind in (int, float) and ((low is not None and value < low) or (high is not None and value > high)):
        raise SettingsError(f"{dotted} must be between {low:g} and {high:g}, got {value!r}")
    wanted = spec.metadata["check"] and spec.metadata["check"](value)
    if wanted:
        raise SettingsError(f"{dotted} {wanted}, got {value!r}")
    if choices and value not in choices:
        raise SettingsError(f"{dotted} must be one of {', '.join(choices)}, got {value!r}")
    return value


def split_host_port(text: str, default_host: str = "") -> tuple[str, int] | None:
    """HOST:PORT (HOST may be left out where there is a default; PORT 1-65535), or None."""
    host, _, port = text.rpartition(":")
    host = host or default_host
    if not host or not (port.isascii() and port.isdigit()) or len(port) > 5 or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def _parse(dotted: str, kind: type, text: str) -> Any:
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{dotted} must be true or false, got {text!r}")
    try:
        value = kind(text)
    except ValueError:
        raise SettingsError(f"{dotted} must be {_KIND[kind]}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise SettingsError(f"{dotted} must be a finite number, got {text!r}")
    return value
