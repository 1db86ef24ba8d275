"""One ONNX Runtime session per loaded model version."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bedside.errors import ModelLoadError
from bedside.modelconfig.graph import GraphTensor
from bedside.modelconfig.model import ModelConfig
from bedside.monitoring.redact import without_paths
from bedside.protocol.datatypes import ORT_TO_OIP, numpy_dtype
from bedside.runtime import providers

ort.disable_telemetry_events()  # belt and braces with ORT_DISABLE_TELEMETRY (see bedside/__init__.py)

# Small models lose more to thread hand-offs than they gain from a second core.
_SMALL_MODEL_BYTES = 4 << 20

# Where a model's weights come from, stamped by `bedside export`/`optimize` and the demo into the
# ONNX metadata (so it travels with the file, per version). A model without the stamp (one the
# user brought) counts as trained; the others say what they are in every answer and in the index.
PROVENANCE_KEY = "bedside.provenance"
PROVENANCE_NOTE_KEY = "bedside.provenance_note"
PROVENANCES = ("trained", "synthetic", "untrained")


def graph_io(session: ort.InferenceSession) -> tuple[list[GraphTensor], list[GraphTensor]]:
    return [_graph_tensor(a, "input") for a in session.get_inputs()], [
        _graph_tensor(a, "output") for a in session.get_outputs()
    ]


def _graph_tensor(arg: ort.NodeArg, kind: str) -> GraphTensor:
    datatype = ORT_TO_OIP.get(arg.type)
    if datatype is None:
        raise ModelLoadError(
            f"graph {kind} {arg.name!r} is {arg.type}, not a tensor bedside can serve "
            "(for scikit-learn/LightGBM classifiers, export with zipmap disabled)"
        )
    shape = None if arg.shape is None else tuple(d if isinstance(d, int) and d > 0 else -1 for d in arg.shape)
    return GraphTensor(arg.name, datatype, shape)


def open_session(
    source: Path | bytes, threads: int, preference: tuple[str, ...], instances: int = 1, label: str = ""
) -> ort.InferenceSession:
    """A session for the model at `source`, a path or the model's bytes (a decrypted model is
    handed over in memory, so it never touches the disk). `label` names it in errors."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = threads or _auto_threads(
        len(source) if isinstance(source, bytes) else Path(source).stat().st_size, instances
    )
    # Spinning threads would steal the cores the event loop and other models need.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    model = source if isinstance(source, bytes) else str(source)
    name = label or (Path(source).name if not isinstance(source, bytes) else "the model")
    try:
        return ort.InferenceSession(model, sess_options=opts, providers=providers.choose(preference))
    except Exception as exc:  # ORT raises several types for corrupt or unsupported graphs
        raise ModelLoadError(f"ONNX Runtime cannot load {name}: {without_paths(_first_line(exc))}") from None


def _auto_threads(size: int, instances: int) -> int:
    """Intra-op threads for one instance, from the model's size in bytes: the box's cores split
    among the model's instances, so several instances running at once do not oversubscribe a small box."""
    if size < _SMALL_MODEL_BYTES:
        return 1
    return max(1, min(4, (os.cpu_count() or 1) // max(1, instances)))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:400]


def read_provenance(session: ort.InferenceSession) -> tuple[str, str]:
    """(provenance, note) from the model's metadata; an unknown value is a load error, since a
    mislabelled untrained model is worse than one that does not load."""
    meta = session.get_modelmeta().custom_metadata_map
    provenance = meta.get(PROVENANCE_KEY, "trained").strip().lower()
    if provenance not in PROVENANCES:
        raise ModelLoadError(
            f"model metadata {PROVENANCE_KEY}={provenance[:32]!r} is not one of {', '.join(PROVENANCES)}"
        )
    return provenance, meta.get(PROVENANCE_NOTE_KEY, "").strip()[:200]


class OnnxModel:
    """A loaded, validated model version, ready to run."""

    def __init__(self, name: str, version: int, path: Path, config: ModelConfig, session: ort.InferenceSession) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.config = config
        self.session = session
        self.output_names = [o.name for o in config.outputs]
        self.provider = session.get_providers()[0]
        self.provenance, self.provenance_note = read_provenance(session)

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        names = output_names or self.output_names
        return dict(zip(names, self.session.run(names, inputs), strict=True))

    def warm_up(self) -> None:
        spec = self.config.warmup
        if spec is None:
            return
        rng = np.random.default_rng(0)
        for batch in spec.batch_sizes if self.config.max_batch_size > 0 else (0,):
            feed = {
                t.name: _sample(self.config.full_shape(t), t.datatype, batch, spec.fill, rng)
                for t in self.config.inputs
            }
            for _ in range(spec.iterations):
                self.run(feed)


def _sample(shape: tuple[int, ...], datatype: str, batch: int, fill: str, rng: np.random.Generator) -> np.ndarray:
    dims = [batch if (i == 0 and batch) else (d if d > 0 else 1) for i, d in enumerate(shape)]
    if datatype == "BYTES":
        return np.full(dims, "", dtype=object)
    dtype = numpy_dtype(datatype)
    if fill == "random" and dtype.kind == "f":
        return rng.standard_normal(dims).astype(dtype)
    return np.zeros(dims, dtype=dtype)
