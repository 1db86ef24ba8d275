"""A fleet of real `bedside serve` boxes updating over the air, on loopback: a failed canary halts its
rollout, a good version rolls out stage by stage (with a pause and a resume), all with the CLI.

    python bench/update_fleet.py [--boxes 20] [--watch-s 5] [--rate 5] [--quick]

Prints a table per stage and writes bench/results/update_fleet.json and update_fleet.md (--quick:
6 boxes, a 3 s watch, results in bench/results/quick/). What runs:

  publisher  `bedside publish init`, `publish add` for each version and `publish serve` (the signed
             repository and POST /reports/<device>), as a child process on a free port.
  boxes      N `bedside serve` processes, each with its own device id, model repository (empty at
             first), state dir and port, started a few at a time (--starting) and probed on
             /v2/health/ready; the update agent inside each polls every --poll-s seconds and watches a
             new version --watch-s seconds (BEDSIDE_UPDATES_WATCH_MIN_REQUESTS=10).
  v1         y = 2x (tests/models.py scale_model, 20,000 extra weights: an 80 KB file), rolled out at
             100 %: every box installs its first model through the agent itself.
  traffic    from then on, --rate infer requests a second to every box over keep-alive HTTP, half of
             them with a negative value (real readings: standardized features go below zero); every
             answer is checked against the version that says it answered (model_version).
  scenario 1 "canary fails": v2 = y = log(x) with a golden.json of positive inputs, so it passes the
             golden check and answers NaN (422) on the negative half of the traffic; stages 10,50,100.
             The canary boxes' watch rolls it back, `bedside rollout advance` halts the rollout
             (exit 1), and the boxes outside the canary never install it.
  scenario 2 "rollout completes": v3 = y = 3x, stages 10,50,100, advanced by `bedside rollout
             advance --min-kept E` (E: the boxes the stage admits) as soon as the reports show every
             box of the stage kept it; right after the advance to stage 2 the rollout is paused
             (`rollout pause`, from a CLI process started beforehand so that it lands within
             milliseconds of the advance) for --hold-s seconds, then resumed.

Between decisions the script reads the same reports as `bedside rollout status`, in-process, every
0.25 s (a CLI call costs ~0.7 s of CPU, a lot on two cores with 20 boxes) and samples them for the
per-box timeline: when each box first reports the version, keeps it or rolls it back, and the bytes
its install downloaded (a report's "last" outcome carries them only until the box's next pass, so a
sample every 0.2 s catches them; the table says how many installs it caught). Device ids are
ward-K-bed-NN, K the first ward whose ids put at least one box in the 10 % stage and leave boxes for
the 50 % and 100 % stages (a fleet of a few boxes hashes unevenly; hundreds would not need this).
At the end every box's log is scanned for tracebacks and errors. Every process the script starts is
stopped when it ends, however it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/models.py: the update tests' models
from _common import (  # first: from here on a Ctrl-C ends the script without a traceback
    NAME,
    _ready,
    _response_complete,
    _status,
    console,
    free_port,
    http_request,
    machine,
    main_guard,
    parse_args,
    popen,
    result_path,
    rss_mb,
    say,
    stop,
    stop_children,
    table,
    write_results,
)

# isort: split
import bsdiff4
import numpy as np
import onnxruntime as ort
from tests.models import SCALE_CONFIG, log_model, scale_model

from bedside.repository.serving import read_state
from bedside.updates.progress import decide, stage_health
from bedside.updates.publisher import Publisher
from bedside.updates.reports import ReportStore
from bedside.updates.rollout import Stage, device_bucket, parse_stages
from grpc_latency import cpu_seconds

MODEL = "scale"
STAGES = "10,50,100"
WATCH_MIN_REQUESTS = 10
SAMPLE_S = 0.2  # report sampling
HEALTH_S = 0.25  # in-process `rollout status`
POSITIVE = [0.5, 1.0, 2.0, 3.0]
NEGATIVE = [-1.0, 0.5, 2.0, 3.0]
FUNCTIONS = {"1": lambda x: 2 * x, "2": np.log, "3": lambda x: 3 * x}  # what each version computes
COLUMNS = [
    "scenario",
    "version",
    "stage",
    "eligible",
    "new",
    "installed",
    "kept",
    "rolled_back",
    "refused",
    "behind",
    "install_p50_s",
    "install_max_s",
    "healthy_s",
    "decision",
    "decision_s",
    "downloaded",
    "delta",
]
HEADS = {
    "eligible": "eligible",
    "new": "new",
    "rolled_back": "rolled back",
    "install_p50_s": "install p50 s",
    "install_max_s": "install max s",
    "healthy_s": "healthy s",
    "decision_s": "decided s",
    "downloaded": "downloaded B",
    "delta": "delta/caught",
}


# --- the fleet ----------------------------------------------------------------------------------


@dataclass
class Box:
    device: str
    bucket: float
    folder: Path
    port: int = 0
    proc: Any = None
    log: Path | None = None
    ready_s: float = 0.0

    @property
    def models(self) -> Path:
        return self.folder / "models"


def fleet_ids(n: int, stages: list[Stage]) -> tuple[list[str], int]:
    """ward-K-bed-NN for the first ward K whose boxes fill the first stage with at least one and leave
    boxes for each later stage."""
    for ward in range(1, 1000):
        ids = [f"ward-{ward}-bed-{i:02d}" for i in range(1, n + 1)]
        counts = [sum(device_bucket(d) < s.percent for d in ids) for s in stages]
        if counts[0] >= 1 and all(b > a for a, b in itertools.pairwise(counts)):
            return ids, ward
    raise RuntimeError(f"no ward of {n} boxes fills every stage of {STAGES}: use more boxes")


def admitted(box: Box, stages: list[Stage], index: int) -> bool:
    return any(s.admits(box.bucket, frozenset()) for s in stages[: index + 1])


class Cli:
    """`bedside ...` as a child process, with the command line kept (paths shown as R, K, D, MODELS)."""

    RUNNER = (
        "import sys, bedside.cli, bedside.updates.publisher, bedside.updates.progress, bedside.updates.reports\n"
        "sys.stdin.readline()\nsys.argv = ['bedside', *sys.argv[1:]]\nbedside.cli.main()\n"
    )

    def __init__(self, names: dict[Path, str], env: dict[str, str]) -> None:
        self.names = names
        self.env = {**env, "COLUMNS": "240", "NO_COLOR": "1", "TERM": "dumb"}
        self.log: list[dict[str, Any]] = []

    def shown(self, args: list[str]) -> str:
        out = []
        for arg in args:
            for path, name in self.names.items():
                arg = arg.replace(str(path), name)
            out.append(arg)
        return "bedside " + " ".join(out)

    def run(self, *args: str, timeout: float = 120.0) -> tuple[int, str, float]:
        t0 = time.monotonic()
        proc = popen([sys.executable, "-m", "bedside", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                     stdin=subprocess.DEVNULL, env=self.env)  # fmt: skip
        out, _ = proc.communicate(timeout=timeout)
        return self._done(list(args), proc.returncode, out, t0)

    def prepared(self, *args: str) -> Any:
        """A CLI process that has imported everything and waits for `go` (see `go`)."""
        proc = popen([sys.executable, "-c", self.RUNNER, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, env=self.env)  # fmt: skip
        proc.bench_args = list(args)
        return proc

    def go(self, proc: Any, timeout: float = 60.0) -> tuple[int, str, float]:
        t0 = time.monotonic()
        out, _ = proc.communicate(b"go\n", timeout=timeout)
        return self._done(proc.bench_args, proc.returncode, out, t0, prewarmed=True)

    def _done(self, args: list[str], rc: int, out: bytes, t0: float, prewarmed: bool = False) -> tuple[int, str, float]:
        text = out.decode(errors="replace").strip()
        seconds = time.monotonic() - t0
        entry = {"command": self.shown(args), "rc": rc, "seconds": round(seconds, 2), "output": self.shown([text])[8:]}
        if prewarmed:
            entry["prewarmed"] = True
        self.log.append(entry)
        return rc, text, seconds


# --- traffic and report sampling ----------------------------------------------------------------


class Traffic:
    """`rate` infer requests a second to every box, half with a negative value, on one keep-alive
    connection per box, from an event loop in a thread. Counts by (phase, device, status, version)."""

    def __init__(self, boxes: list[Box], rate: float) -> None:
        self.boxes, self.rate = boxes, rate
        self.phase = "v1"
        self.counts: collections.Counter[tuple[str, str, int, str]] = collections.Counter()
        self.wrong: collections.Counter[tuple[str, str]] = collections.Counter()  # answers not from the version named
        self.errors: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()  # the counters are read from the main thread
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="traffic", daemon=True)
        path = f"/v2/models/{MODEL}/infer"
        self.requests = [
            (
                x,
                http_request(
                    path,
                    json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": x}]}).encode(),
                    {"Content-Type": "application/json"},
                ),
            )
            for x in (POSITIVE, NEGATIVE)
        ]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    async def _main(self) -> None:
        await asyncio.gather(*(self._box(box) for box in self.boxes))

    async def _box(self, box: Box) -> None:
        pace = 1.0 / self.rate
        await asyncio.sleep(random.random() * pace)
        sent = 0
        while not self._stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", box.port)
            except OSError as exc:
                with self.lock:
                    self.errors[f"{box.device}: connect {type(exc).__name__}"] += 1
                await asyncio.sleep(0.5)
                continue
            next_send = time.monotonic()
            try:
                while not self._stop.is_set():
                    delay = next_send - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    next_send = max(next_send + pace, time.monotonic() - pace)
                    x, request = self.requests[sent % 2]
                    sent += 1
                    phase = self.phase
                    writer.write(request)
                    buf = b""
                    while not (n := _response_complete(buf)):
                        chunk = await asyncio.wait_for(reader.read(65536), 10.0)
                        if not chunk:
                            raise ConnectionResetError("closed")
                        buf += chunk
                    self._count(phase, box.device, _status(buf), buf[:n], x)
            except (OSError, TimeoutError, ValueError, KeyError) as exc:
                with self.lock:
                    self.errors[f"{box.device}: {type(exc).__name__}"] += 1
                await asyncio.sleep(0.2)
            finally:
                writer.close()

    def _count(self, phase: str, device: str, status: int, response: bytes, x: list[float]) -> None:
        version = "-"
        if status == 200:
            doc = json.loads(response.partition(b"\r\n\r\n")[2])
            version = str(doc.get("model_version"))
            got = np.asarray(doc["outputs"][0]["data"], dtype=np.float32)
            want = FUNCTIONS.get(version, lambda v: v * np.nan)(np.asarray(x, dtype=np.float32))
            if not np.allclose(got, want, rtol=1e-5, atol=1e-6):
                with self.lock:
                    self.wrong[(phase, device)] += 1
        with self.lock:
            self.counts[(phase, device, status, version)] += 1

    def summary(self, phase: str, devices: set[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"requests": 0, "ok_by_version": {}, "status_422": 0, "other": {}}
        with self.lock:
            counts, wrong = dict(self.counts), dict(self.wrong)
        for (p, device, status, version), n in counts.items():
            if p != phase or device not in devices:
                continue
            out["requests"] += n
            if status == 200:
                out["ok_by_version"][f"v{version}"] = out["ok_by_version"].get(f"v{version}", 0) + n
            elif status == 422:
                out["status_422"] += n
            else:
                out["other"][str(status)] = out["other"].get(str(status), 0) + n
        out["wrong_answers"] = sum(n for (p, d), n in wrong.items() if p == phase and d in devices)
        return out

    def answered(self, phase: str, device: str, version: str) -> int:
        with self.lock:
            return self.counts[(phase, device, 200, version)]


class Sampler:
    """Reads every box's report each SAMPLE_S seconds: when a box first reported each (version, event),
    the bytes its install downloaded, and the last action each box reported."""

    def __init__(self, reports: Path) -> None:
        self.store = ReportStore(reports)
        self.events: dict[tuple[str, int, str], float] = {}  # (device, version, on|kept|rolled-back|refused)
        self.downloads: dict[tuple[str, int], tuple[int, bool]] = {}
        self.actions: dict[str, tuple[str, int | None]] = {}  # device -> (last action, its version)
        self.action_log: collections.Counter[tuple[str, int | None, str]] = collections.Counter()
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(SAMPLE_S)

    def sample(self) -> None:
        now = time.monotonic()
        reports = self.store.all()
        with self.lock:
            for device, report in reports.items():
                state = (report.get("serving") or {}).get(MODEL) or {}
                last = (report.get("last") or {}).get(MODEL) or {}
                version = state.get("version")
                if isinstance(version, int):
                    self.events.setdefault((device, version, "on"), now)
                    if state.get("phase") == "serving":
                        self.events.setdefault((device, version, "kept"), now)
                for refused in state.get("refused") or {}:
                    self.events.setdefault((device, int(refused), "refused"), now)
                current = (report.get("now") or {}).get(MODEL) or {}
                if current:  # what the box's latest pass did (a paused or halted plan is said here)
                    self.action_log[(device, current.get("version"), str(current.get("action")))] += 1
                if last:
                    action, wanted = str(last.get("action")), last.get("version")
                    self.actions[device] = (action, wanted)
                    self.action_log[(device, wanted, action)] += 1
                    if action == "rolled-back" and isinstance(wanted, int):
                        self.events.setdefault((device, wanted, "rolled-back"), now)
                    if int(last.get("downloaded") or 0) > 0 and isinstance(wanted, int):
                        self.downloads.setdefault((device, wanted), (int(last["downloaded"]), bool(last.get("delta"))))

    def at(self, device: str, version: int, event: str) -> float | None:
        with self.lock:
            return self.events.get((device, version, event))

    def saw(self, device: str, version: int, action: str) -> bool:
        with self.lock:
            return self.action_log[(device, version, action)] > 0


# --- a run --------------------------------------------------------------------------------------


@dataclass
class Run:
    args: Any
    tmp: Path
    boxes: list[Box] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    cli: Cli | None = None
    traffic: Traffic | None = None
    sampler: Sampler | None = None

    @property
    def repo(self) -> Path:
        return self.tmp / "R"

    @property
    def keys(self) -> Path:
        return self.tmp / "K"

    @property
    def reports(self) -> Path:
        return self.tmp / "D"

    @property
    def sources(self) -> Path:
        return self.tmp / "MODELS"

    def check(self, what: str, passed: bool, detail: str = "") -> None:
        self.checks.append({"check": what, "passed": bool(passed), "detail": detail})
        mark = "[green]ok[/green]" if passed else "[red]FAILED[/red]"
        console.print(f"  {mark} {what}" + (f" ({detail})" if detail else ""), highlight=False)
        if not passed:
            self.problems.append(f"check failed: {what}" + (f" ({detail})" if detail else ""))

    def bedside(self, *args: str) -> tuple[int, str, float]:
        assert self.cli is not None
        rc, out, seconds = self.cli.run(*args)
        return rc, out, seconds

    def health(self, version: int) -> tuple[Any, Any] | None:
        """(rollout, health) as `bedside rollout status` computes them, or None on a torn read."""
        try:
            rollout = Publisher(self.repo, None).plan().models[MODEL]
            if rollout.version != version:
                return None
            return rollout, stage_health(MODEL, rollout, ReportStore(self.reports).all())
        except (OSError, ValueError, KeyError):
            return None


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BEDSIDE_")}


def build_versions(sources: Path) -> dict[int, Path]:
    """MODELS/scale/{1,2,3}: y = 2x; y = log(x) with golden cases of positive inputs; y = 3x."""
    folder = sources / MODEL
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(SCALE_CONFIG, encoding="utf-8")
    scale_model(folder / "1" / "model.onnx", factor=2.0, weights=20_000)
    log_model(folder / "2" / "model.onnx")
    scale_model(folder / "3" / "model.onnx", factor=3.0, weights=20_000)
    session = ort.InferenceSession(str(folder / "2" / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(4):
        x = (np.abs(rng.standard_normal((1, 4))) + 0.5).astype(np.float32)  # where log() is right
        (y,) = session.run(None, {"x": x})
        cases.append(
            {
                "inputs": {"x": {"datatype": "FP32", "shape": [1, 4], "data": x.reshape(-1).tolist()}},
                "outputs": {"y": {"datatype": "FP32", "shape": [1, 4], "data": y.reshape(-1).tolist()}},
            }
        )
    golden = {
        "atol": 1e-4,
        "rtol": 1e-3,
        "note": "positive inputs only: passes, then NaN on real traffic",
        "cases": cases,
    }
    (folder / "2" / "golden.json").write_text(json.dumps(golden))
    return {v: folder / str(v) for v in (1, 2, 3)}


def start_publisher(run: Run) -> tuple[Any, int]:
    port = free_port()
    log = run.tmp / "publisher.log"
    args = ["publish", "serve", "--repo", str(run.repo), "--reports", str(run.reports), "--port", str(port)]
    assert run.cli is not None
    run.cli.log.append({"command": run.cli.shown(args), "rc": None, "seconds": None, "output": "(server)"})
    with open(log, "wb") as fh:
        proc = popen([sys.executable, "-m", "bedside", *args], stdout=fh, stderr=subprocess.STDOUT,
                     stdin=subprocess.DEVNULL, env=run.cli.env)  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"bedside publish serve exited: {log.read_text()[-300:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metadata/timestamp.json", timeout=1) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("bedside publish serve was not answering within 30 s")
        time.sleep(0.1)


def start_boxes(run: Run, publisher_port: int) -> float:
    """Start every box, at most --starting at once; returns the seconds until all were ready."""
    base = clean_env()
    url = f"http://127.0.0.1:{publisher_port}"
    pending, starting = list(run.boxes), []
    t0 = time.monotonic()
    while pending or starting:
        while pending and len(starting) < run.args.starting:
            box = pending.pop(0)
            (box.models).mkdir(parents=True)
            (box.folder / "state").mkdir()
            box.port, box.log = free_port(), box.folder / "serve.log"
            env = {
                **base,
                "BEDSIDE_UPDATES_URL": url,
                "BEDSIDE_UPDATES_ROOT": str(run.repo / "metadata" / "1.root.json"),
                "BEDSIDE_UPDATES_DEVICE_ID": box.device,
                "BEDSIDE_UPDATES_REPORT_URL": f"{url}/reports",
                "BEDSIDE_UPDATES_POLL_S": f"{run.args.poll_s:g}",
                "BEDSIDE_UPDATES_WATCH_S": f"{run.args.watch_s:g}",
                "BEDSIDE_UPDATES_WATCH_MIN_REQUESTS": str(WATCH_MIN_REQUESTS),
                "BEDSIDE_STREAMS_STATE_DIR": str(box.folder / "state"),
                "BEDSIDE_SECURITY_AUDIT": "false",
                "XDG_STATE_HOME": str(box.folder / "state"),
            }
            cmd = [sys.executable, "-m", "bedside", "serve", "-r", str(box.models), "--port", str(box.port),
                   "--grpc-port", "-1", "--mllp-port", "-1", "--no-streams", "--log-level", "info"]  # fmt: skip
            if box is run.boxes[0]:  # the command line of every box, in the results
                assert run.cli is not None
                shown = {k: v for k, v in env.items() if k.startswith(("BEDSIDE_", "XDG_"))}
                for path, name in ((run.repo, "R"), (box.folder, "BOX")):
                    shown = {k: v.replace(str(path), name) for k, v in shown.items()}
                run.cli.log.append(
                    {
                        "command": " ".join(f"{k}={v}" for k, v in shown.items()).replace(box.device, "DEVICE")
                        + " "
                        + run.cli.shown(cmd[3:]).replace(str(box.folder), "BOX").replace(str(box.port), "PORT"),
                        "rc": None,
                        "seconds": None,
                        "output": "(server)",
                    }
                )
            with open(box.log, "wb") as fh:
                box.proc = popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            box.ready_s = time.monotonic()  # the start, until it is ready
            starting.append(box)
        for box in list(starting):
            if box.proc.poll() is not None:
                assert box.log is not None
                raise RuntimeError(
                    f"box {box.device} exited (code {box.proc.returncode}): {box.log.read_text()[-300:]}"
                )
            if _ready(box.port, None):
                box.ready_s = time.monotonic() - box.ready_s
                starting.remove(box)
        if time.monotonic() - t0 > 60 + 5 * len(run.boxes):
            raise RuntimeError(f"{len(starting) + len(pending)} boxes were not ready in time")
        time.sleep(0.05)
    return time.monotonic() - t0


# --- one stage ----------------------------------------------------------------------------------


def stage_row(run: Run, scenario: str, version: int, stages: list[Stage], index: int, started: float) -> dict[str, Any]:
    """The stage's counts from the sampled timeline."""
    assert run.sampler is not None
    run.sampler.sample()
    eligible = [b for b in run.boxes if admitted(b, stages, index)]
    new = [b for b in eligible if index == 0 or not admitted(b, stages, index - 1)]
    installs = {b.device: t for b in new if (t := run.sampler.at(b.device, version, "on")) is not None}
    refused = [b for b in eligible if run.sampler.at(b.device, version, "refused") is not None]
    rolled = [b for b in eligible if run.sampler.at(b.device, version, "rolled-back") is not None]
    kept = [b for b in eligible if run.sampler.at(b.device, version, "kept") is not None and b not in refused]
    # a rolled-back or golden-refused box has no "on" for the version when the sample missed the watch
    installed = set(installs) | {b.device for b in rolled if b in new}
    times = [t - started for t in installs.values()]
    caught = [run.sampler.downloads[(d, version)] for d in installed if (d, version) in run.sampler.downloads]
    label = stages[index].label()
    return {
        "scenario": scenario,
        "version": version,
        "stage": f"{index + 1}/{len(stages)} ({label})",
        "eligible": len(eligible),
        "new": len(new),
        "installed": len(installed),
        "kept": len(kept),
        "rolled_back": len(rolled),
        "refused": len(refused) - len(rolled),
        "behind": len(eligible) - len(kept) - len(refused),
        "install_p50_s": round(float(np.median(times)), 2) if times else None,
        "install_max_s": round(max(times), 2) if times else None,
        "downloaded": sum(n for n, _ in caught),
        "delta": f"{sum(d for _, d in caught)}/{len(caught)}",
        "downloads_caught": len(caught),
        "devices_new": [b.device for b in new],
    }


