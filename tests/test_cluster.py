"""bedside on a local Ray cluster: a head and a worker started as their own processes on this
machine, the demo repository deployed through `bedside.cluster`, and the cluster checked against
a single box: the same answers byte for byte, no request lost when a replica is killed under
load, and replicas added on a queue-delay spike and removed after it."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# Ray's token authentication, as a hospital cluster would run it: one secret for every node and
# client. Set before Ray is imported (it reads it then); the nodes started below inherit it.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
ray = pytest.importorskip("ray", reason="the cluster extra (ray[serve]) is not installed")

from bedside.cluster import app as cluster  # noqa: E402
from bedside.settings import DEFAULTS  # noqa: E402
from tests.conftest import free_port, start_server  # noqa: E402
from tests.test_medication import GTIN, context, order  # noqa: E402

RAY = str(Path(sys.executable).with_name("ray"))
BREAST, DIABETES = "breast_mass_malignancy", "diabetes_progression"
ADDRESSES: dict[str, str] = {}  # the cluster's gRPC port and Ray address, set by the `url` fixture


def _ray(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RAY, *args], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def cluster_repo(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo repository with [cluster] tables: two fixed replicas of one model (the one whose
    replica is killed) and an eager autoscaler on another (the one that is scaled)."""
    repo = tmp_path_factory.mktemp("cluster") / "repo"
    shutil.copytree(demo_repo, repo)
    for name, table in {
        BREAST: "min_replicas = 2\nmax_replicas = 2",
        DIABETES: "min_replicas = 1\nmax_replicas = 2\ntarget_queue_ms = 0.02",
    }.items():
        config = repo / name / "config.toml"
        config.write_text(config.read_text() + f"\n[cluster]\n{table}\n")
    return repo


