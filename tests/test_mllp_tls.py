"""HL7/MLLP over TLS with device identity: with security.auth on, a monitor is a `device` caller
named by its client certificate and feeds only the beds its patterns allow; a connection without
a device certificate gets one AR naming the reason and is closed; plaintext to the TLS port gets
nothing. Through the real ingest child (settings passed as its JSON config) and in-process."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bedside.protocol.types import Caller
from bedside.security.callers import CallerRegistry, Peer
from bedside.security.certs import Issued, fingerprint, make_ca, make_client, make_server
from bedside.security.tls import server_context
from bedside.settings import SecuritySettings
from bedside.streams.hl7v2 import VitalsMessage
from bedside.streams.ingest import IngestProcess
from bedside.streams.mllp import END, MLLPServer, frame
from bedside.streams.mllp_auth import BED_NOT_ALLOWED, NO_CERTIFICATE, NOT_A_DEVICE, ListenerSecurity

MESSAGE = (
    "MSH|^~\\&|MON|ICU|BEDSIDE|HOSP|{stamp}||ORU^R01|{control}|P|2.5\r"
    "PID|1||MRN1\rPV1|1|I|{unit}^{bed}\r"
    "OBX|1|NM|8867-4^HR^LN||80|/min|||||F\r"
)


def oru(control: str, unit: str, bed: int) -> bytes:
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())  # stamped now: older observations are refused
    return frame(MESSAGE.format(control=control, unit=unit, bed=bed, stamp=stamp))


@dataclass
class Deployment:
    folder: Path
    ca: Issued
    callers: Path

    def client(self, name: str, ca: Issued | None = None) -> tuple[Path, Path, Issued]:
        issued = make_client(ca or self.ca, name)
        cert, key = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        issued.write(cert, key)
        return cert, key, issued

    def register(self, issued: Issued, name: str, roles: list[str], beds: list[str]) -> None:
        registry = CallerRegistry(self.callers)
        registry.upsert(name, "icu", roles, beds)
        registry.add_certificate(name, fingerprint(issued.cert), issued.not_after)
        registry.save()

    def security(self, **changes: object) -> SecuritySettings:
        base = SecuritySettings(
            auth=True,
            tls_cert=str(self.folder / "server.pem"),
            tls_key=str(self.folder / "server.key"),
            tls_client_ca=str(self.folder / "ca.pem"),
            client_cert="optional",  # a monitor without a certificate reaches the listener and hears why
            callers_file=str(self.callers),
        )
        return dataclasses.replace(base, **changes)  # type: ignore[arg-type]

    def context(self, name: str | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.folder / "ca.pem")
        if name is not None:
            context.load_cert_chain(self.folder / f"{name}.pem", self.folder / f"{name}.key")
        return context


@pytest.fixture
def deployment(tmp_path: Path) -> Deployment:
    ca = make_ca()
    ca.write(tmp_path / "ca.pem", tmp_path / "ca.key")
    make_server(ca, []).write(tmp_path / "server.pem", tmp_path / "server.key")
    found = Deployment(tmp_path, ca, tmp_path / "callers.json")
    *_, monitor = found.client("mon-icu")
    found.register(monitor, "mon-icu", ["device"], ["ICU-*"])
    *_, analyst = found.client("analyst")
    found.register(analyst, "analyst", ["infer"], [])
    found.client("stranger")  # signed by the CA, in no callers file
    return found


async def answers(port: int, context: ssl.SSLContext | None, payloads: list[bytes]) -> tuple[list[str], bytes | None]:
    """The MSA of each answer; after a connection-level refusal (an AR with no control id), what
    followed it (b"": the listener closed the connection), else None."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    out = []
    try:
        for payload in payloads:
            writer.write(payload)
            await writer.drain()
            answer = (await asyncio.wait_for(reader.readuntil(END), 10)).decode()
            segments = answer.strip("\x0b\x1c\r").split("\r")
            out.append(segments[1] if len(segments) > 1 else segments[0])
            if out[-1].startswith("MSA|AR||"):
                return out, await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return out, None


async def plaintext(port: int) -> bytes | Exception:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(oru("P1", "ICU", 1))
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionError as exc:
        return exc
    finally:
        writer.close()