def wait_stage(
    run: Run,
    scenario: str,
    version: int,
    stages: list[Stage],
    index: int,
    started: float,
    paused_s: float = 0.0,
    on_advance: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Poll the stage's health in-process; when it is no longer "wait" for `advance --min-kept E`,
    run that CLI command and record its decision (`on_advance(when)` runs as soon as it advanced)."""
    eligible = [b for b in run.boxes if admitted(b, stages, index)]
    healthy_at = failed_at = None
    deadline = started + run.args.stage_timeout + paused_s
    decision, output, rc = "timeout", "", None
    advanced_at = 0.0
    while time.monotonic() < deadline:
        got = run.health(version)
        if got is not None:
            rollout, health = got
            now = time.monotonic()
            if health.failed and failed_at is None:
                failed_at = now
            if {b.device for b in eligible} <= set(health.kept) and not health.watching and healthy_at is None:
                healthy_at = now
            action, _ = decide(rollout, health, len(eligible))
            if action != "wait":
                rc, output, _ = run.bedside("rollout", "advance", MODEL, "--repo", str(run.repo), "--keys",
                                            str(run.keys), "--reports", str(run.reports),
                                            "--min-kept", str(len(eligible)))  # fmt: skip
                decision = "halt" if rc == 1 else output.split(":", 1)[0].strip()
                if decision != "wait":
                    advanced_at = time.monotonic()
                    if decision == "advance" and on_advance is not None:
                        on_advance(advanced_at)
                    break
        time.sleep(HEALTH_S)
    decided = advanced_at or time.monotonic()
    row = stage_row(run, scenario, version, stages, index, started)
    row["decided_at"] = decided
    row["healthy_s"] = round(healthy_at - started, 2) if healthy_at else None
    row["first_failure_s"] = round(failed_at - started, 2) if failed_at else None
    row["decision"] = decision
    row["decision_s"] = round(decided - started, 2)
    row["advance_rc"], row["advance_output"] = rc, output
    if decision == "timeout":
        got = run.health(version)
        detail = json.dumps(got[1].to_dict()) if got else "no health"
        run.problems.append(
            f"{scenario}, stage {index + 1}: no decision within {run.args.stage_timeout:g} s ({detail})"
        )
    return row


def show_row(row: dict[str, Any]) -> None:
    say(
        f"  stage {row['stage']}: {row['eligible']} eligible ({row['new']} new), {row['installed']} installed, "
        f"{row['kept']} kept, {row['rolled_back']} rolled back, {row['refused']} refused; healthy in "
        f"{row['healthy_s']} s, {row['decision']} at {row['decision_s']} s"
    )


def status_json(run: Run) -> dict[str, Any]:
    rc, out, _ = run.bedside("rollout", "status", MODEL, "--repo", str(run.repo), "--reports", str(run.reports))
    try:
        return dict(json.loads(out))
    except ValueError:
        return {"rc": rc, "output": out}


def start_rollout(run: Run, version: int, stages: str) -> float:
    rc, out, _ = run.bedside("rollout", "start", MODEL, str(version), "--repo", str(run.repo), "--keys", str(run.keys),
                             "--stages", stages)  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"bedside rollout start failed: {out}")
    return time.monotonic()


def publish(run: Run, folder: Path) -> None:
    rc, out, _ = run.bedside("publish", "add", str(folder), "--repo", str(run.repo), "--keys", str(run.keys))
    if rc != 0:
        raise RuntimeError(f"bedside publish add failed: {out}")


def serving_version(box: Box) -> tuple[int | None, dict[str, str]]:
    state = read_state(box.models / MODEL)
    return (state.version, dict(state.refused)) if state else (None, {})


# --- the scenarios ------------------------------------------------------------------------------


def install_v1(run: Run, folders: dict[int, Path]) -> None:
    say(f"{NAME}: v1 (y = 2x) rolled out at 100 %: every box installs its first model through its agent...")
    publish(run, folders[1])
    stages = parse_stages("100")
    started = start_rollout(run, 1, "100")
    row = wait_stage(run, "install v1", 1, stages, 0, started)
    run.rows.append(row)
    show_row(row)
    on_v1 = [b.device for b in run.boxes if serving_version(b)[0] == 1]
    run.check("every box serves v1, installed by its agent", len(on_v1) == len(run.boxes),
              f"{len(on_v1)}/{len(run.boxes)}")  # fmt: skip


def canary_fails(run: Run, folders: dict[int, Path]) -> None:
    assert run.traffic is not None and run.sampler is not None
    say(f"{NAME}: scenario 1, canary fails: v2 = log(x), golden cases positive only, stages {STAGES}...")
    run.traffic.phase = "canary fails"
    publish(run, folders[2])
    stages = parse_stages(STAGES)
    started = start_rollout(run, 2, STAGES)
    row = wait_stage(run, "canary fails", 2, stages, 0, started)
    canary = [b for b in run.boxes if admitted(b, stages, 0)]
    outside = [b for b in run.boxes if b not in canary]
    # the halt stops new installs; each canary box still judges v2 on its own watch: wait until none watches
    settle_deadline = time.monotonic() + run.args.watch_s + 15
    while time.monotonic() < settle_deadline:
        if all(serving_version(b)[0] == 1 for b in canary):
            break
        time.sleep(HEALTH_S)
    row["canary_settled_s"] = round(time.monotonic() - started, 2)
    hold = 3 * run.args.poll_s + 1
    say(f"  halted; {hold:g} s more so every box polls the halted plan a few times...")
    time.sleep(hold)
    row = {**row, **{k: v for k, v in stage_row(run, "canary fails", 2, stages, 0, started).items() if k != "stage"}}
    run.rows.append(row)
    show_row(row)
    status = status_json(run)
    row["status_after"] = status
    run.check("`rollout advance` halted the rollout (exit 1)", row["advance_rc"] == 1, row["advance_output"][:160])
    run.check("`rollout status` says halted", str(status.get("state", "")).startswith("halted"),
              str(status.get("state", ""))[:200])  # fmt: skip
    phase = "canary fails"
    for box in canary:
        version, refused = serving_version(box)
        v2_answers = run.traffic.answered(phase, box.device, "2")
        run.check(
            f"canary {box.device} installed v2, took traffic, rolled back to v1",
            version == 1 and "2" in refused and v2_answers > 0 and run.sampler.saw(box.device, 2, "rolled-back"),
            f"serving v{version}, {v2_answers} answers from v2, refused: {refused.get('2', '-')[:80]}",
        )
    never = [
        b.device
        for b in outside
        if serving_version(b) == (1, {})
        and not (b.models / MODEL / "2").exists()
        and run.traffic.answered(phase, b.device, "2") == 0
        and run.sampler.at(b.device, 2, "on") is None
    ]
    halted_seen = sum(run.sampler.saw(b.device, 2, "halted") for b in outside)
    run.check(
        "no box outside the canary installed v2 (state, repository folder, answers, reports)",
        len(never) == len(outside),
        f"{len(never)}/{len(outside)} clean; {halted_seen} reported the plan halted",
    )
    run.notes["canary_fails"] = {
        "canary": [b.device for b in canary],
        "outside": len(outside),
        "traffic_canary": run.traffic.summary(phase, {b.device for b in canary}),
        "traffic_outside": run.traffic.summary(phase, {b.device for b in outside}),
        "refused_reasons": {b.device: serving_version(b)[1].get("2", "") for b in canary},
    }


def rollout_completes(run: Run, folders: dict[int, Path]) -> None:
    assert run.cli is not None and run.traffic is not None and run.sampler is not None
    say(f"{NAME}: scenario 2, rollout completes: v3 = 3x, stages {STAGES}, paused {run.args.hold_s:g} s at stage 2...")
    run.traffic.phase = "rollout completes"
    publish(run, folders[3])
    pause = run.cli.prepared("rollout", "pause", MODEL, "--repo", str(run.repo), "--keys", str(run.keys))
    stages = parse_stages(STAGES)
    t_rollout = started = start_rollout(run, 3, STAGES)
    index = 0

    def pause_now(advanced: float) -> None:
        run.notes["pause"] = pause_hold(run, pause, stages, advanced)

    while True:
        paused_s = run.notes.get("pause", {}).get("held_s", 0.0) if index == 1 else 0.0
        row = wait_stage(run, "rollout completes", 3, stages, index, started, paused_s,
                         on_advance=pause_now if index == 0 else None)  # fmt: skip
        row["status"] = status_json(run)
        if index == 1 and "pause" in run.notes:
            row["paused_s"] = run.notes["pause"]["held_s"]
        run.rows.append(row)
        show_row(row)
        if index == 0 and "pause" in run.notes:
            say(f"  resumed after {run.notes['pause']['held_s']:.1f} s")
        if row["decision"] != "advance":
            break
        index += 1
        started = row["decided_at"]
    run.notes["rollout_completes_s"] = round(time.monotonic() - t_rollout, 2)
    run.check("the rollout ended `done`", run.rows[-1]["decision"] == "done", run.rows[-1]["advance_output"][:120])
    on_v3 = [b for b in run.boxes if serving_version(b)[0] == 3]
    answering = [b for b in run.boxes if answer(b.port) == ("3", [1.5, 3.0, 6.0, 9.0])]
    run.check("every box serves v3 (state file and a live answer of 3x from v3)",
              len(on_v3) == len(answering) == len(run.boxes),
              f"state {len(on_v3)}/{len(run.boxes)}, answers {len(answering)}/{len(run.boxes)}")  # fmt: skip
    everyone = {b.device for b in run.boxes}
    traffic = run.traffic.summary("rollout completes", everyone)
    run.notes["traffic_rollout_completes"] = traffic
    run.check("no failed or wrong answer during the v3 rollout", traffic["status_422"] == 0 and not traffic["other"]
              and traffic["wrong_answers"] == 0, json.dumps(traffic))  # fmt: skip


def pause_hold(run: Run, pause: Any, stages: list[Stage], advanced: float) -> dict[str, Any]:
    """Pause right after the advance to stage 2 (a CLI process that has imported everything already),
    hold, check that nothing installs while paused, resume."""
    assert run.cli is not None and run.sampler is not None
    rc, out, seconds = run.cli.go(pause)
    paused = time.monotonic()
    say(f"  advanced to stage 2 and paused {paused - advanced:.2f} s later ({out}); holding {run.args.hold_s:g} s...")
    time.sleep(run.args.hold_s)
    run.sampler.sample()
    # What `rollout advance` with its default --min-kept 1 would decide now, were the rollout not paused:
    # the stage-1 boxes kept v3 long ago, and decide() does not look at the stage-2 boxes still behind.
    got = run.health(3)
    default = decide(got[0], got[1], 1) if got else ("-", "no health")
    behind = got[1].to_dict()["behind"] if got else None
    new = [b for b in run.boxes if admitted(b, stages, 1) and not admitted(b, stages, 0)]
    grace = run.args.poll_s + 2.0  # a pass that read the plan before the pause finishes its install
    times = {b.device: run.sampler.at(b.device, 3, "on") for b in new}
    before = [d for d, t in times.items() if t is not None and t <= paused + grace]
    during = [d for d, t in times.items() if t is not None and t > paused + grace]
    waiting = [b.device for b in new if b.device not in before and run.sampler.saw(b.device, 3, "paused")]
    rc2, out2, _ = run.bedside("rollout", "resume", MODEL, "--repo", str(run.repo), "--keys", str(run.keys))
    held = time.monotonic() - paused
    run.check("`rollout pause` took effect", rc == 0, out)
    run.check(
        f"no box installed v3 while paused ({run.args.hold_s:g} s hold)",
        not during and len(waiting) == len(new) - len(before),
        f"{len(new)} new in stage 2: {len(before)} installed before the pause reached them, "
        f"{len(during)} during the hold, {len(waiting)} reported 'paused' and waited",
    )
    run.check("`rollout resume` took effect", rc2 == 0, out2)
    return {
        "gap_advance_to_pause_s": round(paused - advanced, 3),
        "pause_cli_s": round(seconds, 3),
        "held_s": round(held, 2),
        "new_in_stage": len(new),
        "installed_before_pause_reached_them": before,
        "installed_while_paused": during,
        "waited_reporting_paused": len(waiting),
        "default_min_kept_decision_end_of_pause": {"action": default[0], "reason": default[1], "behind": behind},
    }


def answer(port: int) -> tuple[str, list[float]] | None:
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": POSITIVE}]}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer", body,
                                     {"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            doc = json.loads(r.read())
    except OSError:
        return None
    return str(doc["model_version"]), [round(v, 4) for v in doc["outputs"][0]["data"]]


def scan_logs(run: Run) -> dict[str, Any]:
    """Tracebacks, errors and warnings in every box's log (counted by message)."""
    found: dict[str, Any] = {"tracebacks": [], "errors": collections.Counter(), "warnings": collections.Counter()}
    for box in run.boxes:
        if box.log is None or not box.log.exists():
            continue
        lines = box.log.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if line.startswith("Traceback"):
                found["tracebacks"].append({"box": box.device, "lines": lines[max(0, i - 1) : i + 30]})
            elif " ERROR " in line or " CRITICAL " in line:
                found["errors"][line.split(" ", 3)[-1][:200]] += 1
            elif " WARNING " in line:
                message = line.split(" ", 3)[-1]
                found["warnings"][": ".join(message.split(": ")[:2])[:200]] += 1  # without the varying reason
    for tb in found["tracebacks"][:3]:
        run.problems.append(f"traceback in {tb['box']}'s log: " + " / ".join(tb["lines"][-3:])[:400])
    for message, n in found["errors"].items():
        run.problems.append(f"{n} x ERROR in box logs: {message}")
    return {"tracebacks": found["tracebacks"][:5], "errors": dict(found["errors"]), "warnings": dict(found["warnings"])}


# --- output -------------------------------------------------------------------------------------


def shown_row(row: dict[str, Any]) -> dict[str, str]:
    out = {HEADS.get(k, k): "-" if row.get(k) is None else str(row.get(k)) for k in COLUMNS}
    out[HEADS["downloaded"]] = f"{row['downloaded']:,}" if row.get("downloads_caught") else "-"
    if row.get("paused_s"):
        out[HEADS["healthy_s"]] += f" (paused {row['paused_s']:g})"
    return out


def markdown(title: str, rows: list[dict[str, str]], run: Run, notes: list[str]) -> str:
    heads = [HEADS.get(c, c) for c in COLUMNS]
    lines = [f"# {title}", "", "| " + " | ".join(heads) + " |"]
    lines.append("|" + "|".join("---" if c in ("scenario", "stage", "decision") else "---:" for c in COLUMNS) + "|")
    lines += ["| " + " | ".join(r[h].replace("|", "/") for h in heads) + " |" for r in rows]
    lines += ["", "## Checks", ""]
    lines += [f"- {'ok' if c['passed'] else 'FAILED'}: {c['check']}" + (f" ({c['detail']})" if c["detail"] else "")
              for c in run.checks]  # fmt: skip
    lines += ["", "## Problems", ""] + ([f"- {p}" for p in run.problems] or ["- none"])
    lines += ["", "## Notes", "", *(f"- {n}" for n in notes), ""]
    assert run.cli is not None
    lines += ["## Command lines", "", "```"]
    seen = set()
    for entry in run.cli.log:
        command = entry["command"]
        if command not in seen:
            seen.add(command)
            lines.append(command)
    lines += ["```", ""]
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, default=20, help="bedside serve processes in the fleet")
    parser.add_argument("--poll-s", type=float, default=1.0, help="BEDSIDE_UPDATES_POLL_S of every box (at least 1)")
    parser.add_argument("--watch-s", type=float, default=5.0, help="BEDSIDE_UPDATES_WATCH_S of every box")
    parser.add_argument("--rate", type=float, default=5.0, help="infer requests a second to each box")
    parser.add_argument("--starting", type=int, default=2, help="boxes starting at once (a staggered start)")
    parser.add_argument("--hold-s", type=float, default=6.0, help="how long the rollout stays paused at stage 2")
    parser.add_argument("--stage-timeout", type=float, default=90.0, help="seconds a stage may take to decide")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (box logs, reports) and say where")
    args = parse_args(parser, boxes=6, watch_s=3, hold_s=4)
    if args.boxes < 3:
        parser.error("--boxes: at least 3 (one per stage)")
    t_all = time.monotonic()
    stages = parse_stages(STAGES)
    ids, ward = fleet_ids(args.boxes, stages)
    say(
        f"{NAME}: {args.boxes} bedside serve boxes on loopback, poll {args.poll_s:g} s, watch {args.watch_s:g} s, "
        f"{args.rate:g} requests/s to each box; scenarios: canary fails (v2), rollout completes (v3)"
    )
    work = Path(tempfile.mkdtemp(prefix="bedside-fleet-"))
    run = Run(args, work)
    run.boxes = [Box(d, device_bucket(d), work / "boxes" / d) for d in ids]
    run.cli = Cli({work / "R": "R", work / "K": "K", work / "D": "D", work / "MODELS": "MODELS"}, clean_env())
    finished = interrupted = False
    try:
        folders = build_versions(run.sources)
        rc, out, _ = run.bedside("publish", "init", "--repo", str(run.repo), "--keys", str(run.keys))
        if rc != 0:
            raise RuntimeError(f"bedside publish init failed: {out}")
        publisher_proc, port = start_publisher(run)
        say(f"{NAME}: publisher on 127.0.0.1:{port}; starting {args.boxes} boxes, {args.starting} at a time...")
        start_s = start_boxes(run, port)
        ready = sorted(b.ready_s for b in run.boxes)
        say(f"  all ready in {start_s:.1f} s (each {ready[0]:.1f}-{ready[-1]:.1f} s)")
        run.notes["start"] = {
            "all_ready_s": round(start_s, 2),
            "box_ready_s_min": round(ready[0], 2),
            "box_ready_s_p50": round(float(np.median(ready)), 2),
            "box_ready_s_max": round(ready[-1], 2),
            "starting_at_once": args.starting,
        }
        run.sampler = Sampler(run.reports)
        run.sampler.start()
        cpu0 = {b.device: cpu_seconds(b.proc.pid) for b in run.boxes}
        t_updates = time.monotonic()
        install_v1(run, folders)
        run.traffic = Traffic(run.boxes, args.rate)
        run.traffic.start()
        canary_fails(run, folders)
        rollout_completes(run, folders)
        updates_s = time.monotonic() - t_updates
        run.traffic.stop()
        run.sampler.stop()
        box_cpu = sum(cpu_seconds(b.proc.pid) - cpu0[b.device] for b in run.boxes)
        rss = [rss_mb(b.proc.pid) for b in run.boxes]
        run.notes["resources"] = {
            "box_cpu_s_during_updates": round(box_cpu, 1),
            "box_cpu_pct_of_one_core_each": round(100 * box_cpu / updates_s / len(run.boxes), 1),
            "box_rss_mb_mean": round(float(np.mean(rss)), 1),
            "box_rss_mb_total": round(float(np.sum(rss)), 1),
            "loadavg_1min_at_end": round(os.getloadavg()[0], 2),
        }
        run.notes["traffic_errors"] = dict(run.traffic.errors)
        # context for the downloads: what each published file weighs, and the delta v3 would have from v1
        v1 = (folders[1] / "model.onnx").read_bytes()
        v3 = (folders[3] / "model.onnx").read_bytes()
        published = {
            p: info.length for p, info in Publisher(run.repo, None).targets().targets.items() if p.startswith("models/")
        }
        run.notes["published_model_files"] = {p: n for p, n in sorted(published.items()) if "model.onnx" in p}
        run.notes["bsdiff_v1_to_v3_bytes"] = len(bsdiff4.diff(v1, v3))
        for box in run.boxes:
            stop(box.proc, 10.0)
        stop(publisher_proc, 5.0)
        run.notes["logs"] = scan_logs(run)
        run.notes["updates_s"] = round(updates_s, 1)
        finished = True
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: nothing to look into, the folder goes too
        interrupted = True
        raise
    finally:
        if run.traffic is not None:
            run.traffic.stop()
        if run.sampler is not None:
            run.sampler.stop()
        if (finished or interrupted) and not args.keep:
            stop_children()  # nothing may write into the folder while it is removed
            shutil.rmtree(work, ignore_errors=True)
        else:  # a failure: the box logs and reports explain it
            print(f"{NAME}: work folder kept: {work}", file=sys.stderr, flush=True)
    total_s = time.monotonic() - t_all

    title = (
        f"Fleet update on loopback: {args.boxes} bedside serve boxes, poll {args.poll_s:g} s, watch "
        f"{args.watch_s:g} s, {args.rate:g} requests/s per box, stages {STAGES}"
    )
    shown = [shown_row(r) for r in run.rows]
    table(title, shown, [HEADS.get(c, c) for c in COLUMNS])
    pause = run.notes.get("pause", {})
    start = run.notes["start"]
    res = run.notes["resources"]
    canary = run.notes.get("canary_fails", {})
    published = run.notes["published_model_files"]
    notes = [
        f"Device ids ward-{ward}-bed-01..{args.boxes:02d} (ward {ward}: the first whose hash buckets fill "
        "every stage).",
        f"Start: {args.boxes} boxes, {args.starting} at a time, all ready on /v2/health/ready in "
        f"{start['all_ready_s']:g} s (one box {start['box_ready_s_min']:g}-{start['box_ready_s_max']:g} s, p50 "
        f"{start['box_ready_s_p50']:g} s). Updates and both scenarios: {run.notes['updates_s']:g} s; whole run "
        f"{total_s:.0f} s" + (" (--quick)" if args.quick else "") + ".",
        "Times are seconds from the command that published the stage (`rollout start` or `advance`) returning: "
        "install = a box's first report serving the version (p50 / max over the boxes new in the stage); healthy = "
        "every box of the stage reported it kept (past its watch; for v1, installed: a new model has no watch); "
        "decided = `rollout advance --min-kept E` returned its decision (advance, done, or halt with exit 1).",
        "eligible = boxes the stage admits (earlier stages included); new = those it adds; installed = new boxes "
        "that switched to the version (a rolled-back one included); behind = eligible, not (yet) on the version.",
        "downloaded B = the target bytes the installs of the stage downloaded (Outcome.downloaded, from the box's "
        "report; TUF metadata not counted); delta/caught = installs that used a delta / installs whose report the "
        "sampler caught before the next pass overwrote it. Published model files: "
        + ", ".join(f"{p.split('/', 2)[2]} {n:,} B" for p, n in published.items())
        + f"; a bsdiff4 delta from v1 to v3 would be {run.notes['bsdiff_v1_to_v3_bytes']:,} B.",
        f"Traffic: {args.rate:g} requests/s to each box, half [0.5, 1, 2, 3], half [-1, 0.5, 2, 3]. Canary fails: "
        f"canary boxes {json.dumps(canary.get('traffic_canary', {}))}; "
        f"outside {json.dumps(canary.get('traffic_outside', {}))}. "
        f"Rollout completes: {json.dumps(run.notes.get('traffic_rollout_completes', {}))}.",
        f"Pause: {pause.get('gap_advance_to_pause_s', '-')} s between `advance` returning and `pause` returning; of "
        f"{pause.get('new_in_stage', '-')} boxes new in stage 2, "
        f"{len(pause.get('installed_before_pause_reached_them', []))} "
        f"installed before the pause reached them, {len(pause.get('installed_while_paused', []))} while paused, "
        f"{pause.get('waited_reporting_paused', '-')} waited reporting 'paused'; held {pause.get('held_s', '-')} s "
        "(stage 2's times include it). With the default --min-kept 1, `rollout advance` at the end of the pause "
        f"(stage-2 boxes still behind: {pause.get('default_min_kept_decision_end_of_pause', {}).get('behind')}) "
        f"would have decided: {pause.get('default_min_kept_decision_end_of_pause', {}).get('action')} "
        "(decide() counts kept boxes of earlier stages and ignores those behind).",
        f"Boxes: {res['box_rss_mb_mean']:g} MB RSS each ({res['box_rss_mb_total']:g} MB in all); "
        f"{res['box_cpu_pct_of_one_core_each']:g} % of a core each during the updates (polls, reports, traffic); "
        f"load average {res['loadavg_1min_at_end']:g} at the end, on {os.cpu_count()} cores.",
        f"Box logs: {len(run.notes['logs']['tracebacks'])} tracebacks, {sum(run.notes['logs']['errors'].values())} "
        f"errors, warnings {json.dumps(run.notes['logs']['warnings'])}.",
    ]
    for note in notes:
        console.print(f"- {note}", style="dim", markup=False, highlight=False)
    if run.problems:
        console.print("[red]problems:[/red]")
        for problem in run.problems:
            console.print(f"  - {problem}", markup=False, highlight=False)
    assert run.cli is not None
    result_path("update_fleet.md").write_text(markdown(title, shown, run, notes))
    write_results(
        "update_fleet",
        {
            "settings": {
                "boxes": args.boxes,
                "poll_s": args.poll_s,
                "watch_s": args.watch_s,
                "watch_min_requests": WATCH_MIN_REQUESTS,
                "rate_per_box": args.rate,
                "starting_at_once": args.starting,
                "hold_s": args.hold_s,
                "stages": STAGES,
                "quick": bool(args.quick),
            },
            "fleet": {b.device: {"bucket": b.bucket, "ready_s": round(b.ready_s, 2)} for b in run.boxes},
            "rows": run.rows,
            "checks": run.checks,
            "problems": run.problems,
            "notes": run.notes,
            "commands": run.cli.log,
            "seconds": round(total_s, 1),
            "machine": machine(),
        },
    )
    failed = [c["check"] for c in run.checks if not c["passed"]]
    if failed:
        raise RuntimeError(f"{len(failed)} check(s) failed (results written): {'; '.join(failed)[:300]}")


if __name__ == "__main__":
    main_guard(main)
