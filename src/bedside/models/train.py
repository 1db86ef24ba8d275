"""Short training runs for the reference models that have (synthetic) labelled data."""

from __future__ import annotations

from typing import Any

import numpy as np

from bedside.synthetic.ecg import dataset


def train_ecg_cnn(
    train: int = 2000, epochs: int = 3, seed: int = 0, batch: int = 64
) -> tuple[Any, float, tuple[np.ndarray, np.ndarray]]:
    """Train the ECG 1D-CNN on SYNTHETIC 12-lead windows; return (model, held-out accuracy, held-out set)."""
    import torch

    from bedside.models.reference import build

    torch.manual_seed(seed)
    x, y = dataset(train + train // 4, seed=seed)
    x_tr, y_tr, x_te, y_te = x[:train], y[:train], x[train:], y[train:]
    model = build("ecg_cnn").train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    for _ in range(epochs):
        order = torch.randperm(len(xt))
        for i in range(0, len(xt), batch):
            idx = order[i : i + batch]
            optimizer.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    return model, accuracy, (x_te, y_te)
