"""Merge requests into one batch along the first dimension and split the results back.

Only requests with the same key are merged: same tenant (a batch never mixes two tenants' data),
same input names, datatypes and non-batch dimensions, and the same requested outputs.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from bedside.errors import InferenceFailed


def batch_key(tenant: str, inputs: dict[str, np.ndarray], outputs: list[str] | None) -> Hashable:
    return (
        tenant,
        tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(inputs.items())),
        None if outputs is None else tuple(outputs),
    )


def merge(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}


def split(outputs: dict[str, np.ndarray], rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
    if len(rows) == 1:
        return [outputs]
    total = sum(rows)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise InferenceFailed(
                f"output {name!r} has shape {list(array.shape)}, not one row per input row ({total}); "
                "a model whose outputs do not follow the batch must set max_batch_size = 0"
            )
    results = []
    start = 0
    for n in rows:
        results.append({name: array[start : start + n] for name, array in outputs.items()})
        start += n
    return results
