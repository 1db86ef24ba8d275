"""The load generator of bench/streams.py, in a process of its own: lean (no torch, no models),
uvloop, garbage collector frozen after start-up, so its own pauses do not show up as server latency.

    python bench/_streams_load.py PORT MLLP_PORT BEDS SECONDS CHUNK   -> JSON on stdout
"""

from __future__ import annotations

import gc
import sys

import orjson
import uvloop

from bedside.tools.replay import replay


def main() -> None:
    port, mllp, beds, seconds, chunk = sys.argv[1:6]
    gc.collect()
    gc.freeze()  # the generator's heap is built: later collections only scan what the run creates
    stats = uvloop.run(
        replay(
            f"http://127.0.0.1:{port}",
            ("127.0.0.1", int(mllp)),
            int(beds),
            float(seconds),
            1.0,
            vitals_every=1.0,
            chunk=int(chunk),
        )
    )
    latencies = [r["latency_ms"] for r in stats.ecg_results if r.get("latency_ms") is not None]
    sys.stdout.buffer.write(orjson.dumps({"latencies_ms": latencies, "summary": stats.summary()}))


if __name__ == "__main__":
    main()
