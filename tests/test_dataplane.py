"""The protocol-neutral dataplane: the caller's context parsed the same way for every transport,
typed results, typed errors, and model contracts read from config.toml."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import tomllib

import numpy as np
import pytest

from bedside.dataplane import CallContext, Dataplane, call_context
from bedside.dataplane.dataplane import parse_version
from bedside.errors import DeadlineExceeded, InvalidInput, ModelLoadError, NotFound, Unavailable
from bedside.modelconfig.model import parse_config
from bedside.protocol.types import ANONYMOUS, InferRequest
from bedside.settings import DEFAULTS
from tests.models import SCALE_CONFIG, scale_model, write_config


@pytest.mark.parametrize(
    ("params", "headers", "want"),
    [
        ({}, {}, CallContext(caller=ANONYMOUS, transport="rest")),
        ({"priority": 1, "timeout": 2000}, {}, CallContext("default", 1, 2000, ANONYMOUS, "rest")),
        ({"priority": "STAT"}, {"priority": "3"}, CallContext("default", "stat", None, ANONYMOUS, "rest")),
        ({}, {"priority": " 2 ", "timeout_ms": "1.5", "tenant": "icu"}, CallContext("icu", 2, 1500, ANONYMOUS, "rest")),
    ],
)
def test_call_context_from_parameters_and_headers(params, headers, want):
    assert call_context(params, transport="rest", caller=ANONYMOUS, **headers) == want


@pytest.mark.parametrize(
    ("params", "headers", "match"),
    [
        ({"priority": "²"}, {}, "parameter 'priority' must be a level number"),
        ({"priority": True}, {}, "not a boolean"),
        ({"priority": 1.5}, {}, "parameter 'priority'"),
        ({}, {"priority": "٣"}, "X-Bedside-Priority"),
        ({"timeout": -1}, {}, "parameter 'timeout'"),
        ({"timeout": 10**30}, {}, "parameter 'timeout'"),
        ({}, {"timeout_ms": "inf"}, "finite number"),
        ({}, {"timeout_ms": "1e308"}, "finite number"),
        ({}, {"timeout_ms": "nan"}, "finite number"),
        ({}, {"timeout_ms": "soon"}, "number of milliseconds"),
        ({}, {"tenant": "a b"}, "X-Bedside-Tenant"),
        ({}, {"tenant": "x" * 65}, "X-Bedside-Tenant"),
    ],
)
def test_bad_context_is_invalid_input_with_the_reason(params, headers, match):
    with pytest.raises(InvalidInput, match=match):
        call_context(params, transport="grpc", caller=ANONYMOUS, **headers)


@pytest.mark.parametrize("text", ["²", "0", "-1", "1.0", "9" * 30, "v1"])
def test_versions_are_ascii_positive_integers(text):
    with pytest.raises(NotFound, match="not a positive integer"):
        parse_version(text)
    assert parse_version("12") == 12 and parse_version(None) is None and parse_version("") is None


@pytest.fixture
def dataplane(tmp_path):
    write_config(tmp_path / "scale", SCALE_CONFIG + '[contract]\nscore_output = "y"\nlabels = ["a", "b", "c", "d"]\n')
    scale_model(tmp_path / "scale" / "1" / "model.onnx", factor=2.0)
    (tmp_path / "broken" / "1").mkdir(parents=True)
    dp = Dataplane(tmp_path)
    assert not dp.ready()
    dp.start()
    yield dp
    dp.close()


def test_typed_results(dataplane):
    assert dataplane.live() and dataplane.ready()
    assert dataplane.server_metadata(ANONYMOUS).name == "bedside"
    meta = dataplane.model_metadata("scale", None, ANONYMOUS)
    assert meta.versions == ("1",) and meta.inputs[0].shape == (-1, 4) and meta.outputs[0].name == "y"
    response = asyncio.run(dataplane.infer("scale", None, InferRequest({"x": np.ones((2, 4), np.float32)})))
    assert response.model_version == "1" and response.outputs["y"].tolist() == [[2.0] * 4] * 2
    contract = dataplane.contract("scale")
    assert contract.input.name == "x" and contract.score_output == "y" and contract.labels == ("a", "b", "c", "d")
    assert contract.positive_index() == -1  # no positive class named: the last column
    rows = {(r.name, r.version): r for r in dataplane.repository_index(ANONYMOUS)}
    assert rows[("scale", "1")].state == "READY" and rows[("broken", "1")].state == "UNAVAILABLE"
    assert "tmp" not in rows[("broken", "1")].reason  # reasons name the model's files, never the host's paths
    (stats,) = dataplane.statistics("scale", None, ANONYMOUS)
    assert (
        stats.inference_count == 2
        and stats.success.count == 1
        and stats.queue_depth == {"1": 0, "2": 0, "3": 0, "overdue": 0}
    )


def test_typed_errors(dataplane):
    x = InferRequest({"x": np.ones((1, 4), np.float32)})
    with pytest.raises(NotFound, match="model 'nope' is not in the repository"):
        asyncio.run(dataplane.infer("nope", None, x))
    with pytest.raises(Unavailable, match="model 'broken' is not ready"):
        asyncio.run(dataplane.infer("broken", None, x))
    with pytest.raises(NotFound, match="has no version 7"):
        asyncio.run(dataplane.infer("scale", "7", x))
    with pytest.raises(Unavailable):
        dataplane.contract("broken")
    with pytest.raises(InvalidInput, match=r"outside 1\.\.3"):
        asyncio.run(dataplane.infer("scale", None, x, CallContext(priority=9)))
    assert issubclass(DeadlineExceeded, Unavailable)  # a 503 over REST, DEADLINE_EXCEEDED over gRPC


CONTRACT = SCALE_CONFIG + "[contract]\n"


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ('score_output = "z"', "contract.score_output 'z' is not one of the outputs"),
        ('input = "features"', "contract.input 'features' is not one of the inputs"),
        ('labels = ["a", "b"]', "2 labels but output 'y' gives 4 scores"),
        ('labels = ["a", "a", "b", "c"]', "repeats a label"),
        ('labels = ["a", "b", "c", "d"]\npositive_class = "e"', "positive_class 'e' is not one of the labels"),
        ('labels_file = "../labels.txt"', "labels_file must be a file name"),
        ('labels_file = "labels.txt"', "cannot be read"),
        ("threshold = 3", "contract takes"),
    ],
)
def test_contract_mismatch_is_a_load_time_error(extra, match, tmp_path):
    with pytest.raises(ModelLoadError, match=match):
        parse_config(tomllib.loads(CONTRACT + extra), "scale", tmp_path)


def test_labels_file_as_in_triton(tmp_path):
    (tmp_path / "labels.txt").write_text("low\nmid\n\nhigh\ntop\n")
    config = parse_config(
        tomllib.loads(CONTRACT + 'labels_file = "labels.txt"\npositive_class = "top"'), "scale", tmp_path
    )
    assert config.contract.labels == ("low", "mid", "high", "top") and config.contract.positive_class == "top"
    assert config.to_dict()["contract"]["labels"] == ["low", "mid", "high", "top"]


def test_non_string_contract_values_are_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match=r"contract\.score_output must be a name in quotes"):
        parse_config(tomllib.loads(CONTRACT + 'score_output = ["y"]'), "scale", tmp_path)


def test_without_a_contract_the_score_is_the_probabilities_output(demo_repo, tmp_path):
    shutil.copytree(demo_repo / "breast_mass_malignancy", tmp_path / "bm")
    config = tmp_path / "bm" / "config.toml"
    config.write_text(config.read_text().split("[contract]")[0].replace("breast_mass_malignancy", "bm"))
    dataplane = Dataplane(tmp_path)
    dataplane.start()
    try:
        contract = dataplane.contract("bm")
        first = dataplane.model_metadata("bm", None, ANONYMOUS).outputs[0].name
    finally:
        dataplane.close()
    assert first == "label"  # the converters put it first
    assert contract.score_output == "probabilities" and contract.labels == () and contract.positive_index() == -1


def test_the_tenant_bound_comes_from_settings(tmp_path):
    write_config(tmp_path / "scale", SCALE_CONFIG)
    scale_model(tmp_path / "scale" / "1" / "model.onnx")
    dataplane = Dataplane(tmp_path, dataclasses.replace(DEFAULTS.limits, max_tenants=2))
    dataplane.start()
    x = InferRequest({"x": np.ones((1, 4), np.float32)})
    try:
        for tenant in ("a", "b", "c", "d"):  # idle tenants are forgotten for newcomers (test_scheduler_queue)
            asyncio.run(dataplane.infer("scale", None, x, CallContext(tenant=tenant)))
        queue = dataplane._serving("scale", None, ANONYMOUS, "").queue
        assert queue.max_tenants == 2 and len(queue.in_flight) <= 2
    finally:
        dataplane.close()
