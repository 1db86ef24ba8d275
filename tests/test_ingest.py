"""HL7 ingest in its own process: ACK only once the serving side holds the observations, a NAK when
it cannot store them, a clear error when the port is taken, and a new child when one dies."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from bedside.settings import DEFAULTS
from bedside.streams import beds as beds_module
from bedside.streams.hl7v2 import VitalsMessage
from bedside.streams.ingest import KEEP_PER_VITAL, IngestProcess
from bedside.streams.mllp import END, START, MLLPServer, frame

MESSAGE = (
    "MSH|^~\\&|MON|ICU|BEDSIDE|HOSP|{stamp}||ORU^R01|{control}|P|2.5\r"
    "PID|1||MRN1\rPV1|1|I|ICU^{bed}\r"
    "OBX|1|NM|8867-4^HR^LN||{hr}|/min|||||F\r"
    "OBX|2|NM|59408-5^SpO2^LN||96|%|||||F\r"
)


def oru(control: str, bed: int = 1, hr: float = 80) -> bytes:
    # stamped now: the parser refuses observations older than streams.max_observation_age_s
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    return frame(MESSAGE.format(control=control, bed=bed, hr=hr, stamp=stamp))


async def exchange(port: int, payload: bytes, answers: int = 1) -> list[str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    out = [(await asyncio.wait_for(reader.readuntil(END), 10)).decode() for _ in range(answers)]
    writer.close()
    return [a.strip("\x0b\x1c\r").split("\r")[1] for a in out]


def test_ack_only_after_the_serving_side_stored_the_message():
    stored: list[VitalsMessage] = []

    async def main() -> list[tuple[str, int]]:
        ingest = IngestProcess(stored.append, port=0)
        await ingest.start()
        try:
            seen = []
            for i in range(3):
                (msa,) = await exchange(ingest.port, oru(f"C{i}", bed=i, hr=70 + i))
                seen.append((msa, len(stored)))  # counted the moment the ACK arrives, no waiting
            bad = await exchange(ingest.port, frame("MSH|^~\\&|X|Y|Z|W|20261123||ADT^A01|A1|P|2.5\rPID|1||M"))
            return [*seen, (bad[0], len(stored))]
        finally:
            await ingest.close()

    answers = asyncio.run(main())
    assert answers[:3] == [("MSA|AA|C0", 1), ("MSA|AA|C1", 2), ("MSA|AA|C2", 3)]
    assert answers[3][0].startswith("MSA|AR|A1|message type ADT\\S\\A01") and answers[3][1] == 3  # ^ escaped
    assert [m.bed for m in stored] == ["ICU-0", "ICU-1", "ICU-2"]
    assert [o.value for o in stored[2].observations] == [72.0, 96.0]


def test_a_message_the_server_cannot_store_gets_a_nak_not_an_ack():
    def broken(message: VitalsMessage) -> None:
        raise RuntimeError("disk full")

    async def main() -> tuple[list[str], int]:
        ingest = IngestProcess(broken, port=0)
        await ingest.start()
        try:
            return await exchange(ingest.port, oru("C9")), ingest.accepted
        finally:
            await ingest.close()

    (msa,), accepted = asyncio.run(main())
    assert msa.startswith("MSA|AE|C9|the server could not store the observations; send again")
    assert accepted == 0


def test_a_taken_port_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def main() -> None:
            await IngestProcess(lambda m: None, port=port).start()

        with pytest.raises(OSError, match=f"cannot listen for HL7/MLLP on 127.0.0.1:{port}"):
            asyncio.run(main())


def test_a_dead_ingest_process_is_replaced_on_the_same_port():
    stored: list[VitalsMessage] = []

    async def main() -> tuple[list[str], int, int, int, dict]:
        ingest = IngestProcess(stored.append, port=0)
        await ingest.start()
        try:
            port, first = ingest.port, ingest.pid
            before = await exchange(port, oru("C1"))
            assert first is not None
            os.kill(first, signal.SIGKILL)
            for _ in range(200):  # the supervisor restarts it after a short backoff
                if ingest.restarts:
                    break
                await asyncio.sleep(0.05)
            after = await exchange(port, oru("C2"))
            return before + after, ingest.restarts, port, ingest.port, ingest.status()
        finally:
            await ingest.close()

    answers, restarts, port_before, port_after, status = asyncio.run(main())
    assert answers == ["MSA|AA|C1", "MSA|AA|C2"]
    assert restarts == 1 and port_before == port_after and len(stored) == 2
    assert status["connections"] == 2 and status["accepted"] == 2  # counted across both processes


# --- bounds on what connections can make the listener hold (issue 10, defect 17) ---------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def until(condition, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)  # polling a counter, bounded


def test_mllp_caps_connections_and_closes_silent_ones():
    received: list[VitalsMessage] = []

    async def main() -> None:
        server = MLLPServer(received.append, port=0, max_connections=2, idle_timeout_s=0.5)
        await server.start()
        try:
            talker = await asyncio.open_connection("127.0.0.1", server.port)
            silent = await asyncio.open_connection("127.0.0.1", server.port)
            await until(lambda: server.open_connections == 2)
            third = await asyncio.open_connection("127.0.0.1", server.port)
            assert await asyncio.wait_for(third[0].read(), 5) == b""  # closed at once, nothing read
            assert server.refused_connections == 1 and server.connections == 2
            for i in range(8):  # one message every 0.1 s: never idle for 0.5 s
                talker[1].write(oru(f"T{i}"))
                answer = await asyncio.wait_for(talker[0].readuntil(END), 5)
                assert b"MSA|AA|T" in answer
                await asyncio.sleep(0.1)
            assert await asyncio.wait_for(silent[0].read(), 5) == b""  # closed for silence
            assert server.idle_closed == 1
            talker[1].write(oru("T9"))
            assert b"MSA|AA|T9" in await asyncio.wait_for(talker[0].readuntil(END), 5)
            talker[1].close()
            await until(lambda: server.open_connections == 0)
        finally:
            await server.close()

    asyncio.run(main())


def test_a_peer_that_never_reads_its_answers_is_closed_as_idle():
    """Its answers fill the socket and the listener waits to send them: that wait is bounded by
    the idle timeout too, so it cannot hold a connection slot for ever."""

    async def main() -> dict[str, int]:
        server = MLLPServer(lambda m: None, port=0, idle_timeout_s=0.5)
        await server.start()
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", server.port))
            await loop.sock_sendall(sock, (START + b"x" + END) * 100_000)  # 100,000 NAKs, none read
            await until(lambda: server.connections == 1 and server.open_connections == 0, 20)
            return server.counters()
        finally:
            sock.close()
            await server.close()

    counters = asyncio.run(main())
    assert counters["idle_closed"] == 1 and 0 < counters["rejected"] < 100_000


def test_unfinished_frames_share_a_memory_bound_and_the_largest_is_refused():
    received: list[VitalsMessage] = []
    mb = 1 << 20

    async def main() -> None:
        server = MLLPServer(received.append, port=0, max_frame=2 * mb, max_buffered=3 * mb)
        await server.start()
        try:
            conns = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(4)]
            held = 0
            for (_, writer), size in zip(conns[:3], (1.0, 1.2, 0.6), strict=True):
                writer.write(START + b"A" * int(size * mb))
                held += int(size * mb)
                await until(lambda held=held: server.buffered == held)
            conns[3][1].write(START + b"B" * int(0.9 * mb))  # 3.7 MB in all: the 1.2 MB frame goes
            answer = await asyncio.wait_for(conns[1][0].read(), 5)
            assert answer.startswith(START) and b"MSA|AR||unfinished messages exceed the listener's 3 MiB" in answer
            await until(lambda: server.buffered == int(1.0 * mb) + int(0.6 * mb) + int(0.9 * mb))
            assert server.shed == 1 and server.open_connections == 3
            # the others are still served: finish the first one's frame, then a real message
            conns[0][1].write(END + oru("K1"))
            first = await asyncio.wait_for(conns[0][0].readuntil(END), 5)
            second = await asyncio.wait_for(conns[0][0].readuntil(END), 5)
            assert b"MSA|AR" in first and b"MSA|AA|K1" in second
            for _, writer in conns:
                writer.close()
            await until(lambda: server.open_connections == 0 and server.buffered == 0)
        finally:
            await server.close()

    asyncio.run(main())


def test_memory_comes_back_after_unfinished_frames_close():
    """200 connections each sending 1 MB with no end block grew the ingest process 25 -> 232 MB,
    97 MB of it kept after they closed. Now the unfinished frames are bounded together and the
    memory goes back when they close."""
    settings = dataclasses.replace(DEFAULTS.streams, mllp_max_buffered_mb=16)

    async def main() -> tuple[float, float, float, dict]:
        ingest = IngestProcess(lambda m: None, port=0, settings=settings)
        await ingest.start()
        try:
            assert ingest.pid is not None
            await asyncio.sleep(0.3)
            before = rss_mb(ingest.pid)
            conns = [await asyncio.open_connection("127.0.0.1", ingest.port) for _ in range(100)]
            for _, writer in conns:
                writer.write(START + b"A" * ((1 << 20) - 64))
            await asyncio.gather(*(w.drain() for _, w in conns), return_exceptions=True)
            await until(lambda: ingest.status()["shed"] >= 80, 30)
            await asyncio.sleep(1.0)  # the heap is trimmed at most every 0.5 s
            held = rss_mb(ingest.pid)
            for _, writer in conns:
                writer.close()
            await until(lambda: ingest.status()["open_connections"] == 0, 30)
            await asyncio.sleep(1.0)
            return before, held, rss_mb(ingest.pid), ingest.status()
        finally:
            await ingest.close()

    before, held, after, status = asyncio.run(main())
    assert held - before < 16 + 24, (before, held)  # the bound, plus read buffers and over-allocation
    assert after - before < 8, (before, held, after)
    assert status["connections"] == 100 and status["shed"] >= 80 and status["open_connections"] == 0


def test_a_message_with_more_readings_than_a_bed_keeps_reaches_the_server_as_one_window():
    """The serving loop and the journal never get more of one message than a bed keeps: per vital
    sign the newest MAX_POINTS readings (a bed would drop the rest at once). Here 1,000 heart
    rates, newest first; the parser refuses messages of more than hl7v2.MAX_PARTS fields."""
    stored: list[VitalsMessage] = []
    now = int(time.time())
    stamps = [now - 1000 + i for i in range(1000)][::-1]
    obx = [
        f"OBX|{i + 1}|NM|8867-4||{60 + i % 50}||||||F|||{time.strftime('%Y%m%d%H%M%S', time.gmtime(t))}"
        for i, t in enumerate(stamps)
    ]
    head = MESSAGE.format(control="BIG", bed=5, hr=80, stamp=time.strftime("%Y%m%d%H%M%S", time.gmtime(now)))
    text = "\r".join(head.split("\r")[:3] + obx) + "\r"

    async def main() -> list[str]:
        ingest = IngestProcess(stored.append, port=0)
        await ingest.start()
        try:
            return await exchange(ingest.port, frame(text))
        finally:
            await ingest.close()

    (msa,) = asyncio.run(main())
    assert msa.startswith("MSA|AA|BIG")
    (message,) = stored
    assert len(message.observations) == beds_module.MAX_POINTS == KEEP_PER_VITAL
    assert sorted(o.time for o in message.observations) == sorted(stamps)[-beds_module.MAX_POINTS :]
