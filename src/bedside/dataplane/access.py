"""Who may do what, decided once for every transport: credentials become a `Caller`, and each
dataplane call checks the caller's role and the model's tenants here.

The rules:
  - authentication off: one anonymous caller with every role, which sees every model (the server
    refuses to listen beyond loopback that way unless told `--insecure`);
  - authentication on: a bearer token or a client certificate names the caller; none, or one that
    names no caller, is 401 on everything but the health probes;
  - a role the call needs and the caller lacks is 403 (checked before the model is looked up, so a
    403 says nothing about which models exist);
  - a model of another tenant is 404 in exactly the words of a model that does not exist;
  - the server's own callers (the vitals scorer, the ECG windows) are `SYSTEM` and see every model.
Every refusal is also written to the audit log.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bedside.errors import Forbidden, Unauthenticated, model_not_found
from bedside.modelconfig.model import AccessSpec
from bedside.protocol.types import ANONYMOUS, SYSTEM, Caller
from bedside.security.audit import AuditLog
from bedside.security.callers import CallerRegistry, Peer
from bedside.settings import DEFAULTS

INFER, MONITOR, ADMIN, DEVICE = "infer", "monitor", "admin", "device"
DESCRIBE = (INFER, MONITOR, ADMIN)  # model metadata, config and readiness: any role but a bare device
_OPEN_ACCESS = AccessSpec()
NO_TENANT = AccessSpec(owner="")  # a model whose [access] cannot be read: no tenant is its owner


def restricted(caller: Caller) -> bool:
    """Whether the caller's tenant limits what it sees (an authenticated caller, not the server itself)."""
    return caller.authenticated and caller is not SYSTEM


class Access:
    def __init__(
        self,
        registry: CallerRegistry | None = None,
        audit: AuditLog | None = None,
        failures_per_s: int = DEFAULTS.security.audit_auth_failures_per_s,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry  # None: authentication off
        self.audit = audit
        # Anyone who reaches the port can fail to authenticate, as fast as the network allows: one
        # entry each would let them fill the disk and push real entries out of the audit buffer.
        self._failures_per_s = failures_per_s
        self._clock = clock
        self._second = 0
        self._failures = 0  # this second's
        self._unlogged: dict[tuple[str, str], int] = {}  # (transport, reason) -> failures counted, not logged

    @property
    def required(self) -> bool:
        return self.registry is not None

    def authenticate(self, authorization: str | None, peer: Peer | None, transport: str) -> Caller:
        """The caller named by an `Authorization` value ("Bearer <token>") or a verified client
        certificate; a token, when sent, is the one that counts."""
        registry = self.registry
        if registry is None:
            return ANONYMOUS
        if authorization is not None:
            scheme, _, token = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise self._refuse(transport, "the Authorization header must be 'Bearer <token>'")
            caller = registry.by_token(token.strip())
            if caller is None:
                raise self._refuse(transport, "the bearer token is not valid (unknown or revoked)")
            return caller
        if peer is not None:
            caller = registry.by_certificate(peer)
            if caller is None:
                raise self._refuse(transport, "the client certificate names no caller (not registered, or revoked)")
            return caller
        raise self._refuse(
            transport, "authentication required: send 'Authorization: Bearer <token>' or a client certificate"
        )

    def _refuse(self, transport: str, reason: str) -> Unauthenticated:
        audit = self.audit
        if audit is not None:
            second = int(self._clock())
            if second != self._second:
                for (where, why), count in self._unlogged.items():
                    audit.record("auth_failed", "", "", where, outcome="401", detail=f"{count} more: {why}")
                self._unlogged.clear()
                self._second, self._failures = second, 0
            self._failures += 1
            if self._failures <= self._failures_per_s:
                audit.record("auth_failed", "", "", transport, outcome="401", detail=reason)
            else:  # bounded: the reasons are the few fixed texts above
                key = (transport, reason)
                self._unlogged[key] = self._unlogged.get(key, 0) + 1
        return Unauthenticated(reason)

    def require(self, caller: Caller, *roles: str, transport: str = "", action: str = "") -> None:
        """Raise 403 unless the caller has one of `roles`."""
        if any(role in caller.roles for role in roles):
            return
        wanted = " or ".join(roles)
        self.denied(caller, transport, action, "", "403", f"needs role {wanted}")
        raise Forbidden(f"caller {caller.name!r} does not have the {wanted} role this needs")

    def may_feed(self, caller: Caller, bed: str, transport: str) -> None:
        """Raise 403 unless the caller is a device allowed to feed this bed."""
        self.require(caller, DEVICE, transport=transport, action="feed")
        if not caller.may_feed(bed):
            self.denied(caller, transport, "feed", "", "403", "bed not allowed for this device")
            raise Forbidden(f"caller {caller.name!r} may not feed this bed")

    def check_model(self, caller: Caller, name: str, access: AccessSpec | None, transport: str = "") -> None:
        """Raise the NotFound of a missing model unless the caller's tenant may see this one."""
        if restricted(caller) and not (access or _OPEN_ACCESS).admits(caller.tenant):
            self.denied(caller, transport, "model", name, "404", "model of another tenant")
            raise model_not_found(name)

    def require_owner(self, caller: Caller, name: str, access: AccessSpec | None, transport: str, action: str) -> None:
        """403 unless the caller's tenant owns the model: a tenant a model is shared with uses it,
        but loading and unloading it are its owner's to decide."""
        if not self.owns(caller, access):
            self.denied(caller, transport, action, name, "403", "not the owner tenant")
            raise Forbidden(f"only the tenant that owns model {name[:64]!r} may {action} it")

    def sees(self, caller: Caller, access: AccessSpec | None) -> bool:
        return not restricted(caller) or (access or _OPEN_ACCESS).admits(caller.tenant)

    def owns(self, caller: Caller, access: AccessSpec | None) -> bool:
        return not restricted(caller) or (access or _OPEN_ACCESS).owner == caller.tenant

    def denied(self, caller: Caller, transport: str, action: str, model: str, outcome: str, why: str) -> None:
        if self.audit is not None:
            self.audit.record("denied", caller.name, caller.tenant, transport, model, outcome=outcome, detail=why)

    def admin_action(self, caller: Caller, transport: str, action: str, model: str, error: Exception | None) -> None:
        if self.audit is not None:
            outcome = "ok" if error is None else str(getattr(error, "status", 500))
            self.audit.record(action, caller.name, caller.tenant, transport, model, outcome=outcome)
