"""End to end: the real server process on loopback, spoken to over HTTP."""

from __future__ import annotations

import gzip
import http.client
import struct

import numpy as np
import orjson
import pytest
from sklearn.datasets import load_breast_cancer

from tests.models import ALL_TYPES


def call(server, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), data


def post_json(server, path: str, doc) -> tuple[int, dict]:
    status, _, data = call(server, "POST", path, orjson.dumps(doc))
    return status, orjson.loads(data)


def features(rows: int = 1) -> np.ndarray:
    return load_breast_cancer().data[:rows].astype(np.float32)


def infer_doc(x: np.ndarray, **extra) -> dict:
    return {
        "inputs": [{"name": "features", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
        **extra,
    }


def assert_still_serving(server):
    status, doc = post_json(server, "/v2/models/breast_mass_malignancy/infer", infer_doc(features()))
    assert status == 200 and doc["outputs"][0]["data"] == [1]


def test_server_metadata_and_health(server):
    status, _, data = call(server, "GET", "/v2")
    assert status == 200 and orjson.loads(data)["name"] == "bedside"
    assert "binary_tensor_data" in orjson.loads(data)["extensions"]
    assert call(server, "GET", "/v2/health/live")[0] == 200
    assert call(server, "GET", "/v2/health/ready")[0] == 200


def test_model_metadata_readiness_and_config(server):
    status, _, data = call(server, "GET", "/v2/models/breast_mass_malignancy")
    meta = orjson.loads(data)
    assert status == 200 and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 30]}]
    assert call(server, "GET", "/v2/models/breast_mass_malignancy/versions/1")[0] == 200
    assert call(server, "GET", "/v2/models/breast_mass_malignancy/ready")[0] == 200
    assert call(server, "GET", "/v2/models/breast_mass_malignancy/versions/1/ready")[0] == 200
    status, _, data = call(server, "GET", "/v2/models/corrupt/ready")
    assert status == 503 and orjson.loads(data) == {"name": "corrupt", "ready": False}
    status, _, data = call(server, "GET", "/v2/models/breast_mass_malignancy/config")
    assert status == 200 and orjson.loads(data)["max_batch_size"] == 64


def test_json_inference_matches_the_labels(server):
    data = load_breast_cancer()
    x = data.data[:40].astype(np.float32)
    status, doc = post_json(server, "/v2/models/breast_mass_malignancy/infer", infer_doc(x, id="req-7"))
    assert status == 200 and doc["id"] == "req-7" and doc["model_version"] == "1"
    outputs = {o["name"]: o for o in doc["outputs"]}
    assert outputs["probabilities"]["shape"] == [40, 2]
    labels = np.array(outputs["label"]["data"])
    assert (labels == (data.target[:40] == 0)).mean() > 0.9  # malignant = 1
    proba = np.array(outputs["probabilities"]["data"]).reshape(40, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)


def test_nested_data_and_output_selection(server):
    x = features(2)
    doc = {
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [2, 30], "data": x.tolist()}],
        "outputs": [{"name": "label"}],
    }
    status, out = post_json(server, "/v2/models/breast_mass_malignancy/infer", doc)
    assert status == 200 and [o["name"] for o in out["outputs"]] == ["label"]


