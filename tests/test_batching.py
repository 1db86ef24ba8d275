from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bedside.errors import InferenceFailed
from bedside.protocol.datatypes import OIP_TO_NUMPY
from bedside.scheduler.batching import batch_key, merge, split

NUMERIC = [d for k, d in OIP_TO_NUMPY.items() if k != "BYTES"]


@settings(max_examples=120, deadline=None)
@given(
    dtype=st.sampled_from(NUMERIC),
    inner=hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4),
    rows=st.lists(st.integers(1, 5), min_size=1, max_size=8),
    data=st.data(),
)
def test_split_of_merge_gives_each_caller_exactly_its_rows(dtype, inner, rows, data):
    parts = [
        {"x": data.draw(hnp.arrays(dtype, (n, *inner))), "m": np.full((n, 1), i, np.int64)} for i, n in enumerate(rows)
    ]
    merged = merge(parts)
    assert merged["x"].shape == (sum(rows), *inner)
    back = split(merged, rows)
    for original, got in zip(parts, back, strict=True):
        np.testing.assert_array_equal(got["x"], original["x"])
        np.testing.assert_array_equal(got["m"], original["m"])


def test_bytes_tensors_merge_and_split():
    parts = [{"s": np.array([["a"], ["b"]], dtype=object)}, {"s": np.array([["c"]], dtype=object)}]
    back = split(merge(parts), [2, 1])
    assert back[0]["s"].tolist() == [["a"], ["b"]] and back[1]["s"].tolist() == [["c"]]


def test_split_refuses_outputs_that_do_not_follow_the_batch():
    with pytest.raises(InferenceFailed, match="not one row per input row"):
        split({"y": np.zeros((1, 3))}, [2, 1])


def test_batch_key_separates_tenants_shapes_dtypes_and_outputs():
    x4 = {"x": np.zeros((2, 4), np.float32)}
    assert batch_key("a", x4, None) == batch_key("a", {"x": np.zeros((7, 4), np.float32)}, None)
    assert batch_key("a", x4, None) != batch_key("b", x4, None)
    assert batch_key("a", x4, None) != batch_key("a", {"x": np.zeros((2, 5), np.float32)}, None)
    assert batch_key("a", x4, None) != batch_key("a", {"x": np.zeros((2, 4), np.float64)}, None)
    assert batch_key("a", x4, None) != batch_key("a", x4, ["y"])
