"""One way to turn a caller's priority, tenant and deadline into a `CallContext`, whatever the
transport: REST headers and gRPC metadata carry the same names, request parameters the same keys,
so a value refused over one protocol is refused over the other with the same words."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from bedside.dataplane.types import DEFAULT_TENANT, CallContext
from bedside.errors import Forbidden, InvalidInput
from bedside.protocol.types import Caller

TENANT_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
_PRIORITY_NAME = re.compile(r"[A-Za-z]{1,16}")
# Headers (REST) and metadata keys (gRPC) that carry the context; parameters may carry the last two.
TENANT_KEY = "x-bedside-tenant"
PRIORITY_KEY = "x-bedside-priority"
TIMEOUT_MS_KEY = "x-bedside-timeout-ms"
# as people write them (HTTP headers are case-insensitive; gRPC metadata keys are lower-case)
_SHOWN = {TENANT_KEY: "X-Bedside-Tenant", PRIORITY_KEY: "X-Bedside-Priority", TIMEOUT_MS_KEY: "X-Bedside-Timeout-Ms"}
MAX_TIMEOUT_US = 24 * 3600 * 1_000_000  # a deadline beyond a day is a mistake, not a deadline


def call_context(
    parameters: Mapping[str, Any] | None,
    *,
    tenant: str | None = None,
    priority: str | None = None,
    timeout_ms: str | None = None,
    transport: str,
    caller: Caller,
) -> CallContext:
    """`parameters` are the request's own (`priority`, `timeout` in µs); `tenant`, `priority` and
    `timeout_ms` come from headers or metadata. A value in the request body is the more specific one.
    An authenticated caller's tenant is its own: a tenant header may only repeat it."""
    params = parameters or {}
    chosen_priority = _priority(params.get("priority"), "parameter 'priority'")
    if chosen_priority is None and priority:
        chosen_priority = _priority(priority.strip(), _SHOWN[PRIORITY_KEY])
    timeout_us = _timeout_param(params.get("timeout"))
    if timeout_us is None and timeout_ms is not None:
        timeout_us = _timeout_ms(timeout_ms)
    name = DEFAULT_TENANT
    if caller.authenticated:
        name = caller.tenant
        if tenant and tenant.strip() != name:
            raise Forbidden(f"{_SHOWN[TENANT_KEY]} cannot choose a tenant: this caller's credentials set it")
    elif tenant:
        name = tenant.strip()
        if not TENANT_PATTERN.fullmatch(name):
            raise InvalidInput(f"{_SHOWN[TENANT_KEY]} must be 1-64 letters, digits, '.', '_' or '-'")
    return CallContext(name, chosen_priority, timeout_us, caller, transport)


def _priority(value: Any, where: str) -> int | str | None:
    """A level number or a level name; checked against the model's levels by the scheduler."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise InvalidInput(f"{where} must be a level number (1 = STAT) or a level name, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit() and len(text) <= 6:
            return int(text)
        if _PRIORITY_NAME.fullmatch(text):
            return text.lower()
    raise InvalidInput(f"{where} must be a level number (1 = STAT) or a level name such as stat or routine")


def _timeout_param(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_TIMEOUT_US:
        raise InvalidInput(f"parameter 'timeout' must be an integer of microseconds, 0..{MAX_TIMEOUT_US}")
    return value


def _timeout_ms(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise InvalidInput(f"{_SHOWN[TIMEOUT_MS_KEY]} must be a number of milliseconds") from None
    if not math.isfinite(value) or value < 0 or value * 1000 > MAX_TIMEOUT_US:
        raise InvalidInput(
            f"{_SHOWN[TIMEOUT_MS_KEY]} must be a finite number of milliseconds, 0..{MAX_TIMEOUT_US // 1000}"
        )
    return int(value * 1000)