def test_binary_tensor_extension_both_ways(server):
    x = features(3)
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "features", "datatype": "FP32", "shape": [3, 30], "parameters": {"binary_data_size": x.nbytes}}
            ],
            "outputs": [
                {"name": "probabilities", "parameters": {"binary_data": True}},
                {"name": "label", "parameters": {"binary_data": False}},
            ],
        }
    )
    status, headers, data = call(
        server,
        "POST",
        "/v2/models/breast_mass_malignancy/infer",
        header + x.tobytes(),
        {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert status == 200
    hlen = int(headers["inference-header-content-length"])
    doc = orjson.loads(data[:hlen])
    proba_meta, label_meta = doc["outputs"]
    assert proba_meta["parameters"]["binary_data_size"] == 3 * 2 * 4 and "data" not in proba_meta
    proba = np.frombuffer(data[hlen:], dtype="<f4").reshape(3, 2)
    assert label_meta["data"] == [1, 1, 1] and (proba[:, 1] > 0.5).all()


def test_every_datatype_round_trips_through_the_server(server):
    rng = np.random.default_rng(1)
    inputs, blobs = [], []
    for name in ALL_TYPES:
        if name == "BYTES":
            values = ["a", "héllo", "", "x y", "\u00e9", "z"]
            blob = b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)
        elif name == "BOOL":
            blob = rng.integers(0, 2, 6).astype(bool).tobytes()
        else:
            from bedside.protocol.datatypes import OIP_TO_NUMPY

            dtype = OIP_TO_NUMPY[name]
            blob = (
                (rng.standard_normal(6) * 50).astype(dtype).tobytes()
                if dtype.kind == "f"
                else rng.integers(0, 100, 6).astype(dtype).tobytes()
            )
        inputs.append(
            {"name": f"in_{name}", "datatype": name, "shape": [2, 3], "parameters": {"binary_data_size": len(blob)}}
        )
        blobs.append(blob)
    header = orjson.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}})
    status, headers, data = call(
        server,
        "POST",
        "/v2/models/all_types/infer",
        header + b"".join(blobs),
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 200, data
    hlen = int(headers["inference-header-content-length"])
    doc = orjson.loads(data[:hlen])
    offset = 0
    returned = {}
    for out in doc["outputs"]:
        size = out["parameters"]["binary_data_size"]
        returned[out["name"]] = data[hlen + offset : hlen + offset + size]
        assert out["shape"] == [2, 3]
        offset += size
    for name, blob in zip(ALL_TYPES, blobs, strict=True):
        assert returned[f"out_{name}"] == blob, name
    # and the same through JSON for the text-friendly types
    status, doc = post_json(
        server,
        "/v2/models/all_types/infer",
        {
            "inputs": [
                {
                    "name": f"in_{n}",
                    "datatype": n,
                    "shape": [2, 3],
                    "data": (["s"] * 6 if n == "BYTES" else [True] * 6 if n == "BOOL" else [1] * 6),
                }
                for n in ALL_TYPES
            ]
        },
    )
    assert status == 200
    out = {o["name"]: o for o in doc["outputs"]}
    assert (
        out["out_BYTES"]["data"] == ["s"] * 6
        and out["out_FP16"]["data"] == [1.0] * 6
        and out["out_BOOL"]["data"] == [True] * 6
    )


def test_versions_are_addressable(server):
    x = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]}]}
    status, doc = post_json(server, "/v2/models/scale/versions/2/infer", x)
    assert status == 200 and doc["outputs"][0]["data"] == [3.0] * 4 and doc["model_version"] == "2"
    status, doc = post_json(server, "/v2/models/scale/versions/1/infer", x)  # latest=1: v1 not loaded
    assert status == 404 and "no version 1" in doc["error"]


@pytest.mark.parametrize(
    ("path", "doc", "status", "message"),
    [
        ("/v2/models/nope/infer", {}, 404, "model 'nope' is not in the repository"),
        ("/v2/models/breast_mass_malignancy/versions/9/infer", {}, 404, "no version 9"),
        ("/v2/models/breast_mass_malignancy/versions/x/infer", {}, 404, "not a positive integer"),
        ("/v2/models/corrupt/infer", {}, 503, "ONNX Runtime cannot load"),
        ("/v2/models/mismatch/infer", {}, 503, "config says FP64, the graph has FP32"),
        ("/v2/models/missing_file/infer", {}, 503, "has no model.onnx"),
        (
            "/v2/models/breast_mass_malignancy/infer",
            {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 29], "data": [0.0] * 29}]},
            400,
            "input 'features': expected shape [-1, 30]",
        ),
        (
            "/v2/models/breast_mass_malignancy/infer",
            {"inputs": [{"name": "features", "datatype": "FP64", "shape": [1, 30], "data": [0.0] * 30}]},
            400,
            "expected datatype FP32, got FP64",
        ),
        (
            "/v2/models/breast_mass_malignancy/infer",
            {"inputs": [{"name": "feats", "datatype": "FP32", "shape": [1, 30], "data": [0.0] * 30}]},
            400,
            "missing inputs ['features']; unknown inputs ['feats']",
        ),
        (
            "/v2/models/breast_mass_malignancy/infer",
            {"inputs": [{"name": "features", "datatype": "FP32", "shape": [65, 30], "data": [0.0] * 65 * 30}]},
            413,
            "batch of 65 exceeds max_batch_size 64",
        ),
        (
            "/v2/models/breast_mass_malignancy/infer",
            {
                "inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 30], "data": [0.0] * 30}],
                "outputs": [{"name": "risk"}],
            },
            400,
            "unknown outputs ['risk']",
        ),
    ],
)
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, path, doc, status, message):
    got, body = post_json(server, path, doc)
    assert got == status and message in body["error"], body
    assert_still_serving(server)