def test_a_device_feeds_its_beds_only_and_others_are_refused_with_the_reason(deployment: Deployment):
    stored: list[VitalsMessage] = []

    async def main() -> dict[str, object]:
        ingest = IngestProcess(stored.append, port=0, security=deployment.security())
        await ingest.start()
        try:
            port = ingest.port
            device = await answers(
                port, deployment.context("mon-icu"), [oru("C1", "ICU", 1), oru("C2", "WARD", 2), oru("C3", "ICU", 4)]
            )
            return {
                "device": device,
                "none": await answers(port, deployment.context(), [oru("N1", "ICU", 1)]),
                "stranger": await answers(port, deployment.context("stranger"), [oru("S1", "ICU", 1)]),
                "analyst": await answers(port, deployment.context("analyst"), [oru("A1", "ICU", 1)]),
                "plaintext": await plaintext(port),
                "status": ingest.status(),
            }
        finally:
            await ingest.close()

    seen = asyncio.run(main())
    (aa, ar, aa2), _ = seen["device"]  # type: ignore[misc]
    assert aa == "MSA|AA|C1" and aa2 == "MSA|AA|C3"
    assert ar.startswith(f"MSA|AR|C2|{BED_NOT_ALLOWED}")
    assert [m.bed for m in stored] == ["ICU-1", "ICU-4"]  # WARD-2 never reached the server
    assert seen["none"] == ([f"MSA|AR||{NO_CERTIFICATE}"], b"")  # the reason, then closed
    assert seen["stranger"] == (["MSA|AR||the client certificate is not registered to any caller"], b"")
    assert seen["analyst"] == ([f"MSA|AR||{NOT_A_DEVICE}"], b"")
    assert not (isinstance(seen["plaintext"], bytes) and seen["plaintext"])  # no answer over plain TCP
    status = seen["status"]
    assert isinstance(status, dict)
    assert status["accepted"] == 2 and status["rejected"] == 1 and status["refused_connections"] == 3


def test_with_client_certificates_required_a_monitor_without_one_fails_the_handshake(deployment: Deployment):
    stored: list[VitalsMessage] = []

    async def main() -> tuple[object, object]:
        ingest = IngestProcess(stored.append, port=0, security=deployment.security(client_cert="required"))
        await ingest.start()
        try:
            try:
                refused: object = await answers(ingest.port, deployment.context(), [oru("N1", "ICU", 1)])
            except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError) as exc:
                refused = exc
            return refused, await answers(ingest.port, deployment.context("mon-icu"), [oru("C1", "ICU", 1)])
        finally:
            await ingest.close()

    refused, device = asyncio.run(main())
    assert not isinstance(refused, tuple)  # no answer at all: TLS refused it
    assert device == (["MSA|AA|C1"], None) and len(stored) == 1


def test_tls_without_authentication_serves_any_verified_client(deployment: Deployment):
    stored: list[VitalsMessage] = []

    async def main() -> tuple[list[str], bytes | None]:
        security = deployment.security(auth=False, client_cert="required")
        ingest = IngestProcess(stored.append, port=0, security=security)
        await ingest.start()
        try:
            return await answers(ingest.port, deployment.context("stranger"), [oru("C1", "WARD", 9)])
        finally:
            await ingest.close()

    assert asyncio.run(main()) == (["MSA|AA|C1"], None)
    assert [m.bed for m in stored] == ["WARD-9"]


def test_authentication_without_a_way_to_identify_monitors_stops_the_start(deployment: Deployment):
    async def start(security: SecuritySettings) -> None:
        ingest = IngestProcess(lambda m: None, port=0, security=security)
        await ingest.start()
        await ingest.close()

    with pytest.raises(OSError, match=r"security\.auth is on, but monitors on MLLP are identified only by a client"):
        asyncio.run(start(SecuritySettings(auth=True)))
    with pytest.raises(OSError, match="identified only by a client certificate"):
        asyncio.run(start(deployment.security(mllp_tls=False)))
    with pytest.raises(OSError, match="identified only by a client certificate"):
        asyncio.run(start(deployment.security(tls_client_ca="")))
    with pytest.raises(OSError, match=r"^security\.tls_key does not match security\.tls_cert"):
        asyncio.run(start(deployment.security(tls_key=str(deployment.folder / "mon-icu.key"))))


def test_a_device_removed_while_connected_is_refused_at_its_next_message(deployment: Deployment):
    """In-process, with the lookup the callers file would give: a monitor keeps its connection
    for days, so the device is checked for every message, not once at connect."""
    *_, monitor = deployment.client("mon-x")
    devices = {Peer("mon-x", fingerprint(monitor.cert)): Caller("mon-x", "icu", frozenset({"device"}), ("ICU-*",))}
    context = server_context(deployment.security())
    assert context is not None
    guard = ListenerSecurity(context, devices.get)
    stored: list[VitalsMessage] = []

    async def run() -> tuple[list[str], bytes, dict[str, int]]:
        server = MLLPServer(stored.append, "127.0.0.1", 0, guard=guard)
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=deployment.context("mon-x"))
            seen = []
            for control, remove in (("C1", False), ("C2", True)):
                if remove:
                    devices.clear()  # `bedside tokens revoke mon-x`, as the registry would see it
                writer.write(oru(control, "ICU", 1))
                await writer.drain()
                seen.append((await asyncio.wait_for(reader.readuntil(END), 10)).decode().split("\r")[1])
            rest = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            return seen, rest, server.counters()
        finally:
            await server.close()

    seen, rest, counters = asyncio.run(run())
    assert seen[0] == "MSA|AA|C1"
    assert seen[1].startswith("MSA|AR|C2|the client certificate is not registered to any caller")
    assert rest == b"" and len(stored) == 1 and counters["rejected"] == 1
