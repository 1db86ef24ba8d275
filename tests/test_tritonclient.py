"""An existing OIP client library, unchanged, against bedside."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as httpclient
from sklearn.datasets import load_breast_cancer
from tritonclient.utils import InferenceServerException


@pytest.fixture
def triton(server):
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield client
    client.close()


def test_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("breast_mass_malignancy")
    assert not triton.is_model_ready("corrupt")
    meta = triton.get_model_metadata("breast_mass_malignancy")
    assert meta["inputs"][0]["shape"] == [-1, 30]
    assert triton.get_server_metadata()["name"] == "bedside"


@pytest.mark.parametrize("binary", [True, False])
def test_infer_with_and_without_binary_data(triton, binary):
    data = load_breast_cancer()
    x = data.data[:16].astype(np.float32)
    inp = httpclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "label")]
    result = triton.infer("breast_mass_malignancy", [inp], outputs=outputs, request_id="t-1")
    proba, label = result.as_numpy("probabilities"), result.as_numpy("label")
    assert proba.shape == (16, 2) and proba.dtype == np.float32
    assert (label == (proba[:, 1] > 0.5)).all()
    assert result.get_response()["id"] == "t-1"


def test_bytes_tensors(triton):
    values = np.array([["a", "bé", "c"], ["", "e", "f"]], dtype=object)
    inputs = []
    from bedside.protocol.datatypes import OIP_TO_NUMPY
    from tests.models import ALL_TYPES

    for name in ALL_TYPES:
        arr = values if name == "BYTES" else np.ones((2, 3), dtype=OIP_TO_NUMPY[name])
        inp = httpclient.InferInput(f"in_{name}", [2, 3], name)
        inp.set_data_from_numpy(arr, binary_data=True)
        inputs.append(inp)
    result = triton.infer("all_types", inputs, outputs=[httpclient.InferRequestedOutput("out_BYTES")])
    got = result.as_numpy("out_BYTES")
    assert [[v.decode() for v in row] for row in got] == values.tolist()


def test_errors_surface_as_client_exceptions(triton):
    x = np.zeros((1, 29), np.float32)
    inp = httpclient.InferInput("features", [1, 29], "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="expected shape"):
        triton.infer("breast_mass_malignancy", [inp])
    with pytest.raises(InferenceServerException, match="is not in the repository"):
        triton.infer("no_such_model", [inp])


def test_repository_control(triton):
    index = {m["name"]: m for m in triton.get_model_repository_index()}
    assert index["breast_mass_malignancy"]["state"] == "READY"
    triton.load_model("scale")
    assert triton.is_model_ready("scale")
