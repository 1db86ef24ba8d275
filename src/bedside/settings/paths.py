"""Where this box keeps its state, and the files found there unless a setting names them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bedside.settings import SecuritySettings, Settings


def state_dir(configured: str, environ: Mapping[str, str]) -> Path:
    """Where this box keeps state between runs: the setting, else $XDG_STATE_HOME/bedside, else
    ~/.local/state/bedside. Created (owner-only) by whoever first writes there."""
    if configured:
        return Path(configured).expanduser()
    base = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "bedside"


def callers_path(settings: Settings, environ: Mapping[str, str]) -> Path:
    """The callers file: security.callers_file, else STATE_DIR/callers.json."""
    return callers_file(settings.security, state_dir(settings.streams.state_dir, environ))


def callers_file(security: SecuritySettings, state: Path) -> Path:
    """The callers file, given the state folder already found (the ingest child is handed it)."""
    return Path(security.callers_file).expanduser() if security.callers_file else state / "callers.json"


def audit_path(settings: Settings, environ: Mapping[str, str]) -> Path:
    """The audit log: security.audit_file, else STATE_DIR/audit.sqlite."""
    configured = settings.security.audit_file
    return (
        Path(configured).expanduser() if configured else state_dir(settings.streams.state_dir, environ) / "audit.sqlite"
    )
