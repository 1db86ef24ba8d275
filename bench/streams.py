"""How many beds one box sustains in real time: each bed streams 12-lead ECG at 250 Hz over a
WebSocket (0.2 s or 1 s chunks, a 5 s window classified every second; beds start at staggered
phases, as independent monitors do) and vital signs over HL7/MLLP every second, all beds' HL7 in the
same instant (the worst case: a central station forwarding a ward at once); the scorer also runs
NEWS2/qSOFA and the deterioration model every 15 s.

    python bench/streams.py [--beds 50,100,200,300,400] [--seconds 15] [--quick]

Window->score latency is what the server measures per window (route, queue, batch, model, result).
The ECG model is the 1D-CNN reference architecture (random weights: cost, not accuracy), FP32 and
INT8 (static, calibrated on SYNTHETIC ECG). All streams are SYNTHETIC (bedside.synthetic). The load
generator (bench/_streams_load.py, its own lean process) shares the box's two cores with the server.
Each level gets a fresh server. Prints a table; writes bench/results/streams.json and streams.png
(--quick: one level, 20 beds, INT8, 0.2 s chunks, 6 s; results in bench/results/quick/).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # first: from here on a Ctrl-C ends the script without a traceback
    console,
    free_port,
    machine,
    main_guard,
    parse_args,
    plural,
    popen,
    require,
    result_path,
    say,
    server,
    table,
    write_results,
)

# isort: split
import numpy as np

TARGET_P99_MS = 10.0
LOAD = Path(__file__).parent / "_streams_load.py"


def build_repo(root: Path, int8: bool) -> None:
    import tomli_w
    import torch

    from bedside.models.demo import _vitals_deterioration
    from bedside.models.reference import ECGNet
    from bedside.pipeline.export import export_torch
    from bedside.pipeline.optimize import optimize_file
    from bedside.synthetic.ecg import RHYTHMS, dataset

    vitals = _vitals_deterioration()
    (root / "vitals_deterioration" / "1").mkdir(parents=True)
    (root / "vitals_deterioration" / "1" / "model.onnx").write_bytes(vitals.onnx_bytes)
    (root / "vitals_deterioration" / "config.toml").write_text(
        tomli_w.dumps(
            {
                k: v
                for k, v in vitals.config.to_dict().items()
                if k not in ("threads", "scheduling", "queue_policy", "tenants")
            }
        )
    )
    torch.manual_seed(0)
    x, _ = dataset(64, seed=3)
    fp32 = root / "ecg_rhythm" / "1" / "model.onnx"
    fp32.parent.mkdir(parents=True)
    fp32.write_bytes(
        export_torch(
            torch.nn.Sequential(ECGNet(), torch.nn.Softmax(dim=1)).eval(),
            {"ecg": x[:4]},
            output_names=["probabilities"],
        ).to_bytes()
    )
    if int8:
        quantized = optimize_file(fp32, root / "int8.onnx", "int8-static", {"ecg": x})
        fp32.write_bytes(quantized.read_bytes())
        quantized.unlink()
    (root / "ecg_rhythm" / "config.toml").write_text(
        "max_batch_size = 8\ninstances = 2\nthreads = 1\n"
        '[[inputs]]\nname = "ecg"\ndatatype = "FP32"\nshape = [12, 1250]\n'
        '[[outputs]]\nname = "probabilities"\ndatatype = "FP32"\nshape = [5]\n'
        "[contract]\nlabels = [" + ", ".join(f'"{r}"' for r in RHYTHMS) + "]\n"
    )


def level(port: int, mllp: int, beds: int, seconds: float, chunk: int) -> dict:
    load = popen(
        [sys.executable, str(LOAD), *map(str, (port, mllp, beds, seconds, chunk))],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = load.communicate()
    if load.returncode:
        lines = stderr.decode(errors="replace").strip().splitlines() or ["(no output)"]
        raise RuntimeError(
            f"the load generator (bench/_streams_load.py) exited with code {load.returncode}: {lines[-1]}"
        )
    result = json.loads(stdout)
    latencies, summary = result["latencies_ms"], result["summary"]
    status = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/streams"))
    return {
        "beds": beds,
        "ecg_windows": len(latencies),
        "expected_windows": beds * int(seconds - 4),
        "p50_ms": round(float(np.percentile(latencies, 50)), 3) if latencies else None,
        "p99_ms": round(float(np.percentile(latencies, 99)), 3) if latencies else None,
        "max_ms": round(float(np.max(latencies)), 3) if latencies else None,
        "within_4ms_share": round(summary["ecg_within_4ms"] / max(1, len(latencies)), 3),
        "hl7_acked": summary["hl7_acked"],
        "hl7_sent": summary["hl7_sent"],
        "errors": summary["errors"],
        "vitals_scoring_cycles": status["scoring"]["cycles"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beds", default="50,100,200,300,400")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each level's real-time run")
    parser.add_argument("--chunks", default="50,250", help="ECG samples per WebSocket message (50 = 0.2 s, 250 = 1 s)")
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument("--score-interval", default="15", help="seconds between per-bed vital-sign scorings")
    args = parse_args(parser, beds="20", seconds=6.0, chunks="50", precisions="int8")
    if args.seconds <= 4:
        parser.error("--seconds must be over 4: the first ECG window is full after 5 s")
    counts = [int(b) for b in args.beds.split(",")]
    chunks = [int(c) for c in args.chunks.split(",")]
    precisions = args.precisions.split(",")
    require("torch", "matplotlib", "onnx")  # the plot comes last: fail now, not then
    say(
        f"streams: beds sustained in real time, {plural(len(precisions) * len(chunks) * len(counts), 'level')} of "
        f"{args.seconds:g} s (a fresh server each)"
    )
    rows = []
    for precision in precisions:
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
            say(f"streams: building ecg_rhythm (1D-CNN, random weights, {precision}) and vitals_deterioration...")
            build_repo(Path(tmp), precision == "int8")
            for chunk, beds in [(c, b) for c in chunks for b in counts]:
                mllp = free_port()
                with server(Path(tmp), "--mllp-port", str(mllp), "--score-interval", args.score_interval) as (_, port):
                    say(f"  {precision}, {chunk / 250:g} s chunks, {beds} beds: {args.seconds:g} s... ", end="")
                    row = {
                        "model": f"ecg_cnn_{precision}",
                        "chunk_s": chunk / 250,
                        **level(port, mllp, beds, args.seconds, chunk),
                    }
                row["realtime_ok"] = bool(
                    row["p99_ms"] is not None
                    and row["p99_ms"] <= TARGET_P99_MS
                    and row["ecg_windows"] >= 0.98 * row["expected_windows"]
                    and row["hl7_acked"] == row["hl7_sent"]
                )
                rows.append(row)
                say(f"p99 {row['p99_ms']} ms, windows {row['ecg_windows']}/{row['expected_windows']}")
    table(
        f"beds sustained in real time ({args.seconds:g} s per level)",
        rows,
        [
            "model",
            "chunk_s",
            "beds",
            "ecg_windows",
            "expected_windows",
            "p50_ms",
            "p99_ms",
            "max_ms",
            "within_4ms_share",
            "hl7_acked",
            "realtime_ok",
        ],
    )
    series = sorted({(r["model"], r["chunk_s"]) for r in rows})
    best = {
        f"{m}, {c:g} s chunks": max(
            [r["beds"] for r in rows if (r["model"], r["chunk_s"]) == (m, c) and r["realtime_ok"]], default=0
        )
        for m, c in series
    }
    console.print(f"most beds with window->score p99 <= {TARGET_P99_MS} ms: {best} (target >= 200)")
    write_results(
        "streams",
        {"rows": rows, "max_beds": best, "target_p99_ms": TARGET_P99_MS, "target_beds": 200, "machine": machine()},
    )
    plot(rows, result_path("streams.png"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for model, chunk in sorted({(r["model"], r["chunk_s"]) for r in rows}):
        pts = [
            (r["beds"], r["p99_ms"])
            for r in rows
            if (r["model"], r["chunk_s"]) == (model, chunk) and r["p99_ms"] is not None
        ]
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"{model}, {chunk:g} s chunks")
    ax.axhline(TARGET_P99_MS, color="r", linestyle="--", label="p99 target 10 ms")
    ax.axvline(200, color="grey", linestyle=":", label="target 200 beds")
    ax.set_xlabel("beds (12-lead ECG at 250 Hz + vitals every 1 s)")
    ax.set_ylabel("window -> score p99 (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Beds one 2-core box sustains in real time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main_guard(main)