@pytest.fixture(scope="module")
def url(cluster_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    _ray("stop", "--force")
    port, http_port, grpc_port = free_port(), free_port(), free_port()
    common = ["--num-cpus=2", "--object-store-memory=150000000", "--disable-usage-stats"]
    temp = tmp_path_factory.mktemp("ray")
    head = _ray("start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}", *common)
    if head.returncode != 0:
        pytest.skip(f"Ray cannot start a head node on this machine: {head.stderr.strip()[-300:]}")
    try:
        worker = _ray("start", f"--address=127.0.0.1:{port}", *common)
        assert worker.returncode == 0, worker.stderr[-2000:]
        settings = DEFAULTS.replace(
            {
                "cluster.address": f"127.0.0.1:{port}",
                "cluster.http_port": http_port,
                "cluster.grpc_port": grpc_port,
                "security.insecure": True,  # Ray's gRPC proxy listens on every interface: a closed test network
                "cluster.upscale_delay_s": 1.0,
                "cluster.downscale_delay_s": 3.0,
                "cluster.deploy_timeout_s": 240.0,
                "streams.state_dir": str(temp / "state"),
            }
        )
        cluster.start(cluster_repo, settings)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 2  # a head and a worker: replicas are spread over two raylets
        ADDRESSES.update(grpc=f"127.0.0.1:{grpc_port}", ray=f"127.0.0.1:{port}")
        yield f"127.0.0.1:{http_port}"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _ray("stop", "--force")


def test_the_cluster_door_follows_the_box_rule():
    with pytest.raises(cluster.DeployError, match="gRPC proxy listens on every interface"):
        cluster.check_security(DEFAULTS.replace({"cluster.grpc_port": 9001}))
    with pytest.raises(cluster.DeployError, match="without TLS and authentication"):
        cluster.check_security(DEFAULTS.replace({"cluster.host": "0.0.0.0"}))
    cluster.check_security(DEFAULTS)  # loopback, no gRPC: nothing to refuse
    cluster.check_security(DEFAULTS.replace({"cluster.host": "0.0.0.0", "security.insecure": True}))


def _exchange(address: str, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, dict[str, str]]:
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request(method, path, body=body, headers={"content-type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read(), {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


def _requests(address: str) -> list[tuple[str, str, bytes | None]]:
    """Metadata, config, readiness and an inference of every model; errors the box refuses."""
    rng = np.random.default_rng(7)
    calls: list[tuple[str, str, bytes | None]] = [("GET", "/v2", None), ("GET", "/v2/models/no_such_model", None)]
    status, body, _ = _exchange(address, "POST", "/v2/repository/index", b"{}")
    assert status == 200
    for row in json.loads(body):
        name = row["name"]
        calls += [("GET", f"/v2/models/{name}", None), ("GET", f"/v2/models/{name}/ready", None)]
        if row.get("provider") == "bedside_graph":
            continue
        calls.append(("GET", f"/v2/models/{name}/config", None))
        meta = json.loads(_exchange(address, "GET", f"/v2/models/{name}")[1])
        inputs = []
        for tensor in meta["inputs"]:
            shape = [1 if d < 0 else d for d in tensor["shape"]]
            data = rng.normal(size=int(np.prod(shape))).round(4).tolist()
            inputs.append({"name": tensor["name"], "datatype": tensor["datatype"], "shape": shape, "data": data})
        calls.append(("POST", f"/v2/models/{name}/infer", json.dumps({"inputs": inputs}).encode()))
        bad = {"inputs": [{**inputs[0], "shape": [1, 3]}]}
        calls.append(("POST", f"/v2/models/{name}/infer", json.dumps(bad).encode()))
        stat = {"inputs": inputs, "parameters": {"priority": "nonsense"}}
        calls.append(("POST", f"/v2/models/{name}/infer", json.dumps(stat).encode()))
    return calls


def test_the_cluster_answers_as_the_single_box_does_byte_for_byte(url: str, cluster_repo: Path, tmp_path: Path):
    box = start_server(cluster_repo, tmp_path / "box.log")
    try:
        address = f"127.0.0.1:{box.port}"
        calls = _requests(address)
        assert len(calls) > 20
        for method, path, body in calls:
            on_box, on_cluster = _exchange(address, method, path, body), _exchange(url, method, path, body)
            assert on_cluster[:2] == on_box[:2], (method, path)
        patient = json.dumps(context(order("warfarin", 5), medications=["miconazole"]))
        check = {"inputs": [{"name": "barcode", "datatype": "BYTES", "shape": [1], "data": [GTIN["Coumadin"]]},
                            {"name": "patient", "datatype": "BYTES", "shape": [1], "data": [patient]}]}  # fmt: skip
        body = json.dumps(check).encode()
        on_box = json.loads(_exchange(address, "POST", "/v2/models/medication_check/infer", body)[1])
        on_cluster = json.loads(_exchange(url, "POST", "/v2/models/medication_check/infer", body)[1])
        assert on_cluster["outputs"] == on_box["outputs"]  # the graph's parameters carry its step timings
        assert on_cluster["outputs"][0]["data"] == ["STOP"]
    finally:
        box.process.terminate()
        box.process.wait(10)


def test_the_cluster_refuses_what_only_a_box_serves_with_a_reason(url: str):
    status, body, _ = _exchange(url, "GET", "/v2/beds")
    assert status == 404 and b"ward's box" in body
    status, body, _ = _exchange(url, "POST", f"/v2/repository/models/{BREAST}/unload", b"{}")
    assert status == 409 and b"bedside cluster up" in body
    assert _exchange(url, "GET", "/v2/health/ready")[0] == 200


def test_metrics_gather_every_deployment(url: str):
    from prometheus_client.parser import text_string_to_metric_families

    _exchange(url, "GET", f"/v2/models/{DIABETES}")
    status, body, headers = _exchange(url, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    models = {s.labels.get("model") for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert {BREAST, DIABETES, "medication_check", "medication_risk"} <= models


def _running(deployment: str) -> int:
    row = next(r for r in cluster.describe() if r["deployment"] == deployment)
    return int(row["replicas"].get("RUNNING", 0))


def _replica_pids(deployment: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", f"ServeReplica:bedside:{deployment}"], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


class Load:
    """Closed-loop load from `threads` clients, each on its own keep-alive connection."""

    def __init__(self, url: str, path: str, body: bytes, threads: int, per_thread: int) -> None:
        self.answers: list[tuple[int, bytes, dict[str, str]]] = []
        self.stop = threading.Event()
        host, port = url.split(":")

        def run() -> None:
            connection = http.client.HTTPConnection(host, int(port), timeout=60)
            for _ in range(per_thread):
                if self.stop.is_set():
                    break
                connection.request("POST", path, body=body, headers={"content-type": "application/json"})
                response = connection.getresponse()
                headers = {k.lower(): v for k, v in response.getheaders()}
                self.answers.append((response.status, response.read(), headers))
            connection.close()

        self.workers = [threading.Thread(target=run) for _ in range(threads)]
        for worker in self.workers:
            worker.start()

    def join(self) -> None:
        self.stop.set()
        for worker in self.workers:
            worker.join(120)


def test_a_replica_killed_under_load_loses_no_request(url: str):
    deployment = f"model-{BREAST}"
    assert _running(deployment) == 2
    pids = _replica_pids(deployment)
    assert len(pids) == 2
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30], "data": [0.5] * 30}]})
    meta = json.loads(_exchange(url, "GET", f"/v2/models/{BREAST}")[1])
    body = body.replace('"input"', json.dumps(meta["inputs"][0]["name"]))
    expected = _exchange(url, "POST", f"/v2/models/{BREAST}/infer", body.encode())
    assert expected[0] == 200
    load = Load(url, f"/v2/models/{BREAST}/infer", body.encode(), threads=4, per_thread=150)
    while len(load.answers) < 60:  # the load is under way: now one replica dies
        time.sleep(0.01)
    os.kill(pids[0], signal.SIGKILL)
    for worker in load.workers:
        worker.join(120)
    answers = load.answers
    assert len(answers) == 600  # every request was answered
    failed = [a for a in answers if a[0] != 200]
    for status, text, headers in failed:  # a refusal says why and when to retry: never a silent drop
        assert status == 503 and b"send it again" in text and headers.get("retry-after") == "1", text
    assert all(text == expected[1] for status, text, _ in answers if status == 200)
    assert len(failed) <= 6, f"{len(failed)} of 600 requests were refused after retries"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and _running(deployment) < 2:
        time.sleep(0.5)  # polling Ray for the replacement replica, not waiting for a result
    assert _running(deployment) == 2  # Ray replaced the killed replica
    assert pids[0] not in _replica_pids(deployment)


def test_replicas_are_added_on_a_queue_delay_spike_and_removed_after(url: str):
    deployment = f"model-{DIABETES}"
    assert _running(deployment) == 1
    meta = json.loads(_exchange(url, "GET", f"/v2/models/{DIABETES}")[1])
    tensor = meta["inputs"][0]
    rows = 8
    shape = [rows, *(d for d in tensor["shape"][1:])]
    data = [0.01] * int(np.prod(shape))
    body = json.dumps(
        {"inputs": [{"name": tensor["name"], "datatype": tensor["datatype"], "shape": shape, "data": data}]}
    )
    load = Load(url, f"/v2/models/{DIABETES}/infer", body.encode(), threads=12, per_thread=100_000)
    try:
        up = _wait_for(lambda: _running(deployment) == 2, 60)
    finally:
        load.join()
    assert up, "no second replica within 60 s of a queue-delay spike"
    assert {status for status, _, _ in load.answers} == {200}
    assert _wait_for(lambda: _running(deployment) == 1, 60), "the second replica stayed 60 s after the load ended"


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)  # polling Ray's state, not waiting for a result
    return False


