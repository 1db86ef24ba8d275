"""Structured pruning of PyTorch models: whole channels and neurons are removed (the tensors really
shrink), not zeroed, so the exported ONNX model is smaller and faster."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bedside.errors import BedsideError


@dataclass
class PruneResult:
    module: Any
    params_before: int
    params_after: int


def count_params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def prune_channels(module: Any, example: np.ndarray, ratio: float = 0.3, keep: list[Any] | None = None) -> PruneResult:
    """Remove `ratio` of the channels of each prunable layer by L2 magnitude. The last Linear layer
    (the classifier head) keeps its outputs unless `keep` says otherwise."""
    import torch
    import torch_pruning as tp

    if not 0.0 < ratio < 1.0:
        raise BedsideError(f"pruning ratio must be between 0 and 1, got {ratio}")
    module = module.eval()
    if keep is None:
        linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
        keep = linears[-1:]
    before = count_params(module)
    inputs = torch.from_numpy(np.ascontiguousarray(example))
    pruner = tp.pruner.MetaPruner(
        module, inputs, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio, ignored_layers=keep
    )
    pruner.step()
    return PruneResult(module, before, count_params(module))
