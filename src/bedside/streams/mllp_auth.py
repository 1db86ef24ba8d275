"""Who may feed beds over MLLP: TLS for the listener, and with security.auth on, a device caller
identified by its client certificate, feeding only the beds its patterns allow.

A monitor's connection stays open for days, so the device is looked up again for every message
(a dict lookup; the callers file is re-read at most once a second when it changes): revoking a
certificate with `bedside tokens revoke` stops a connected monitor within a second, not at its
next reconnect.

The ingest child imports this module always, but TLS (cryptography) and the callers file (which
brings numpy with the protocol types) only when the settings ask for them: ~250 ms and ~25 MB
the child does not spend on a box that serves plain MLLP.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bedside.settings import SecuritySettings, callers_file

if TYPE_CHECKING:
    from bedside.protocol.types import Caller
    from bedside.security.callers import Peer

    Identify = Callable[[Peer], Caller | None]  # a verified certificate's caller (CallerRegistry.by_certificate)

NO_CERTIFICATE = "MLLP needs a device client certificate when security.auth is on"
UNKNOWN_CERTIFICATE = "the client certificate is not registered to any caller"
NOT_A_DEVICE = "the client certificate's caller has no device role"
BED_NOT_ALLOWED = "bed not allowed for this device"


@dataclass(frozen=True)
class ListenerSecurity:
    """The MLLP listener's TLS context (None: plain TCP) and, with authentication on, how a
    verified client certificate names its caller (None: authentication off, any bed may be fed)."""

    ssl: ssl.SSLContext | None = None
    identify: Identify | None = None

    def peer(self, ssl_object: Any) -> Peer | None:
        """The verified client certificate of a connection (its "ssl_object"), if any."""
        if self.ssl is None or ssl_object is None:
            return None
        from bedside.security.tls import peer_of  # imported once TLS is on (see the module's docstring)

        return peer_of(ssl_object)

    def device(self, peer: Peer | None) -> tuple[Caller | None, str]:
        """(the device caller, "") or (None, why it may not feed any bed)."""
        if self.identify is None:
            return None, ""
        if peer is None:
            return None, NO_CERTIFICATE
        caller = self.identify(peer)
        if caller is None:
            return None, UNKNOWN_CERTIFICATE
        if not caller.has("device"):
            return None, NOT_A_DEVICE
        return caller, ""


OPEN = ListenerSecurity()  # no TLS, no authentication: the listener as it was before TLS


def callers_path(security: SecuritySettings, state: Path | None) -> Path | None:
    """security.callers_file, else the state folder's callers.json; None when neither is known."""
    if state is None and not security.callers_file:
        return None
    return callers_file(security, state or Path("."))


def listener_security(security: SecuritySettings, state: Path | None) -> ListenerSecurity:
    """What the security settings ask of the MLLP listener. TLSConfigError (or CallersError, a
    ValueError too) when they cannot be met: refused at start-up, because with authentication on
    and no way to identify a monitor, every monitor would be refused one message at a time."""
    if not security.auth and not (security.mllp_tls and security.tls_cert):
        return OPEN
    from bedside.security.callers import CallerRegistry
    from bedside.security.tls import TLSConfigError, server_context

    context = server_context(security) if security.mllp_tls else None
    if not security.auth:
        return ListenerSecurity(context)
    if context is None or context.verify_mode == ssl.CERT_NONE:
        raise TLSConfigError(
            "security.auth is on, but monitors on MLLP are identified only by a client certificate: set "
            "security.tls_cert, security.tls_key and security.tls_client_ca with security.mllp_tls on, "
            "or turn MLLP off (streams.mllp_port=-1)"
        )
    path = callers_path(security, state)
    if path is None:
        raise TLSConfigError("security.auth needs the callers file: set security.callers_file or streams.state_dir")
    return ListenerSecurity(context, CallerRegistry(path, security.max_callers).by_certificate)
