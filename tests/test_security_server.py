"""A real server with TLS, mutual TLS and authentication on, reached over loopback by REST, gRPC,
the ECG WebSocket and SSE: every transport refuses and admits the same way, because the rules live
in the dataplane."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from bedside.security.callers import CallerRegistry
from bedside.security.certs import Issued, make_ca, make_client, make_server
from bedside.server.grpc import oip_pb2 as pb
from tests.conftest import free_port
from tests.models import SCALE_CONFIG, scale_model, write_config

SERVICE = "/inference.GRPCInferenceService/"


@dataclass
class Deployment:
    port: int
    grpc_port: int
    folder: Path
    tokens: dict[str, str]
    ca: Issued

    def context(self, client: str | None = "a-infer", ca: Issued | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.folder / "ca.pem"))
        if client is not None:
            context.load_cert_chain(self.folder / f"{client}.pem", self.folder / f"{client}.key")
        return context

    def call(
        self, method: str, path: str, token: str | None = None, body: object = None, client: str | None = "a-infer"
    ):
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context(client), timeout=10)
        headers = {"Authorization": f"Bearer {self.tokens[token]}"} if token else {}
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response.status, json.loads(data) if data else {}

    def channel(self, client: str = "a-infer") -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(
            (self.folder / "ca.pem").read_bytes(),
            (self.folder / f"{client}.key").read_bytes(),
            (self.folder / f"{client}.pem").read_bytes(),
        )
        return grpc.secure_channel(f"127.0.0.1:{self.grpc_port}", credentials)


X = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    folder = tmp_path_factory.mktemp("secure")
    repo = folder / "repo"
    write_config(repo / "a_model", SCALE_CONFIG + '[access]\nowner = "a"\n')
    write_config(repo / "b_model", SCALE_CONFIG + '[access]\nowner = "b"\n')
    for name in ("a_model", "b_model"):
        scale_model(repo / name / "1" / "model.onnx")
    ca = make_ca()
    ca.write(folder / "ca.pem", folder / "ca.key")
    make_server(ca, []).write(folder / "server.pem", folder / "server.key")
    registry = CallerRegistry(folder / "callers.json")
    tokens = {}
    for name, tenant, roles, beds in [
        ("a-infer", "a", ["infer"], []),
        ("a-monitor", "a", ["monitor"], []),
        ("a-admin", "a", ["admin"], []),
        ("b-infer", "b", ["infer"], []),
        ("cart", "a", ["device"], ["ICU-*"]),
        ("cart-to-revoke", "a", ["device"], ["ICU-*"]),
    ]:
        registry.upsert(name, tenant, roles, beds)
        tokens[name] = registry.issue_token(name)[1]
    client = make_client(ca, "a-infer")
    client.write(folder / "a-infer.pem", folder / "a-infer.key")
    registry.add_certificate("a-infer", _fingerprint(client), client.not_after)
    make_client(ca, "stranger").write(folder / "stranger.pem", folder / "stranger.key")  # signed, not registered
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    expired = make_client(ca, "a-infer", not_before=past - dt.timedelta(days=30), not_after=past)
    expired.write(folder / "expired.pem", folder / "expired.key")
    registry.add_certificate("a-infer", _fingerprint(expired), expired.not_after)
    make_client(make_ca("another CA"), "a-infer").write(folder / "foreign.pem", folder / "foreign.key")
    registry.save()

    port, grpc_port = free_port(), free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", BEDSIDE_STREAMS_STATE_DIR=str(folder / "state"))
    env["BEDSIDE_SECURITY_CALLERS_FILE"] = str(folder / "callers.json")
    log = folder / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "bedside", "serve", "--repository", str(repo), "--port", str(port),
                "--grpc-port", str(grpc_port), "--mllp-port", "-1", "--log-level", "warning", "--auth",
                "--tls-cert", str(folder / "server.pem"), "--tls-key", str(folder / "server.key"),
                "--tls-client-ca", str(folder / "ca.pem"),
            ],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    found = Deployment(port, grpc_port, folder, tokens, ca)
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()}")
        try:
            if found.call("GET", "/v2/health/ready")[0] == 200:
                break
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)  # polling for readiness, not waiting for a result
    yield found
    process.terminate()
    process.wait(10)


def _fingerprint(issued: Issued) -> str:
    from bedside.security.certs import fingerprint

    return fingerprint(issued.cert)


def test_the_client_certificate_names_the_caller(deployment):
    status, doc = deployment.call("POST", "/v2/models/a_model/infer", body=X)
    assert status == 200 and doc["outputs"][0]["data"] == [2, 4, 6, 8]
    missing = deployment.call("POST", "/v2/models/no_such/infer", body=X)
    other = deployment.call("POST", "/v2/models/b_model/infer", body=X)
    assert missing[0] == other[0] == 404
    assert other[1]["error"] == missing[1]["error"].replace("no_such", "b_model")
    status, doc = deployment.call("GET", "/v2/models/a_model", client="stranger")  # signed by the CA, not registered
    assert status == 401 and "names no caller" in doc["error"]


@pytest.mark.parametrize("client", ["expired", "foreign", None])
def test_expired_foreign_and_missing_client_certificates_never_connect(deployment, client):
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        deployment.call("GET", "/v2/health/live", client=client)


def test_plaintext_to_the_tls_port_gets_nothing(deployment):
    with socket.create_connection(("127.0.0.1", deployment.port), timeout=10) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = sock.recv(4096)
    assert b'"live"' not in answer


def test_every_rest_endpoint_refuses_the_same_way(deployment):
    call = deployment.call
    # a token counts over the certificate: each role and tenant in turn
    assert call("GET", "/v2/health/live", client="a-infer")[0] == 200
    for method, path in [
        ("GET", "/v2/models/stats"),
        ("GET", "/v2/models/a_model/stats"),
        ("GET", "/v2/beds"),
        ("GET", "/v2/alerts"),
        ("GET", "/v2/streams"),
        ("POST", "/v2/repository/index"),
        ("POST", "/v2/repository/models/a_model/load"),
        ("POST", "/v2/repository/models/a_model/unload"),
    ]:
        assert call(method, path, token="a-infer")[0] == 403, path
    for path in (
        "/v2/models/b_model",
        "/v2/models/b_model/ready",
        "/v2/models/b_model/config",
        "/v2/models/b_model/versions/1",
    ):
        status, doc = call("GET", path, token="a-infer")
        assert (status, doc["error"]) == (404, "model 'b_model' is not in the repository"), path
    assert call("POST", "/v2/repository/models/b_model/unload", token="a-admin") == (
        404,
        {"error": "model 'b_model' is not in the repository"},
    )
    assert call("POST", "/v2/models/a_model/infer", token="b-infer", body=X)[0] == 404
    assert call("POST", "/v2/models/b_model/infer", token="b-infer", body=X)[0] == 200
    index = call("POST", "/v2/repository/index", token="a-admin", body={})[1]
    assert {row["name"] for row in index} == {"a_model"}
    stats = call("GET", "/v2/models/stats", token="a-monitor")[1]["model_stats"]
    assert {row["name"] for row in stats} == {"a_model"} and set(stats[0]["tenants"]) <= {"a"}
    assert call("GET", "/v2/beds", token="a-monitor")[0] == 200
    status, doc = call("GET", "/v2/models/a_model", token=None, client="stranger")
    assert status == 401
    headers_tenant = http.client.HTTPSConnection("127.0.0.1", deployment.port, context=deployment.context(), timeout=10)
    headers_tenant.request("POST", "/v2/models/a_model/infer", json.dumps(X), {"X-Bedside-Tenant": "b"})
    assert headers_tenant.getresponse().status == 403


def test_grpc_refuses_and_admits_as_rest_does(deployment):
    def unary(channel, method, request, response, token=None):
        call = channel.unary_unary(SERVICE + method, request.SerializeToString, response.FromString)
        metadata = [("authorization", f"Bearer {deployment.tokens[token]}")] if token else None
        return call(request, metadata=metadata, timeout=10)

    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend([1, 2, 3, 4])
    with deployment.channel() as channel:
        answer = unary(
            channel, "ModelInfer", pb.ModelInferRequest(model_name="a_model", inputs=[tensor]), pb.ModelInferResponse
        )
        assert np.frombuffer(answer.raw_output_contents[0], np.float32).tolist() == [2, 4, 6, 8]
        errors = {}
        for name in ("b_model", "no_such"):
            with pytest.raises(grpc.RpcError) as refused:
                unary(channel, "ModelMetadata", pb.ModelMetadataRequest(name=name), pb.ModelMetadataResponse)
            errors[name] = (refused.value.code(), refused.value.details())
        assert errors["b_model"] == (grpc.StatusCode.NOT_FOUND, errors["no_such"][1].replace("no_such", "b_model"))
        ready = unary(channel, "ModelReady", pb.ModelReadyRequest(name="b_model"), pb.ModelReadyResponse)
        assert ready.ready is False
        with pytest.raises(grpc.RpcError) as refused:
            unary(channel, "RepositoryIndex", pb.RepositoryIndexRequest(), pb.RepositoryIndexResponse)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        index = unary(channel, "RepositoryIndex", pb.RepositoryIndexRequest(), pb.RepositoryIndexResponse, "a-admin")
        assert [m.name for m in index.models] == ["a_model"]
        with pytest.raises(grpc.RpcError) as refused:
            unary(channel, "ModelStatistics", pb.ModelStatisticsRequest(), pb.ModelStatisticsResponse, "b-infer")
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with deployment.channel("stranger") as channel, pytest.raises(grpc.RpcError) as refused:
        unary(channel, "ServerMetadata", pb.ServerMetadataRequest(), pb.ServerMetadataResponse)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_only_an_allowed_device_feeds_a_bed_and_only_monitors_read_alerts(deployment):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    url = f"wss://127.0.0.1:{deployment.port}/v2/streams/ecg/"

    def open_socket(bed: str, token: str):
        return connect(
            url + bed,
            ssl=deployment.context(),
            additional_headers={"Authorization": f"Bearer {deployment.tokens[token]}"},
            open_timeout=10,
        )

    with open_socket("ICU-1", "cart"):
        pass  # accepted
    for bed, token, status in [("WARD-2", "cart", 403), ("ICU-1", "a-monitor", 403), ("ANY-BED-99", "a-infer", 403)]:
        with pytest.raises(InvalidStatus) as refused:
            open_socket(bed, token)
        assert refused.value.response.status_code == status
    with pytest.raises(InvalidStatus) as refused:
        connect(url + "ICU-1", ssl=deployment.context("stranger"), open_timeout=10)
    assert refused.value.response.status_code == 401
    for token, status in [("a-monitor", 200), ("a-infer", 403)]:
        conn = http.client.HTTPSConnection("127.0.0.1", deployment.port, context=deployment.context(), timeout=10)
        conn.request("GET", "/v2/alerts/stream", headers={"Authorization": f"Bearer {deployment.tokens[token]}"})
        response = conn.getresponse()
        assert response.status == status
        conn.close()


def test_two_authorization_headers_are_refused_not_guessed(deployment):
    conn = http.client.HTTPSConnection("127.0.0.1", deployment.port, context=deployment.context(), timeout=10)
    conn.putrequest("GET", "/v2/models/a_model")
    conn.putheader("Authorization", f"Bearer {deployment.tokens['a-infer']}")
    conn.putheader("Authorization", f"Bearer {deployment.tokens['b-infer']}")
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 400 and b"one Authorization header" in response.read()


def test_a_revoked_device_is_cut_off_mid_stream(deployment):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    chunk = np.zeros((50, 12), np.float32).tobytes()
    headers = {"Authorization": f"Bearer {deployment.tokens['cart-to-revoke']}"}
    url = f"wss://127.0.0.1:{deployment.port}/v2/streams/ecg/ICU-9"
    with connect(url, ssl=deployment.context(), additional_headers=headers, open_timeout=10) as ws:
        ws.send(chunk)
        registry = CallerRegistry(deployment.folder / "callers.json")
        registry.revoke("cart-to-revoke")
        registry.save()
        deadline = time.monotonic() + 10
        with pytest.raises(ConnectionClosed) as closed:
            while time.monotonic() < deadline:  # the server re-reads the callers file within a second
                ws.send(chunk)
                time.sleep(0.05)  # pacing the chunks as a cart would, not waiting for a result
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


def test_the_audit_log_holds_every_call_and_no_data(deployment):
    from bedside.security.auditcheck import last_entries, verify

    path = deployment.folder / "state" / "audit.sqlite"
    deployment.call("POST", "/v2/models/a_model/infer", token="a-infer", body={**X, "id": "audit-me"})
    deployment.call("GET", "/v2/models/a_model", client="stranger")
    deployment.call("POST", "/v2/models/not_there/infer", token="a-infer", body=X)
    deployment.call("POST", "/v2/models/a_model/infer", token="a-infer", body={"inputs": "nonsense"})
    wanted = {("not_there", "404"), ("a_model", "400")}  # refused before the model ran: recorded too
    deadline = time.monotonic() + 10
    while True:  # the writer stores batches every 200 ms: poll for the last calls' entries (they may be
        # in two batches), do not sleep a fixed time
        entries = last_entries(path, 500) if path.exists() else []
        refused = {(e["model"], e["outcome"]) for e in entries if e["kind"] == "infer" and e["caller"] == "a-infer"}
        if wanted <= refused or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert wanted <= refused
    ours = next(e for e in entries if e["request_id"] == "audit-me")
    assert (ours["kind"], ours["caller"], ours["tenant"], ours["model"], ours["outcome"]) == (
        "infer", "a-infer", "a", "a_model", "ok",
    )  # fmt: skip
    assert any(e["kind"] == "auth_failed" for e in entries)
    assert any(e["kind"] == "denied" and e["model"] == "b_model" for e in entries)
    assert not any("1.0" in str(e.values()) or "[1, 2, 3, 4]" in str(e.values()) for e in entries)
    result = verify(path)
    assert result.intact and result.checked >= len(entries), result.reason


def test_metrics_need_the_monitor_role_and_show_only_the_tenants_models(deployment):
    def metrics(token: str | None) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection("127.0.0.1", deployment.port, context=deployment.context(), timeout=10)
        headers = {"Authorization": f"Bearer {deployment.tokens[token]}"} if token else {}
        conn.request("GET", "/metrics", headers=headers)
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response.status, data

    assert metrics("a-infer")[0] == 403
    status, text = metrics("a-monitor")
    assert status == 200 and b'model="a_model"' in text and b'model="b_model"' not in text
