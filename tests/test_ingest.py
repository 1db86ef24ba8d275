"""HL7 ingest in its own process: ACK only once the serving side holds the observations, a NAK when
it cannot store them, a clear error when the port is taken, and a new child when one dies."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import pytest

from bedside.streams.hl7v2 import VitalsMessage
from bedside.streams.ingest import IngestProcess
from bedside.streams.mllp import END, frame

MESSAGE = (
    "MSH|^~\\&|MON|ICU|BEDSIDE|HOSP|20261123101500||ORU^R01|{control}|P|2.5\r"
    "PID|1||MRN1\rPV1|1|I|ICU^{bed}\r"
    "OBX|1|NM|8867-4^HR^LN||{hr}|/min|||||F\r"
    "OBX|2|NM|59408-5^SpO2^LN||96|%|||||F\r"
)


def oru(control: str, bed: int = 1, hr: float = 80) -> bytes:
    return frame(MESSAGE.format(control=control, bed=bed, hr=hr))


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
    assert answers[3][0].startswith("MSA|AR|A1|message type ADT^A01") and answers[3][1] == 3
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

    async def main() -> tuple[list[str], int, int, int, int]:
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
            return before + after, ingest.restarts, port, ingest.port, first
        finally:
            await ingest.close()

    answers, restarts, port_before, port_after, _ = asyncio.run(main())
    assert answers == ["MSA|AA|C1", "MSA|AA|C2"]
    assert restarts == 1 and port_before == port_after and len(stored) == 2
