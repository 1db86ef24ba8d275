"""A small OIP v2 HTTP client on the standard library, for the CLI and scripts."""

from __future__ import annotations

import http.client
import os
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import orjson

from bedside.protocol.codec import encode_tensor_json


class ServerError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


# Credentials for a server with authentication and TLS on, from the environment so that they stay
# out of shell history and `ps`: a bearer token, the CA that signed the server's certificate, and a
# client certificate and key for mutual TLS.
CLIENT_ENV = ("BEDSIDE_TOKEN", "BEDSIDE_TLS_CA", "BEDSIDE_TLS_CLIENT_CERT", "BEDSIDE_TLS_CLIENT_KEY")


class Client:
    def __init__(
        self, url: str = "http://127.0.0.1:8000", timeout: float = 30.0, environ: Mapping[str, str] = os.environ
    ) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        host, port = parts.hostname or "127.0.0.1", parts.port or 8000
        self._token = environ.get("BEDSIDE_TOKEN", "").strip()
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=environ.get("BEDSIDE_TLS_CA") or None)
            cert = environ.get("BEDSIDE_TLS_CLIENT_CERT")
            if cert:
                context.load_cert_chain(cert, environ.get("BEDSIDE_TLS_CLIENT_KEY") or None)
            self._conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=context
            )
        else:
            self._conn = http.client.HTTPConnection(host, port, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        payload = None if body is None else orjson.dumps(body)
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        self._conn.request(method, path, body=payload, headers=headers)
        response = self._conn.getresponse()
        data = response.read()
        doc = orjson.loads(data) if data else {}
        if response.status >= 400:
            raise ServerError(
                response.status, doc.get("error", data.decode(errors="replace")) if isinstance(doc, dict) else str(doc)
            )
        return doc

    def infer(
        self, model: str, inputs: dict[str, np.ndarray], version: str | None = None, request_id: str | None = None
    ) -> dict[str, Any]:
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        body: dict[str, Any] = {"inputs": [encode_tensor_json(k, v) for k, v in inputs.items()]}
        if request_id:
            body["id"] = request_id
        return self.request("POST", path, body)

    def close(self) -> None:
        self._conn.close()
