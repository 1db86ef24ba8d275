"""Fuzzing the OIP v2 REST surface of a live server: bodies, headers and paths built from the
shapes of valid requests with hostile values in every slot. Whatever arrives, the answer is a
4xx with a JSON reason or a 2xx, never a 5xx, and the server stays up with bounded memory."""

from __future__ import annotations

import http.client
import math
import os
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32"]
DATATYPES += ["FP64", "BYTES", "fp32", "FLOAT", ""]
MODELS = ["scale", "all_types", "breast_mass_malignancy", "corrupt", "missing_file", "nope", "a" * 300]

scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 3.4e38, 1e39, 65504.0, 0.0, -0.0]),
    st.booleans(),
    st.none(),
    st.text(max_size=8),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "²", "١٢٣", "1e5"]),
)
data = st.recursive(st.lists(scalars, max_size=12), lambda inner: st.lists(inner, max_size=4), max_leaves=40)
dims = st.one_of(
    st.integers(min_value=-2, max_value=12),
    st.sampled_from([2**31, 2**62, 2**63 - 1, 2**64]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=3),
)
shapes = st.one_of(st.lists(dims, max_size=6), st.lists(st.just(1), min_size=60, max_size=80), scalars)
parameters = st.dictionaries(
    st.sampled_from(["priority", "timeout", "binary_data_output", "binary_data_size", "classification", "x"]),
    scalars,
    max_size=3,
)
tensor = st.fixed_dictionaries(
    {},
    optional={
        "name": st.one_of(st.sampled_from(["x", "features", "in_INT8", "in_BYTES", "in_FP32"]), scalars),
        "datatype": st.one_of(st.sampled_from(DATATYPES), scalars),
        "shape": shapes,
        "data": st.one_of(data, scalars),
        "parameters": st.one_of(parameters, scalars),
    },
)
documents = st.one_of(
    st.fixed_dictionaries(
        {"inputs": st.one_of(st.lists(tensor, max_size=4), scalars)},
        optional={
            "id": scalars,
            "parameters": st.one_of(parameters, scalars),
            "outputs": st.one_of(st.lists(st.fixed_dictionaries({"name": scalars}), max_size=3), scalars),
        },
    ),
    scalars,
    st.lists(scalars, max_size=3),
)
header_values = st.one_of(
    st.sampled_from(["inf", "-1", "nan", "1e308", "²", "0", "1", "99999999999999999999", "gzip", "deflate", "br"]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
)
headers = st.dictionaries(
    st.sampled_from(
        [
            "X-Bedside-Priority",
            "X-Bedside-Timeout-Ms",
            "X-Bedside-Tenant",
            "Content-Encoding",
            "Inference-Header-Content-Length",
        ]
    ),
    header_values,
    max_size=3,
)
versions = st.one_of(st.none(), st.sampled_from(["1", "2", "0", "-1", "²", "99999999999999999999999", "%00"]))
routes = st.sampled_from(["infer", "infer", "infer", "ready", "config", "stats", ""])


def _json_safe(value: Any) -> Any:
    """orjson writes huge ints only within 64 bits: beyond, send them as the text a client would."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return _BigInt(value)
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


class _BigInt:
    def __init__(self, value: int) -> None:
        self.value = value


def _dump(doc: Any) -> bytes:
    def default(obj: Any) -> Any:
        if isinstance(obj, _BigInt):
            return orjson.Fragment(str(obj.value).encode())
        raise TypeError

    return orjson.dumps(_json_safe(doc), default=default)


@pytest.fixture(scope="module")
def connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.rss_before = _rss_kib(server.process.pid)  # type: ignore[attr-defined]  # read by the last test
    yield conn
    conn.close()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _send(conn: http.client.HTTPConnection, method: str, path: str, body: bytes, head: dict[str, str]) -> None:
    try:
        conn.request(method, path, body=body, headers=head)
        response = conn.getresponse()
        payload = response.read()
    except (http.client.HTTPException, ConnectionError):
        conn.close()  # the server closed a connection it refused: a fresh one for the next case
        conn.request("GET", "/v2/health/live")
        assert conn.getresponse().read()
        return
    # 503 is a model that is not ready (the repository has broken ones on purpose), nothing else
    assert response.status < 500 or response.status == 503, (response.status, payload[:300], path, body[:300], head)
    if response.status >= 400 and method != "HEAD":
        doc = orjson.loads(payload)
        assert "error" in doc or doc.get("ready") is False
        assert b"/tmp/" not in payload and b"/home/" not in payload  # no host paths in errors


@settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    model=st.one_of(st.sampled_from(MODELS), st.text(max_size=12)),
    version=versions,
    route=routes,
    doc=documents,
    head=headers,
    binary_tail=st.one_of(st.none(), st.binary(max_size=64)),
)
def test_no_hostile_request_gets_a_5xx(connection, model, version, route, doc, head, binary_tail):
    path = f"/v2/models/{quote(model, safe='')}"
    path += (f"/versions/{quote(version, safe='%')}" if version else "") + f"/{route}"
    body = _dump(doc)
    if binary_tail is not None:  # the binary extension: a JSON header, then raw bytes
        head = {**head, "Inference-Header-Content-Length": str(len(body))}
        body += binary_tail
    _send(connection, "POST" if route == "infer" else "GET", path.rstrip("/"), body, head)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.text(max_size=40), method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"]))
def test_no_path_gets_a_5xx(connection, path, method):
    _send(connection, method, "/" + quote(path, safe="/"), b"", {})


def test_the_server_survives_the_fuzzing_with_bounded_memory(server, connection):
    """Runs after the two fuzz tests above (pytest keeps file order)."""
    assert server.process.poll() is None
    grown_mib = (_rss_kib(server.process.pid) - connection.rss_before) / 1024
    assert grown_mib < 150, f"server memory grew {grown_mib:.0f} MiB over the fuzzing"
    connection.request("GET", "/v2/health/ready")
    assert connection.getresponse().status == 200
    assert not math.isnan(grown_mib)
    assert "Traceback" not in server.log.read_text()