def test_malformed_bodies(server):
    status, _, data = call(server, "POST", "/v2/models/breast_mass_malignancy/infer", b'{"inputs": [')
    assert status == 400 and "not valid JSON" in orjson.loads(data)["error"]
    status, _, data = call(
        server, "POST", "/v2/models/breast_mass_malignancy/infer", b"{}", {"Inference-Header-Content-Length": "ten"}
    )
    assert status == 400 and "must be a non-negative integer" in orjson.loads(data)["error"]
    status, _, data = call(
        server, "POST", "/v2/models/breast_mass_malignancy/infer", b"\x1f\x8bnot gzip", {"Content-Encoding": "gzip"}
    )
    assert status == 400 and "not valid gzip" in orjson.loads(data)["error"]
    assert_still_serving(server)


def test_gzip_body_is_accepted(server):
    body = gzip.compress(orjson.dumps(infer_doc(features())))
    status, _, data = call(
        server, "POST", "/v2/models/breast_mass_malignancy/infer", body, {"Content-Encoding": "gzip"}
    )
    assert status == 200 and orjson.loads(data)["outputs"][0]["data"] == [1]


def test_too_large_bodies_get_413(server):
    # the test server runs with --max-body-mb 1
    status, _, data = call(server, "POST", "/v2/models/breast_mass_malignancy/infer", b" " * (2 << 20))
    assert status == 413 and "exceeds the limit" in orjson.loads(data)["error"]
    bomb = gzip.compress(b" " * (4 << 20))
    status, _, data = call(
        server, "POST", "/v2/models/breast_mass_malignancy/infer", bomb, {"Content-Encoding": "gzip"}
    )
    assert status == 413 and "decompressed body exceeds" in orjson.loads(data)["error"]
    assert_still_serving(server)


def test_routes_and_methods(server):
    status, _, data = call(server, "GET", "/v2/models/breast_mass_malignancy/infer")
    assert status == 405 and "takes POST" in orjson.loads(data)["error"]
    assert call(server, "GET", "/v1/models")[0] == 404
    assert call(server, "GET", "/v2/models/breast_mass_malignancy/bogus")[0] == 404


def test_repository_index_load_and_unload(server):
    status, rows = post_json(server, "/v2/repository/index", {})
    by_name = {r["name"]: r for r in rows}
    assert status == 200 and by_name["breast_mass_malignancy"]["state"] == "READY"
    assert by_name["corrupt"]["state"] == "UNAVAILABLE" and by_name["corrupt"]["reason"]

    assert post_json(server, "/v2/repository/models/diabetes_progression/unload", {})[0] == 200
    x = {
        "inputs": [
            {
                "name": "features",
                "datatype": "FP64",
                "shape": [1, 10],
                "data": [59, 2, 32.1, 101, 157, 93.2, 38, 4, 4.86, 87],
            }
        ]
    }
    status, doc = post_json(server, "/v2/models/diabetes_progression/infer", x)
    assert status == 503 and "unloaded" in doc["error"]
    assert_still_serving(server)
    assert post_json(server, "/v2/repository/models/diabetes_progression/load", {})[0] == 200
    status, doc = post_json(server, "/v2/models/diabetes_progression/infer", x)
    assert status == 200 and 100 < doc["outputs"][0]["data"][0] < 300

    status, doc = post_json(server, "/v2/repository/models/corrupt/load", {})
    assert status == 400 and "ONNX Runtime cannot load" in doc["error"]
    status, doc = post_json(server, "/v2/repository/models/nope/load", {})
    assert status == 404


