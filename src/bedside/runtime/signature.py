"""Admission checks of a request against a model's declared inputs, compiled once per model so the
hot path does dictionary look-ups and integer compares only."""

from __future__ import annotations

import numpy as np

from bedside.errors import InvalidInput, NonFiniteOutput, TooLarge
from bedside.modelconfig.model import ModelConfig
from bedside.protocol.datatypes import numpy_dtype, oip_datatype


class Signature:
    def __init__(self, config: ModelConfig) -> None:
        self.model = config.name
        self.max_batch = config.max_batch_size
        self.inputs = {s.name: (numpy_dtype(s.datatype), s.datatype, config.full_shape(s)) for s in config.inputs}
        self.outputs = frozenset(s.name for s in config.outputs)
        self.finite_only = not config.allow_non_finite
        self.max_elements = _max_elements(config)

    def check(self, inputs: dict[str, np.ndarray], outputs: list[str] | None) -> int:
        """Validate and return the batch size (1 for models that do not batch)."""
        if inputs.keys() != self.inputs.keys():
            missing = sorted(self.inputs.keys() - inputs.keys())
            extra = sorted(inputs.keys() - self.inputs.keys())
            parts = []
            if missing:
                parts.append(f"missing inputs {missing}")
            if extra:
                parts.append(f"unknown inputs {extra}")
            raise InvalidInput(f"model {self.model!r}: {'; '.join(parts)}; expected {sorted(self.inputs)}")
        batch = 1
        for name, array in inputs.items():
            dtype, datatype, shape = self.inputs[name]
            if array.dtype != dtype and not (dtype.kind == "O" and array.dtype.kind in "OUS"):
                raise InvalidInput(
                    f"model {self.model!r} input {name!r}: expected datatype {datatype}, got {_oip(array)}"
                )
            got = array.shape
            if len(got) != len(shape) or any(d != -1 and d != g for d, g in zip(shape, got, strict=True)):
                raise InvalidInput(
                    f"model {self.model!r} input {name!r}: expected shape {list(shape)} (-1 = any), got {list(got)}"
                )
            if self.finite_only and dtype.kind == "f" and not np.isfinite(array).all():
                raise InvalidInput(
                    f"model {self.model!r} input {name!r}: {int(array.size - np.isfinite(array).sum())} values "
                    f"are NaN or infinite (or beyond the range of {datatype}); the model takes finite numbers only"
                )
            if self.max_batch:
                batch = got[0]
                if batch > self.max_batch:
                    raise TooLarge(
                        f"model {self.model!r} input {name!r}: batch of {batch} exceeds max_batch_size {self.max_batch}"
                    )
                if batch == 0:
                    raise InvalidInput(f"model {self.model!r} input {name!r}: batch is empty")
        if outputs is not None:
            unknown = [o for o in outputs if o not in self.outputs]
            if unknown:
                raise InvalidInput(f"model {self.model!r}: unknown outputs {unknown}; it has {sorted(self.outputs)}")
        return batch

    def finite(self, outputs: dict[str, np.ndarray]) -> bool:
        """True when the outputs need no closer look: all finite, or the model allows otherwise."""
        return not self.finite_only or all(a.dtype.kind != "f" or np.isfinite(a).all() for a in outputs.values())

    def check_outputs(self, outputs: dict[str, np.ndarray]) -> None:
        """NonFiniteOutput when a float output holds NaN or Infinity and the model does not allow them."""
        if not self.finite_only:
            return
        for name, array in outputs.items():
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise NonFiniteOutput(
                    f"model {self.model!r} answered NaN or Infinity in output {name!r} for this input "
                    "(extreme input values?); no result is given"
                )


def _max_elements(config: ModelConfig) -> int | None:
    """The most input elements a valid request can carry, or None when a variable dimension (other
    than the batch) or a BYTES input leaves it open. Transports size-check bodies against it before
    decoding them, so a small compressed body cannot inflate into gigabytes of numbers."""
    total = 0
    for spec in config.inputs:
        dims = config.full_shape(spec)
        if spec.datatype == "BYTES":
            return None
        count = 1
        for i, d in enumerate(dims):
            if d == -1 and i == 0 and config.max_batch_size:
                count *= config.max_batch_size
            elif d == -1:
                return None
            else:
                count *= d
        total += count
    return total


def _oip(array: np.ndarray) -> str:
    try:
        return oip_datatype(array.dtype)
    except InvalidInput:
        return str(array.dtype)
