"""Where a model's weights came from, stamped into every model bedside writes.

The stamp is ONNX model metadata (`ModelProto.metadata_props`), so it travels with the file:

  bedside.provenance       trained    trained on real data
                           synthetic  trained on synthetic data (its metrics say nothing about patients)
                           untrained  random weights, for benchmarking only (its answers mean nothing)
  bedside.provenance_note  optional, one short line (e.g. the data set or the weights file)

The server reads these keys (repository index, `bedside models`, and a `provenance` parameter on
every inference answer of a version that is not `trained`); the pipeline only writes them.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from bedside.errors import InvalidInput

KEY = "bedside.provenance"
NOTE_KEY = "bedside.provenance_note"
PROVENANCES = ("trained", "synthetic", "untrained")
NOTE_MAX = 200
UNTRAINED_LINE = "UNTRAINED: random weights, for benchmarking only; its answers mean nothing"
SYNTHETIC_LINE = "SYNTHETIC: trained on synthetic data; its performance says nothing about real patients"
MEANING = {"trained": "trained on real data", "synthetic": SYNTHETIC_LINE, "untrained": UNTRAINED_LINE}


def check(provenance: str, note: str | None = None) -> None:
    """Refuse a provenance outside PROVENANCES, or a note that is not one short line."""
    if provenance not in PROVENANCES:
        raise InvalidInput(f"provenance {provenance!r} is not one of {', '.join(PROVENANCES)}")
    if note is not None and ("\n" in note or "\r" in note or len(note) > NOTE_MAX):
        raise InvalidInput(f"the provenance note must be one line of at most {NOTE_MAX} characters")


def stamp(model_bytes: bytes, provenance: str, note: str | None = None) -> bytes:
    """The same model with its provenance (and note, or none) set; any earlier stamp is replaced."""
    check(provenance, note)
    model = onnx.load_from_string(model_bytes)
    set_on(model, provenance, note)
    return model.SerializeToString()


def set_on(model: onnx.ModelProto, provenance: str, note: str | None = None) -> None:
    check(provenance, note)
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in (KEY, NOTE_KEY)]
    del model.metadata_props[:]
    for key, value in [*kept, (KEY, provenance), *([(NOTE_KEY, note)] if note else [])]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def of(model: onnx.ModelProto) -> tuple[str | None, str | None]:
    """(provenance, note) as stamped; (None, None) for a model bedside did not stamp."""
    props = {p.key: p.value for p in model.metadata_props}
    return props.get(KEY), props.get(NOTE_KEY)


def read(path: Path) -> tuple[str | None, str | None]:
    return of(onnx.load(str(path), load_external_data=False))


def card_line(provenance: str | None, note: str | None = None) -> str:
    """The provenance as a model card states it, in bold, before anything else."""
    if provenance is None:
        text = "**Provenance: not recorded.** Where these weights came from is unknown."
    elif provenance == "trained":
        text = "**Provenance: trained** (on real data)."
    else:
        text = f"**{MEANING[provenance]}.**"
    return text + (f"\n\n{note}" if note else "")