def test_statistics_report_latency_percentiles(server):
    for _ in range(3):
        post_json(server, "/v2/models/breast_mass_malignancy/infer", infer_doc(features()))
    status, _, data = call(server, "GET", "/v2/models/breast_mass_malignancy/stats")
    (row,) = orjson.loads(data)["model_stats"]
    assert status == 200 and row["success_count"] >= 3
    lat = row["latency"]
    assert 0 < lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert row["queue"]["count"] == row["compute"]["count"] == row["success_count"]
    status, _, data = call(server, "GET", "/v2/models/stats")
    assert status == 200 and len(orjson.loads(data)["model_stats"]) >= 3


def test_reloading_one_model_never_fails_requests_to_another(server):
    import threading

    statuses: list[int] = []
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            statuses.append(post_json(server, "/v2/models/breast_mass_malignancy/infer", infer_doc(features()))[0])

    workers = [threading.Thread(target=hammer) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        for _ in range(5):
            assert post_json(server, "/v2/repository/models/scale/unload", {})[0] == 200
            assert post_json(server, "/v2/repository/models/scale/load", {})[0] == 200
            assert (
                post_json(server, "/v2/repository/models/breast_mass_malignancy/load", {})[0] == 200
            )  # reload in place
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert statuses and set(statuses) == {200}


def test_priority_tenant_and_timeout_over_http(server):
    path = "/v2/models/breast_mass_malignancy/infer"
    body = orjson.dumps(infer_doc(features()))
    for headers in ({"X-Bedside-Priority": "stat"}, {"X-Bedside-Priority": "3"}, {"X-Bedside-Timeout-Ms": "250"}):
        status, _, _ = call(server, "POST", path, body, {"X-Bedside-Tenant": "icu-east", **headers})
        assert status == 200
    status, doc = post_json(server, path, infer_doc(features(), parameters={"priority": 1, "timeout": 200_000}))
    assert status == 200
    status, _, data = call(server, "POST", path, body, {"X-Bedside-Priority": "whenever"})
    assert status == 400 and "priority 'whenever' is not a level 1..3" in orjson.loads(data)["error"]
    status, doc = post_json(server, path, infer_doc(features(), parameters={"priority": 9}))
    assert status == 400 and "outside 1..3" in doc["error"]
    status, _, data = call(server, "POST", path, body, {"X-Bedside-Tenant": "icu east/../x"})
    assert status == 400 and "X-Bedside-Tenant must be" in orjson.loads(data)["error"]
    status, _, data = call(server, "POST", path, body, {"X-Bedside-Timeout-Ms": "soon"})
    assert status == 400 and "milliseconds" in orjson.loads(data)["error"]

    status, _, data = call(server, "GET", "/v2/models/breast_mass_malignancy/stats")
    (row,) = orjson.loads(data)["model_stats"]
    assert row["tenants"]["icu-east"]["success_count"] == 3
    assert set(row["queue_depth"]) == {"1", "2", "3", "overdue"}
    assert sum(row["batch_size_histogram"].values()) == row["execution_count"]


def test_config_endpoint_shows_the_scheduling_policy(server):
    status, _, data = call(server, "GET", "/v2/models/breast_mass_malignancy/config")
    config = orjson.loads(data)
    assert status == 200
    assert config["scheduling"]["priority_levels"] == 3
    assert config["dynamic_batching"]["enabled"] is True
    assert [q["level"] for q in config["queue_policy"]] == [1, 2, 3]
