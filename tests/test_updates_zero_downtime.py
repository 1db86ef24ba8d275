"""Zero downtime: requests keep flowing, and every one is answered, while a box goes through 100
switches (50 versions kept after their watch, 50 rolled back), each a real publish, TUF check,
install beside, golden check and switch on a loopback update server."""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from bedside.protocol.types import InferRequest
from bedside.repository.serving import read_state
from tests.fleet import box, scale_bytes, update_server

SWITCHES = 100


def test_requests_never_fail_through_100_updates_and_rollbacks(tmp_path):
    now = [1.0e9]
    with update_server(tmp_path / "pub") as server:
        server.roll_out("scale", server.publish("scale", scale_bytes(tmp_path, 2.0)), urgent=True)
        with box(tmp_path / "box", server, watch_s=60.0, clock=lambda: now[0]) as (dataplane, agent):
            assert agent.check()[0].action == "installed"
            answers: dict[float, int] = {}
            errors: list[str] = []
            stop = threading.Event()

            async def traffic() -> None:
                request = InferRequest({"x": np.ones((1, 4), np.float32)})
                while not stop.is_set():
                    try:
                        y = float((await dataplane.infer("scale", None, request)).outputs["y"][0, 0])
                        answers[y] = answers.get(y, 0) + 1
                    except Exception as exc:
                        errors.append(f"{type(exc).__name__}: {exc}")

            client = threading.Thread(target=asyncio.run, args=(traffic(),))
            client.start()
            try:
                kept = rolled_back = 0
                factors = [3.0, 4.0]
                for i in range(SWITCHES):
                    factor = factors[i % 2]
                    version = server.publish("scale", scale_bytes(tmp_path, factor))
                    server.roll_out("scale", version, urgent=True)
                    [outcome] = agent.check()
                    assert outcome.action == "watching", outcome
                    if i % 2:
                        assert agent.rollback("scale", "rolled back by the test").action == "rolled-back"
                        rolled_back += 1
                    else:
                        now[0] += 61.0
                        assert [o.action for o in agent.watch()] == ["kept"]
                        kept += 1
            finally:
                stop.set()
                client.join()
            assert (kept, rolled_back) == (SWITCHES // 2, SWITCHES // 2)
            assert errors == []
            assert sum(answers.values()) >= SWITCHES  # traffic really ran through the switches
            assert set(answers) <= {2.0, 3.0, 4.0} and 3.0 in answers
            assert read_state(tmp_path / "box" / "models" / "scale").phase == "serving"
