"""The reference clinical architectures, written here in PyTorch (needs the `torch` extra).

  ecg_cnn        1D-CNN over a 12-lead ECG window at 250 Hz, 5 rhythm classes      (~0.5M params)
  vitals_lstm    LSTM forecaster: 60 steps x 8 vital signs -> next 4 steps x 8     (~2M)
  resnet18       ResNet-18 image classifier, 224x224 RGB, 1000 classes             (11.7M)
  efficientnet   EfficientNet-B0, 224x224 RGB, 1000 classes                        (5.3M)
  ner_bert       BERT-base token classifier, 128 tokens, 9 BIO labels              (~109M)
The tabular GBM is the LightGBM demo model (models/demo.py).

`build(name)` has random (seeded) weights: enough to measure latency, meaningless as answers.
`build(name, weights=FILE)` loads a state_dict saved with `torch.save(model.state_dict(), FILE)`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bedside.errors import InvalidInput


class ECGNet(nn.Module):
    def __init__(self, leads: int = 12, classes: int = 5, widths: tuple[int, ...] = (32, 64, 128, 192, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = leads
        for i, c_out in enumerate(widths):
            k = 7 if i < 2 else 5
            layers += [
                nn.Conv1d(c_in, c_out, k, stride=2, padding=k // 2, bias=False),
                nn.BatchNorm1d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, classes)

    def forward(self, ecg: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(ecg).mean(dim=2))


class VitalsLSTM(nn.Module):
    def __init__(self, vitals: int = 8, hidden: int = 384, layers: int = 2, horizon: int = 4) -> None:
        super().__init__()
        self.horizon, self.vitals = horizon, vitals
        self.lstm = nn.LSTM(vitals, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vitals * horizon)

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(window)
        return self.head(out[:, -1])


class _Basic(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class ResNet18(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        )
        blocks, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_Basic(c_in, c_out, stride), _Basic(c_out, c_out, 1)]
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(image)).mean(dim=(2, 3)))


class _MBConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = c_in * expand
        squeeze = max(1, c_in // 4)
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.SiLU()]
        layers += [
            nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.SiLU(),
        ]
        self.expand_dw = nn.Sequential(*layers)
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(mid, squeeze, 1), nn.SiLU(), nn.Conv2d(squeeze, mid, 1), nn.Sigmoid()
        )
        self.project = nn.Sequential(nn.Conv2d(mid, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand_dw(x)
        y = self.project(y * self.se(y))
        return x + y if self.residual else y


class EfficientNetB0(nn.Module):
    # (expand, channels, repeats, stride, kernel) per stage, as published by Tan & Le (2019)
    STAGES = (
        (1, 16, 1, 1, 3),
        (6, 24, 2, 2, 3),
        (6, 40, 2, 2, 5),
        (6, 80, 3, 2, 3),
        (6, 112, 3, 1, 5),
        (6, 192, 4, 2, 5),
        (6, 320, 1, 1, 3),
    )

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.SiLU())
        blocks, c_in = [], 32
        for expand, c_out, repeats, stride, kernel in self.STAGES:
            for r in range(repeats):
                blocks.append(_MBConv(c_in, c_out, expand, kernel, stride if r == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.top = nn.Sequential(nn.Conv2d(c_in, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.SiLU())
        self.fc = nn.Linear(1280, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(self.top(self.blocks(self.stem(image))).mean(dim=(2, 3)))


class _BertLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-12)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))
        self.norm2 = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + bias, dim=-1)
        x = self.norm1(x + self.out((attn @ v).transpose(1, 2).reshape(n, t, d)))
        return self.norm2(x + self.ffn(x))


class BertTokenClassifier(nn.Module):
    """BERT-base shape (12 layers, 768 wide, 12 heads, 30522-token vocabulary) with a token head."""

    def __init__(
        self,
        vocab: int = 30522,
        dim: int = 768,
        layers: int = 12,
        heads: int = 12,
        ffn: int = 3072,
        labels: int = 9,
        max_len: int = 512,
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-12)
        self.layers = nn.ModuleList(_BertLayer(dim, heads, ffn) for _ in range(layers))
        self.classifier = nn.Linear(dim, labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.norm(self.tokens(input_ids) + self.positions(positions))
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, bias)
        return self.classifier(x)


FACTORIES: dict[str, type[nn.Module]] = {
    "ecg_cnn": ECGNet,
    "vitals_lstm": VitalsLSTM,
    "resnet18": ResNet18,
    "efficientnet_b0": EfficientNetB0,
    "ner_bert": BertTokenClassifier,
}
NAMES = tuple(FACTORIES)
# What an exported reference model's tensors are called: the forward() argument names, and for the
# rhythm classifier the names the ECG stream and the demo's ecg_rhythm use (input `ecg`, output
# `probabilities`), so `bedside export --reference ecg_cnn` serves the stream without a config.
INPUT_NAMES = {"ecg_cnn": "ecg", "vitals_lstm": "window", "resnet18": "image", "efficientnet_b0": "image"}
OUTPUT_NAMES = {"ecg_cnn": ["probabilities"]}


def build(name: str, weights: Path | None = None) -> nn.Module:
    """The architecture `name`, with random weights (seeded) or those of the state_dict `weights`."""
    if name not in FACTORIES:
        raise KeyError(f"unknown reference model {name!r}; choose one of {', '.join(FACTORIES)}")
    torch.manual_seed(0)
    module = FACTORIES[name]().eval()
    if weights is not None:
        load_weights(module, weights, name)
    return module


def servable(name: str, module: nn.Module) -> nn.Module:
    """What `bedside export --reference` publishes: the rhythm classifier ends in softmax, so that it
    answers per-class probabilities (as the demo's ecg_rhythm does), which alerts and AUROC need."""
    return nn.Sequential(module, nn.Softmax(dim=1)).eval() if name == "ecg_cnn" else module


def load_weights(module: nn.Module, path: Path, name: str) -> None:
    """Load a state_dict (weights only: no code runs) that must fit `module` exactly; anything else
    is refused in one line naming what differs."""
    if not path.is_file():
        raise InvalidInput(f"--weights {path}: No such file or directory")
    fix = f"save it with torch.save(model.state_dict(), FILE) where model is bedside.models.reference.build({name!r})"
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or one that holds more than tensors (a whole module)
        text = str(exc).strip()
        reason = (
            "it holds Python objects, not only tensors"
            if "Weights only load failed" in text
            else (text.splitlines()[0][:120] if text else type(exc).__name__)
        )
        raise InvalidInput(
            f"--weights {path.name} is not a state_dict that loads as weights only ({reason}); {fix}"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidInput(f"--weights {path.name} holds a {type(state).__name__}, not a state_dict; {fix}")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        shown = ", ".join(unexpected[:3]) + (", ..." if len(unexpected) > 3 else "")
        problems.append(f"{len(unexpected)} not in {name} ({shown})")
    if reshaped:
        k = reshaped[0]
        shapes = f"{k}: {list(state[k].shape)} in the file, {list(own[k].shape)} in {name}"
        problems.append(f"{len(reshaped)} of another shape ({shapes})")
    if problems:
        raise InvalidInput(f"--weights {path.name} does not fit {name}: parameters {'; '.join(problems)}; {fix}")
    module.load_state_dict(state, strict=True)


def sample(name: str, rows: int = 2, seed: int = 0) -> np.ndarray | dict[str, np.ndarray]:
    """Random inputs of the shape `name` takes (for the export's numerical check and benchmarks)."""
    rng = np.random.default_rng(seed)
    if name == "ner_bert":
        ids = rng.integers(1000, 30000, (rows, 128)).astype(np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    shapes = {
        "ecg_cnn": (12, 1250),
        "vitals_lstm": (60, 8),
        "resnet18": (3, 224, 224),
        "efficientnet_b0": (3, 224, 224),
    }
    if name not in shapes:
        raise KeyError(f"unknown reference model {name!r}; choose one of {', '.join(FACTORIES)}")
    return rng.standard_normal((rows, *shapes[name])).astype(np.float32)
