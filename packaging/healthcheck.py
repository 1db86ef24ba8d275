"""The image's HEALTHCHECK: GET /v2/health/ready from the server's own listener, found from the same
BEDSIDE_* variables the server reads (host, port, TLS), so moving the port with
BEDSIDE_SERVER_HTTP_PORT moves the probe too. Exit 0 when it answers 200, else 1, with one line
saying why (podman and docker keep it in the health log).

The health endpoints answer anonymous callers, so no token is needed. With mutual TLS required
(security.tls_client_ca set, security.client_cert=required) the handshake needs a client
certificate: name one with HEALTHCHECK_TLS_CERT and HEALTHCHECK_TLS_KEY (not BEDSIDE_*: the server
refuses variables it does not know).

Python's standard library only, besides bedside's settings: curl is not in the image.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping

from bedside.settings import from_environment

PATH = "/v2/health/ready"
# a listener on every interface is probed on loopback
LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def target(environ: Mapping[str, str]) -> tuple[str, ssl.SSLContext | None]:
    """The URL of the readiness endpoint and the TLS context to reach it (None: plain HTTP)."""
    settings, _ = from_environment(environ)
    server, security = settings.server, settings.security
    host = LOOPBACK.get(server.host, server.host)
    netloc = f"[{host}]:{server.http_port}" if ":" in host else f"{host}:{server.http_port}"
    if not security.tls_cert:
        return f"http://{netloc}{PATH}", None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # the server's own listener, from inside its container: whether it answers, not whom to trust
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    cert, key = environ.get("HEALTHCHECK_TLS_CERT"), environ.get("HEALTHCHECK_TLS_KEY")
    if cert:
        context.load_cert_chain(cert, key or None)
    return f"https://{netloc}{PATH}", context


def probe(environ: Mapping[str, str], timeout: float = 4.0) -> tuple[bool, str]:
    """(ready, one line saying what was asked and what came back)."""
    try:
        url, context = target(environ)
    except (ValueError, OSError) as exc:  # a bad BEDSIDE_* value, an unreadable client certificate
        return False, f"cannot probe: {exc}"
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as answer:
            return answer.status == 200, f"{url}: {answer.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: {exc.code}"
    except (OSError, ssl.SSLError) as exc:
        return False, f"{url}: {type(exc).__name__}: {getattr(exc, 'reason', None) or exc}"


def main() -> int:
    ready, line = probe(os.environ)
    print(line)
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
