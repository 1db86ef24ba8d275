"""Pick the fastest ONNX Runtime execution provider the box has, in the model's order of preference."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnxruntime as ort

ORT_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


def available() -> list[str]:
    have = set(ort.get_available_providers())
    return [short for short, full in ORT_NAMES.items() if full in have]


def choose(preference: tuple[str, ...], cache_dir: Path | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Providers to hand to a session, best first; CPU always closes the list as the fallback."""
    have = set(available())
    chosen: list[tuple[str, dict[str, Any]]] = []
    for short in preference:
        if short in have and short != "cpu":
            chosen.append((ORT_NAMES[short], _options(short, cache_dir)))
    chosen.append((ORT_NAMES["cpu"], {}))
    return chosen


def _options(short: str, cache_dir: Path | None) -> dict[str, Any]:
    if short == "tensorrt":
        # An engine cache on disk spares a restart the minutes of rebuilding TensorRT engines.
        cache = cache_dir or Path(os.environ.get("BEDSIDE_TRT_CACHE", "~/.cache/bedside/trt")).expanduser()
        cache.mkdir(parents=True, exist_ok=True)
        return {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}
    return {}
