"""In-memory form of an inference request and response, independent of the wire format."""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import numpy as np

DEFAULT_TENANT = "default"
WARMUP_TENANT = "(warm-up)"  # scheduled warm-up's requests: outside the tenant name pattern, so no caller's
ROLES = ("infer", "monitor", "admin", "device")


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated identity: its name, its tenant, its roles (`infer`: run and describe the
    tenant's models; `monitor`: statistics, alerts, beds; `admin`: load, unload, the repository;
    `device`: feed the beds matching `beds`, shell-style patterns such as "ICU-*")."""

    name: str
    tenant: str = DEFAULT_TENANT
    roles: frozenset[str] = frozenset(ROLES)
    beds: tuple[str, ...] = ("*",)
    authenticated: bool = False  # False: authentication is off and this is the one anonymous caller

    def has(self, role: str) -> bool:
        return role in self.roles

    def may_feed(self, bed: str) -> bool:
        return "device" in self.roles and any(fnmatchcase(bed, pattern) for pattern in self.beds)


ANONYMOUS = Caller("anonymous")  # every caller when authentication is off (loopback, or --insecure)
SYSTEM = Caller("system", authenticated=True)  # the server's own calls (the streams' scorer and ECG windows)


@dataclass(frozen=True, slots=True)
class CallContext:
    """Who is asking and how urgently: the caller's identity, tenant, priority and deadline.

    `priority` is a wire priority (1 = STAT .. N = routine, or a level name), resolved against the
    model's levels by the scheduler; `timeout_us` is the queue deadline (None: the level's default)."""

    tenant: str = DEFAULT_TENANT
    priority: int | str | None = None
    timeout_us: int | None = None
    caller: Caller = SYSTEM  # who asks: a transport always sets it from the credentials it was given
    transport: str = "internal"  # rest | grpc | ecg | scorer | internal: for statistics and audit


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: follow the request-wide default


@dataclass(slots=True)
class InferRequest:
    inputs: dict[str, np.ndarray]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[RequestedOutput] | None = None  # None: every output of the model
    binary_output: bool = False

    def output_names(self) -> list[str] | None:
        return None if self.outputs is None else [o.name for o in self.outputs]


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray]
    id: str | None = None
    parameters: dict[str, Any] | None = None
    finite: bool = False  # outputs known free of NaN/Infinity (checked by the scheduler), so encoders skip it
