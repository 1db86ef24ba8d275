from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnx
import pytest

from bedside.dataplane import Dataplane
from bedside.errors import InvalidInput, ModelLoadError, NotFound, TooLarge, Unavailable
from bedside.protocol.types import ANONYMOUS, InferRequest
from tests.models import SCALE_CONFIG, scale_model, write_config


def make_repo(root: Path) -> Path:
    write_config(root / "scale", SCALE_CONFIG)
    scale_model(root / "scale" / "1" / "model.onnx", factor=2.0)
    (root / "corrupt" / "1").mkdir(parents=True)
    (root / "corrupt" / "1" / "model.onnx").write_bytes(b"garbage")
    (root / "empty").mkdir()
    write_config(root / "badconfig", "max_batch_size = 'many'")
    scale_model(root / "badconfig" / "1" / "model.onnx")
    return root


def infer(engine: Dataplane, name: str, x: np.ndarray, version: str | None = None):
    return asyncio.run(engine.infer(name, version, InferRequest({"x": x})))


def load(engine: Dataplane, name: str) -> None:
    asyncio.run(engine.load(name, ANONYMOUS))


@pytest.fixture
def engine(tmp_path):
    eng = Dataplane(make_repo(tmp_path))
    eng.start()
    yield eng
    eng.close()


def states(engine: Dataplane) -> dict[str, tuple[str, str]]:
    return {f"{r.name}/{r.version or '-'}": (r.state, r.reason) for r in engine.repository_index(ANONYMOUS)}


def test_broken_models_are_unavailable_with_reasons_and_others_serve(engine):
    rows = states(engine)
    assert rows["scale/1"] == ("READY", "")
    assert rows["corrupt/1"][0] == "UNAVAILABLE" and "ONNX Runtime cannot load model.onnx" in rows["corrupt/1"][1]
    assert rows["empty/-"][0] == "UNAVAILABLE" and "no version folders" in rows["empty/-"][1]
    assert rows["badconfig/-"][0] == "UNAVAILABLE" and "max_batch_size must be an integer" in rows["badconfig/-"][1]
    out = infer(engine, "scale", np.ones((2, 4), np.float32))
    np.testing.assert_array_equal(out.outputs["y"], np.full((2, 4), 2.0, np.float32))
    with pytest.raises(Unavailable, match="corrupt"):
        infer(engine, "corrupt", np.ones((1, 4), np.float32))
    with pytest.raises(NotFound, match="model 'nope' is not in the repository"):
        infer(engine, "nope", np.ones((1, 4), np.float32))


def test_request_checks(engine):
    with pytest.raises(InvalidInput, match=r"expected shape \[-1, 4\] \(-1 = any\), got \[2, 5\]"):
        infer(engine, "scale", np.ones((2, 5), np.float32))
    with pytest.raises(InvalidInput, match="expected datatype FP32, got FP64"):
        infer(engine, "scale", np.ones((2, 4), np.float64))
    with pytest.raises(TooLarge, match="batch of 9 exceeds max_batch_size 8"):
        infer(engine, "scale", np.ones((9, 4), np.float32))


def test_new_version_loads_and_latest_wins(engine, tmp_path):
    scale_model(tmp_path / "scale" / "2" / "model.onnx", factor=3.0)
    load(engine, "scale")  # latest = 1 policy: v2 replaces v1
    assert infer(engine, "scale", np.ones((1, 4), np.float32)).outputs["y"][0, 0] == 3.0
    assert infer(engine, "scale", np.ones((1, 4), np.float32)).model_version == "2"
    with pytest.raises(NotFound, match="no version 1"):
        infer(engine, "scale", np.ones((1, 4), np.float32), "1")


def test_a_failed_reload_keeps_the_serving_version(engine, tmp_path):
    (tmp_path / "scale" / "2").mkdir()
    (tmp_path / "scale" / "2" / "model.onnx").write_bytes(b"truncated download")
    with pytest.raises(ModelLoadError, match=r"still serving versions \[1\]"):
        load(engine, "scale")
    assert infer(engine, "scale", np.ones((1, 4), np.float32)).model_version == "1"