def test_grpc_at_the_ray_proxy_answers_as_the_box_does(url: str, cluster_repo: Path, tmp_path: Path):
    import grpc

    from bedside.server.grpc import oip_pb2 as pb

    box_port = free_port()
    box = start_server(cluster_repo, tmp_path / "box.log", "--grpc-port", str(box_port))
    meta = json.loads(_exchange(url, "GET", f"/v2/models/{BREAST}")[1])["inputs"][0]
    infer = pb.ModelInferRequest(model_name=BREAST)
    tensor = infer.inputs.add(name=meta["name"], datatype="FP32", shape=[1, 30])
    tensor.contents.fp32_contents.extend(np.linspace(-1, 1, 30).tolist())
    unknown = pb.ModelInferRequest(model_name="no_such_model")
    wrong = pb.ModelInferRequest(model_name=BREAST)
    wrong.inputs.add(name=meta["name"], datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend([1, 2, 3])
    calls = [
        ("ModelInfer", infer, pb.ModelInferResponse),
        ("ModelInfer", unknown, pb.ModelInferResponse),
        ("ModelInfer", wrong, pb.ModelInferResponse),
        ("ModelMetadata", pb.ModelMetadataRequest(name=BREAST), pb.ModelMetadataResponse),
        ("ModelReady", pb.ModelReadyRequest(name="no_such_model"), pb.ModelReadyResponse),
        ("ServerReady", pb.ServerReadyRequest(), pb.ServerReadyResponse),
        ("ServerMetadata", pb.ServerMetadataRequest(), pb.ServerMetadataResponse),
    ]

    def outcome(address: str, method: str, request: Any, response: Any) -> tuple[str, bytes | str]:
        with grpc.insecure_channel(address) as channel:
            stub = channel.unary_unary(
                f"/inference.GRPCInferenceService/{method}",
                request_serializer=type(request).SerializeToString,
                response_deserializer=lambda raw: raw,
            )
            try:
                return "OK", stub(request, timeout=60)
            except grpc.RpcError as error:
                return error.code().name, error.details()

    try:
        for method, request, response in calls:
            on_box = outcome(f"127.0.0.1:{box_port}", method, request, response)
            assert outcome(ADDRESSES["grpc"], method, request, response) == on_box, method
        code, details = outcome(
            ADDRESSES["grpc"], "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=BREAST), None
        )
        assert code == "FAILED_PRECONDITION" and "bedside cluster up" in details
        code, raw = outcome(ADDRESSES["grpc"], "RepositoryIndex", pb.RepositoryIndexRequest(), None)
        names = [m.name for m in pb.RepositoryIndexResponse.FromString(raw).models]
        assert code == "OK" and names == sorted(names) and len(names) == len(set(names)) and BREAST in names
    finally:
        box.process.terminate()
        box.process.wait(10)


def test_bedside_cluster_status_shows_every_deployment(url: str):
    shown = subprocess.run(
        [str(Path(sys.executable).with_name("bedside")), "cluster", "status", "--address", ADDRESSES["ray"]],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert shown.returncode == 0, shown.stdout + shown.stderr
    for deployment in ("bedside-front", f"model-{BREAST}", "graph-medication_check"):
        assert deployment in shown.stdout
    assert "HEALTHY" in shown.stdout
