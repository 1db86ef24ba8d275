"""The MLLP listener under arbitrary bytes: noise, runs of start blocks, frames cut anywhere, frames
over the limit, with valid ORU messages among them. Whatever arrives, the listener stays up, each
complete valid frame gets exactly one answer, nothing unexpected is logged, and every connection
is released."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import socket
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bedside.streams.hl7v2 import VitalsMessage
from bedside.streams.mllp import END, START, Framer, MLLPServer, frame

MAX_FRAME = 8192
NOISE = st.binary(max_size=150)  # any bytes, start and end blocks included
CLEAN = st.binary(max_size=120).map(lambda b: b.replace(START, b"").replace(b"\x1c", b""))


def valid(control: str) -> bytes:
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    return frame(
        f"MSH|^~\\&|MON|ICU|BEDSIDE|HOSP|{stamp}||ORU^R01|{control}|P|2.5\r"
        "PID|1||MRN1\rPV1|1|I|ICU^7\r"
        "OBX|1|NM|8867-4^HR^LN||80|/min|||||F\rOBX|2|NM|59408-5^SpO2^LN||96|%|||||F\r"
    )


# one element of a connection's byte stream: (kind, bytes)
ELEMENT = st.one_of(
    NOISE.map(lambda b: ("noise", b)),
    st.integers(1, 40).map(lambda n: ("starts", START * n)),
    CLEAN.map(lambda b: ("junk", START + b + END)),  # a complete frame that is not HL7
    st.just(("valid", b"")),
)
OVERSIZE = st.one_of(
    st.integers(1, 300).map(lambda n: START + b"A" * (MAX_FRAME + n)),  # never ends
    st.integers(1, 300).map(lambda n: START + b"A" * (MAX_FRAME + n) + END),  # ends, too late
)


def stream(elements: list[tuple[str, bytes]], tail: bytes | None, first: int) -> tuple[bytes, list[str]]:
    """The bytes of one connection and the control ids of its valid frames."""
    parts, controls = [], []
    for kind, data in elements:
        if kind == "valid":
            controls.append(f"V{first + len(controls)}")
            data = valid(controls[-1])
        parts.append(data)
    return b"".join(parts) + (tail or b""), controls


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def reference(data: bytes) -> tuple[list[bytes], bool]:
    """What a framer must find: payloads between a start block and the first end block after it
    with no start block between (a new start block begins a new frame), up to the first one over
    the limit, and whether one was."""
    payloads = []
    for match in re.finditer(rb"\x0b([^\x0b]*?)\x1c\r", data):
        if len(match.group(1)) > MAX_FRAME:
            return payloads, True
        payloads.append(match.group(1))
    tail = data[data.rfind(END) + 2 :] if END in data else data
    open_frame = tail[tail.rfind(START) + 1 :] if START in tail else b""
    return payloads, START in tail and len(open_frame) > MAX_FRAME


@settings(max_examples=500, deadline=None)
@given(st.lists(ELEMENT, max_size=20), st.none() | OVERSIZE, st.lists(st.integers(0, 1 << 16), max_size=30))
def test_framing_does_not_depend_on_where_reads_end(elements, tail, points):
    data, _ = stream(elements, tail, 0)
    expected, too_large = reference(data)
    whole = Framer(MAX_FRAME)
    assert whole.feed(data) == expected and whole.too_large == too_large
    pieces, framer = [], Framer(MAX_FRAME)
    for chunk in cut(data, points):
        if framer.too_large:
            break
        pieces += framer.feed(chunk)
    assert pieces == expected and framer.too_large == too_large


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def converse(port: int, chunks: list[bytes]) -> bytes:
    """Send the chunks (a moment between them, so the listener sees them as separate reads), then
    half-close and read every answer until the listener closes. Raw sockets: the answers already
    received are read even when the listener reset the connection."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    received = b""
    try:
        try:
            for chunk in chunks:
                await loop.sock_sendall(sock, chunk)
                await asyncio.sleep(0.001)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the listener closed it (a frame over the limit): read what it answered
        while True:
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
            except ConnectionError:
                break
            if not data:
                break
            received += data
    finally:
        sock.close()
    return received


def answers(data: bytes) -> list[str]:
    return [a.strip(START + b"\r").decode().split("\r")[1] for a in data.split(END) if START in a]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.lists(ELEMENT, max_size=12), st.none() | OVERSIZE, st.lists(st.integers(0, 1 << 16), max_size=8)),
        min_size=1,
        max_size=3,
    )
)
def test_the_listener_survives_any_bytes(connections):
    received: list[VitalsMessage] = []
    errors = Errors()
    logging.getLogger().addHandler(errors)

    async def main() -> tuple[list[list[str]], list[list[str]], list[str], int]:
        server = MLLPServer(received.append, port=0, max_frame=MAX_FRAME)
        await server.start()
        try:
            streams, first = [], 0
            for elements, tail, _ in connections:
                data, controls = stream(elements, tail, first)
                streams.append((data, controls))
                first += len(controls)
            replies = await asyncio.gather(
                *(
                    converse(server.port, cut(data, points))
                    for (data, _), (_, _, points) in zip(streams, connections, strict=True)
                )
            )
            after = answers(await converse(server.port, [valid("AFTER")]))
            deadline = time.monotonic() + 5
            while server.open_connections and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # polling a counter, bounded
            return [answers(r) for r in replies], [c for _, c in streams], after, server.open_connections
        finally:
            await server.close()

    try:
        replies, controls, after, still_open = asyncio.run(main())
    finally:
        logging.getLogger().removeHandler(errors)
    for got, wanted, (_, tail, _) in zip(replies, controls, connections, strict=True):
        accepted = [a for a in got if a.startswith("MSA|AA|")]
        assert accepted == [f"MSA|AA|{c}" for c in wanted]  # each valid frame once, in order
        assert all(a.startswith(("MSA|AR|", "MSA|AE|")) for a in got if not a.startswith("MSA|AA|"))
        if tail is not None and got:
            assert got[-1].startswith(f"MSA|AR||frame exceeds {MAX_FRAME} bytes")
    assert after == ["MSA|AA|AFTER"]
    assert sorted(m.control_id for m in received) == sorted([c for cs in controls for c in cs] + ["AFTER"])
    assert still_open == 0
    assert not [r for r in errors.records if r.levelno >= logging.ERROR], [r.getMessage() for r in errors.records]