def test_unload_then_load(engine):
    asyncio.run(engine.unload("scale", ANONYMOUS))
    with pytest.raises(Unavailable, match="not ready: unloaded"):
        infer(engine, "scale", np.ones((1, 4), np.float32))
    load(engine, "scale")
    assert infer(engine, "scale", np.ones((1, 4), np.float32)).outputs["y"][0, 0] == 2.0


def test_stats_record_latency(engine):
    for _ in range(5):
        infer(engine, "scale", np.ones((3, 4), np.float32))
    (stats,) = engine.statistics("scale", None, ANONYMOUS)
    assert stats.success.count == 5 and stats.inference_count == 15 and stats.execution_count == 5
    assert stats.batch_sizes == {3: 5} and stats.compute.ns > 0 and stats.last_inference_ms > 0
    row = stats.to_dict()
    assert row["success_count"] == 5
    lat = row["latency"]
    assert lat["count"] == 5 and 0 < lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"] <= lat["max_ms"]


def test_a_refused_reload_is_visible_in_the_index(engine, tmp_path):
    (tmp_path / "scale" / "2").mkdir()
    (tmp_path / "scale" / "2" / "model.onnx").write_bytes(b"truncated download")
    with pytest.raises(ModelLoadError):
        load(engine, "scale")
    rows = states(engine)
    assert rows["scale/1"][0] == "READY" and "last reload refused" in rows["scale/1"][1]
    assert rows["scale/2"][0] == "UNAVAILABLE" and "ONNX Runtime cannot load" in rows["scale/2"][1]


def test_statistics_outlive_unload_and_come_back_with_the_version(engine, tmp_path):
    for _ in range(3):
        infer(engine, "scale", np.ones((1, 4), np.float32))
    asyncio.run(engine.unload("scale", ANONYMOUS))
    (stats,) = engine.statistics("scale", None, ANONYMOUS)
    assert stats.state == "UNLOADED" and stats.success.count == 3
    assert states(engine)["scale/1"] == ("UNLOADED", "unloaded")
    load(engine, "scale")
    infer(engine, "scale", np.ones((1, 4), np.float32))
    (stats,) = engine.statistics("scale", None, ANONYMOUS)
    assert stats.state == "READY" and stats.success.count == 4
    # a version retired by the policy keeps its numbers too, and is a 404 with the reason
    scale_model(tmp_path / "scale" / "2" / "model.onnx", factor=3.0)
    load(engine, "scale")
    by_version = {s.version: s for s in engine.statistics("scale", None, ANONYMOUS)}
    assert by_version["1"].state == "UNLOADED" and by_version["1"].success.count == 4
    with pytest.raises(NotFound, match=r"no version 1 loaded \(not selected by the version policy"):
        infer(engine, "scale", np.ones((1, 4), np.float32), "1")


@pytest.mark.parametrize("provenance", ["synthetic", "untrained"])
def test_provenance_is_in_the_index_and_in_every_answer(tmp_path, provenance):
    path = scale_model(tmp_path / "m" / "1" / "model.onnx")
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {"bedside.provenance": provenance, "bedside.provenance_note": "demo only"})
    onnx.save(model, str(path))
    scale_model(tmp_path / "plain" / "1" / "model.onnx")
    eng = Dataplane(tmp_path)
    eng.start()
    try:
        rows = {(r.name, r.version): r for r in eng.repository_index(ANONYMOUS)}
        assert rows["m", "1"].provenance == provenance and rows["m", "1"].provenance_note == "demo only"
        assert rows["m", "1"].to_dict()["provenance"] == provenance
        assert rows["plain", "1"].provenance == "trained"
        assert infer(eng, "m", np.ones((1, 4), np.float32)).parameters == {"provenance": provenance}
        assert infer(eng, "plain", np.ones((1, 4), np.float32)).parameters is None
    finally:
        eng.close()


def test_an_unknown_provenance_does_not_load(tmp_path):
    path = scale_model(tmp_path / "m" / "1" / "model.onnx")
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {"bedside.provenance": "validated-by-me"})
    onnx.save(model, str(path))
    eng = Dataplane(tmp_path)
    eng.start()
    try:
        (row,) = eng.repository_index(ANONYMOUS)
        assert row.state == "UNAVAILABLE" and "is not one of trained, synthetic, untrained" in row.reason
    finally:
        eng.close()
