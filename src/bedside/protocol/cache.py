"""Answers kept for identical requests: a model's or graph's `[cache]` (off unless its config asks).

Keyed by the tenant and a BLAKE2b digest of the inputs (names, datatypes, shapes and bytes) and the
outputs asked for, so one tenant's answer is never another's: the tenant is part of the key, not of
the hash input. Bounded by entries and bytes, least recently used first out. One cache belongs to
one loaded model version or graph and is dropped with it, so a reload starts empty. Used on the event
loop only: no lock.
"""

from __future__ import annotations

from collections import OrderedDict
from hashlib import blake2b
from typing import Any

import numpy as np

from bedside.protocol.types import InferRequest

Cached = tuple[dict[str, np.ndarray], dict[str, Any]]  # outputs, and the parameters to answer with
_ENTRY_OVERHEAD = 256  # bytes per entry beyond its arrays: key, dict slots, array headers


class ResponseCache:
    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, bytes], tuple[Cached, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @staticmethod
    def key(tenant: str, request: InferRequest) -> tuple[str, bytes]:
        digest = blake2b(digest_size=20)
        for name in sorted(request.inputs):
            array = request.inputs[name]
            digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
            if array.dtype.kind == "O":
                for item in array.reshape(-1):
                    raw = item if isinstance(item, bytes) else str(item).encode()
                    digest.update(len(raw).to_bytes(8, "little"))
                    digest.update(raw)
            else:
                digest.update(np.ascontiguousarray(array).data)
        names = request.output_names()
        digest.update(b"\1" if names is None else "\0".join(sorted(names)).encode())
        return tenant, digest.digest()

    def get(self, key: tuple[str, bytes]) -> Cached | None:
        found = self._entries.get(key)
        if found is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return found[0]

    def put(self, key: tuple[str, bytes], outputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> None:
        """Keep an answer: its outputs and the parameters a hit must repeat (e.g. its provenance)."""
        size = _ENTRY_OVERHEAD + sum(_size(a) for a in outputs.values())
        if size > self.max_bytes or key in self._entries:
            return
        self._entries[key] = ((outputs, parameters), size)
        self.bytes += size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped
            self.evictions += 1

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, Any]:
        return {
            "entries": len(self._entries),
            "bytes": self.bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "max_entries": self.max_entries,
            "max_bytes": self.max_bytes,
        }


def _size(array: np.ndarray) -> int:
    if array.dtype.kind == "O":
        return int(array.nbytes) + sum(len(x) for x in array.reshape(-1) if isinstance(x, (str, bytes)))
    return int(array.nbytes)
