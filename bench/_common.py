"""Shared bench plumbing: percentiles, a lean keep-alive HTTP client, a server process, output, and
`main_guard`, which every script's entry point runs under.

What every script shows: a line as each phase starts (flushed, so it shows through a pipe too),
its tables, then the files it wrote: `bench/results/` (created if missing), or with --quick
`bench/results/quick/`, so a smoke run never overwrites a full run's results; `BENCH_RESULTS=DIR`
puts them elsewhere. Ctrl-C (or SIGTERM) stops every server and child process the script started,
prints `interrupted` and exits 130 (143 for SIGTERM). Any other failure is one line on stderr and
exit code 1; `BENCH_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

_SCRIPT = Path(sys.argv[0]).resolve().parent == Path(__file__).resolve().parent  # run as a bench script


def _interrupted_early(signum: int, frame: object) -> None:
    """Ctrl-C while the script is still importing (seconds, with torch or scikit-learn): nothing has
    been started or written yet, so end at once, without a traceback."""
    sys.stderr.write("interrupted\n")
    os._exit(128 + signum)


if _SCRIPT and signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not in a child that ignores it
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, _interrupted_early)

# The rest after the handlers, so that a Ctrl-C during these imports ends quietly as well.
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent  # the checkout: paths are shown relative to it
RESULTS = Path(os.environ["BENCH_RESULTS"]).resolve() if os.environ.get("BENCH_RESULTS") else ROOT / "bench" / "results"
NAME = Path(sys.argv[0]).stem  # the running script, at the start of its lines
console = Console() if sys.stdout.isatty() or os.environ.get("COLUMNS") else Console(width=160)  # piped: whole tables

_quick = False
_written: list[Path] = []
_children: list[Any] = []  # subprocess.Popen and multiprocessing processes, stopped when the script ends
_signalled = signal.SIGINT
_open_line = False  # the last say() left its line open for a result


# --- output -------------------------------------------------------------------------------------


def say(text: str, end: str = "\n") -> None:
    """A progress line, flushed at once (stdout may be a pipe). With end="" the line stays open for
    the point's result: `  c=8: 3 s... 512 rps`."""
    global _open_line
    print(text, end=end, flush=True)
    _open_line = not end.endswith("\n")


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def shown(path: Path) -> str:
    """`path` relative to the checkout when it is inside it (bench/results/x.json), else as is."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def results_dir() -> Path:
    folder = RESULTS / "quick" if _quick else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def result_path(filename: str) -> Path:
    """Where to write one output file (its folder created); listed at the end of the run."""
    path = results_dir() / filename
    _written.append(path)
    return path


def write_results(name: str, doc: dict[str, Any]) -> Path:
    path = result_path(f"{name}.json")
    path.write_text(json.dumps(doc, indent=2))
    return path


def table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    t = Table(*columns, title=title)
    for row in rows:
        t.add_row(*(str(row.get(c, "")) for c in columns))
    console.print(t)


def parse_args(parser: Any, **quick: Any) -> Any:
    """Parse the command line, with --quick added: `quick` become the defaults (a smoke run, well
    under a minute on a 2-core box; options given explicitly still win) and the results go to
    bench/results/quick/. `parser` is an argparse.ArgumentParser."""
    global _quick
    preset = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in quick.items())
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run, well under a minute ({preset}); results in bench/results/quick/",
    )
    args = parser.parse_args()
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args()
        _quick = True
    return args


# --- measurements -------------------------------------------------------------------------------


def summarize(latencies_s: list[float], wall_s: float) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1e3
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {
        "n": len(ms),
        "p50_ms": round(float(p50), 4),
        "p95_ms": round(float(p95), 4),
        "p99_ms": round(float(p99), 4),
        "max_ms": round(float(ms.max()), 4),
        "throughput_rps": round(len(ms) / wall_s, 1),
    }


def http_request(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def _response_complete(buf: bytes) -> int:
    """Length of the first complete response in buf, or 0 if it is not all there yet."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return 0
    head = buf[:end].lower()
    start = head.find(b"content-length:")
    length = int(head[start + 15 : head.find(b"\r\n", start) if head.find(b"\r\n", start) > 0 else None])
    total = end + 4 + length
    return total if len(buf) >= total else 0


def _status(buf: bytes) -> int:
    return int(buf[9:12])


class BlockingClient:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def call(self, request: bytes) -> bytes:
        self.sock.sendall(request)
        buf = b""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("the server closed the connection")
            buf += chunk
            n = _response_complete(buf)
            if n:
                if _status(buf) != 200:
                    body = buf[:n].partition(b"\r\n\r\n")[2][:300].decode(errors="replace")
                    raise RuntimeError(f"the server answered {_status(buf)}: {body}")
                return buf[:n]


class Outcome:
    __slots__ = ("latency", "retry_after", "status", "well_formed_error")

    def __init__(self, latency: float, status: int, retry_after: bool, well_formed_error: bool) -> None:
        self.latency = latency
        self.status = status
        self.retry_after = retry_after
        self.well_formed_error = well_formed_error


def _outcome(latency: float, response: bytes) -> Outcome:
    status = _status(response)
    if status == 200:
        return Outcome(latency, status, False, True)
    head, _, body = response.partition(b"\r\n\r\n")
    try:
        well_formed = bool(json.loads(body).get("error"))
    except ValueError:
        well_formed = False
    return Outcome(latency, status, b"\r\nretry-after:" in head.lower(), well_formed)


async def _connection(port: int, request: bytes, stop: float, out: list[Outcome], pace: float = 0.0) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    next_send = time.perf_counter()
    while time.perf_counter() < stop:
        if pace:
            delay = next_send - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing an open-loop probe, not waiting for a result
            next_send += pace
        out.append(await exchange(reader, writer, request))
    writer.close()


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> Outcome:
    """Send one request on a keep-alive connection and read its whole response, timed."""
    t0 = time.perf_counter()
    writer.write(request)
    buf = b""
    while not (n := _response_complete(buf)):
        chunk = await reader.read(65536)
        if not chunk:
            raise RuntimeError("the server closed the connection")
        buf += chunk
    return _outcome(time.perf_counter() - t0, buf[:n])


def run_async(coroutine: Any) -> Any:
    """uvloop where there is one; Ctrl-C cancels the coroutine and raises KeyboardInterrupt."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def run_loads(port: int, loads: list[tuple[bytes, int, float]], seconds: float) -> tuple[list[list[Outcome]], float]:
    """Run several loads at once; each is (request, connections, pace in s: 0 = closed loop)."""

    async def main() -> tuple[list[list[Outcome]], float]:
        results: list[list[Outcome]] = [[] for _ in loads]
        start = time.perf_counter()
        stop = start + seconds
        await asyncio.gather(
            *(
                _connection(port, req, stop, results[i], pace)
                for i, (req, conns, pace) in enumerate(loads)
                for _ in range(conns)
            )
        )
        return results, time.perf_counter() - start

    return run_async(main())


def sequential(port: int, request: bytes, seconds: float, warmup: int = 200) -> dict[str, float]:
    """One keep-alive connection, one request at a time for `seconds` (after `warmup` requests)."""
    client = BlockingClient(port)
    try:
        for _ in range(warmup):
            client.call(request)
        lat = []
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            client.call(request)
            lat.append(time.perf_counter() - t0)
        return summarize(lat, time.perf_counter() - start)
    finally:
        client.sock.close()


def grpc_sequential(port: int, request: bytes, seconds: float, warmup: int = 200) -> dict[str, float]:
    """One gRPC channel, one pre-serialized ModelInferRequest at a time (bytes in, bytes out: no
    (de)serialization in the loop) for `seconds`, after `warmup` calls."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for _ in range(warmup):
            call(request)
        lat = []
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            call(request)
            lat.append(time.perf_counter() - t0)
        return summarize(lat, time.perf_counter() - start)


def closed_loop(port: int, request: bytes, concurrency: int, seconds: float) -> tuple[list[float], float]:
    """`concurrency` connections, each sending its next request when the last one returns; all must succeed."""
    (outcomes,), wall = run_loads(port, [(request, concurrency, 0.0)], seconds)
    failed = [o.status for o in outcomes if o.status != 200]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, statuses {sorted(set(failed))}")
    return [o.latency for o in outcomes], wall


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:  # not Linux, or the process is gone
        return float("nan")
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- child processes ----------------------------------------------------------------------------

try:  # Linux: a child gets SIGTERM when this process dies without stopping it (kill -9)
    import ctypes

    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
except (OSError, AttributeError):
    _prctl = None


def _child_setup() -> None:
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def popen(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """A child process that is stopped however the script ends. It runs in a session of its own, so
    a Ctrl-C at the terminal reaches only the script, which then stops it (SIGTERM, then SIGKILL)."""
    proc = subprocess.Popen(args, start_new_session=True, preexec_fn=_child_setup, **kwargs)
    _children.append(proc)
    return proc


def start_process(process: Any) -> None:
    """Start a multiprocessing.Process that ignores Ctrl-C (the script stops it when it ends)."""
    process.daemon = True
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the child
    try:
        process.start()
    finally:
        signal.signal(signal.SIGINT, previous)
    _children.append(process)


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, and SIGKILL if it has not exited within `timeout` seconds; then whatever it left in
    its process group (the server's HL7 ingest child, when the server was stopped while starting)."""
    running, killed = proc.poll() is None, False
    if running:
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        killed = True
    # Ended by this call; a server that exited by itself (a crash, kill -9) is named when the script fails.
    proc.bench_stopped = running and (killed or proc.returncode in (0, -signal.SIGTERM))  # type: ignore[attr-defined]
    _end_group(proc.pid)


def _end_group(pgid: int, timeout: float = 3.0) -> None:
    """SIGTERM to what is left of a process group, SIGKILL after `timeout` s; returns once it is empty."""
    deadline = time.monotonic() + timeout
    sig: int = signal.SIGTERM
    while True:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):  # empty (or no longer ours)
            return
        sig = signal.SIGKILL if sig == signal.SIGKILL or time.monotonic() > deadline else 0  # 0: just look
        time.sleep(0.02)


def stop_children(timeout: float = 5.0) -> None:
    """Stop every child process still running, SIGKILL for those that take over `timeout` seconds."""
    live = [c for c in _children if (c.poll() is None if isinstance(c, subprocess.Popen) else c.is_alive())]
    for child in live:
        child.terminate()
    deadline = time.monotonic() + timeout
    for child in live:
        left = max(0.0, deadline - time.monotonic())
        if isinstance(child, subprocess.Popen):
            stop(child, left)
        else:
            child.join(left)
            if child.is_alive():
                child.kill()
                child.join()
    _children.clear()


def _last_line(log: Any) -> str:
    log.seek(0)
    lines = [line.strip() for line in log.read().decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _ready(port: int, tls: ssl.SSLContext | None) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
        sock = tls.wrap_socket(raw, server_hostname="127.0.0.1") if tls else raw
        sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        return sock.recv(64).startswith(b"HTTP/1.1 200")
    return False


def start_server(
    repo: Path, *extra: str, port: int | None = None, timeout: float = 60.0, tls: ssl.SSLContext | None = None
) -> tuple[Any, int]:
    """`bedside serve` on 127.0.0.1 (a free port unless `port`), HL7 and gRPC off unless `extra` names
    their ports; returns once it is ready (probed over TLS with `tls`, for a server given --tls-cert).
    A server that exits or is not ready in `timeout` s is a RuntimeError naming its last line of
    output (e.g. the port it could not bind)."""
    port = port or free_port()
    models = sorted(p.name for p in Path(repo).iterdir() if (p / "config.toml").is_file())
    what = ", ".join(models) if 0 < len(models) <= 3 else f"{len(models) or 'no'} models"
    say(f"{NAME}: starting bedside on 127.0.0.1:{port} ({what})...")
    log = tempfile.TemporaryFile()  # noqa: SIM115 (kept with the process: its last line explains a failure)
    started = time.monotonic()
    proc = popen(
        [
            sys.executable,
            "-m",
            "bedside",
            "serve",
            "-r",
            str(repo),
            "--port",
            str(port),
            "--log-level",
            "warning",
            *(extra if "--mllp-port" in extra else (*extra, "--mllp-port", "-1")),
            *(() if "--grpc-port" in extra else ("--grpc-port", "-1")),  # side by side: no shared default port
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
    )
    proc.bench_log = log  # type: ignore[attr-defined]
    try:
        while True:
            if proc.poll() is not None:
                code = proc.returncode
                raise RuntimeError(f"bedside serve exited (code {code}) before it was ready: {_last_line(log)}")
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"bedside serve was not ready within {timeout:g} s: {_last_line(log)}")
            if _ready(port, tls) and proc.poll() is None:
                break
            time.sleep(0.05)
    except BaseException:
        stop(proc, 5.0)
        raise
    say(f"  ready in {time.monotonic() - started:.1f} s")
    return proc, port


@contextlib.contextmanager
def server(repo: Path, *extra: str, tls: ssl.SSLContext | None = None) -> Iterator[tuple[Any, int]]:
    """start_server, stopped (SIGTERM, then SIGKILL after 10 s) when the block ends, however it ends."""
    proc, port = start_server(repo, *extra, tls=tls)
    try:
        yield proc, port
    finally:
        stop(proc)


def _dead_server() -> str | None:
    """What a server that exited on its own while the script used it said last."""
    for child in _children:
        log = getattr(child, "bench_log", None)
        if log is not None and child.poll() is not None and not getattr(child, "bench_stopped", False):
            code = child.returncode
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            return f"bedside serve {how}; its last line: {_last_line(log)}"
    return None


def require(*packages: str) -> None:
    """Fail now, with the package's name, rather than after minutes of measuring."""
    import importlib.util

    for package in packages:
        if importlib.util.find_spec(package) is None:
            raise ModuleNotFoundError(f"No module named {package!r}", name=package)


# --- demo models --------------------------------------------------------------------------------


def demo_repo(path: Path, *names: str) -> Path:
    """A model repository with only the named models of `bedside demo` (scikit-learn, seconds each;
    the demo's ECG rhythm model, which trains for minutes, is not among them)."""
    import tomli_w

    from bedside.models import demo

    builders = {
        "breast_mass_malignancy": demo._breast_mass_malignancy,
        "diabetes_progression": demo._diabetes_progression,
        "vitals_deterioration": demo._vitals_deterioration,
    }
    say(f"{NAME}: building the demo model{'s' * (len(names) > 1)} {', '.join(names)} (a few seconds)...")
    try:
        built = [builders[name]() for name in names]
    except ImportError as exc:
        raise RuntimeError(
            f"building the demo models needs the demo extra ({exc.name} is missing): .venv/bin/pip install -e '.[demo]'"
        ) from None
    for model in built:
        folder = path / model.config.name
        (folder / "1").mkdir(parents=True)
        (folder / "1" / "model.onnx").write_bytes(model.onnx_bytes)
        doc = {k: v for k, v in model.config.to_dict().items() if k not in demo._DEFAULTED}
        (folder / "config.toml").write_text(tomli_w.dumps(doc), encoding="utf-8")
    return path


def machine() -> dict[str, Any]:
    import platform

    import onnxruntime

    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
    }


# --- the entry point ----------------------------------------------------------------------------


def _terminated(signum: int, frame: object) -> None:
    global _signalled
    _signalled = signum
    raise KeyboardInterrupt


def _caused_by_interrupt(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 16:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def explain(exc: BaseException) -> str:
    """One line for a failure: what went wrong, and for an unexpected one where."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return (
            f"needs the Python package {exc.name.split('.')[0]}, which is not installed: "
            "make bench (or .venv/bin/pip install -e '.[dev]') installs what the benchmarks use"
        )
    text = " ".join(str(exc).split())
    text = text if len(text) <= 400 else text[:400] + "..."
    dead = _dead_server()
    if isinstance(exc, RuntimeError) and text and not dead:
        return text
    if isinstance(exc, OSError | RuntimeError) and (text or dead):
        return f"{type(exc).__name__}: {text}" + (f" ({dead})" if dead else "")
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"unexpected {type(exc).__name__}{where}: {text} (BENCH_DEBUG=1 shows the traceback)"


def main_guard(main: Callable[[], None]) -> None:
    """Run a script's main and exit: 0 after listing the files it wrote; 130 (143 for SIGTERM) with the
    one line `interrupted` on Ctrl-C; 1 with one line on any other failure. In every case the servers
    and child processes it started are stopped first."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # ignored as a shell's background job: stays so
        signal.signal(signal.SIGINT, signal.default_int_handler)  # asyncio.run then cancels its task on Ctrl-C
    signal.signal(signal.SIGTERM, _terminated)
    try:
        main()
        _cleanup()
    except BaseException as exc:
        interrupted = _caused_by_interrupt(exc)
        message = None if interrupted or isinstance(exc, SystemExit) else explain(exc)  # before the servers stop
        _cleanup()
        if isinstance(exc, SystemExit):  # argparse: --help, a bad option
            raise
        if _open_line:
            say("")
        if interrupted:
            # A coroutine that Ctrl-C stopped before it started is no bug: no warning about it at exit.
            warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
            print("interrupted", file=sys.stderr, flush=True)
            sys.exit(128 + _signalled)
        if os.environ.get("BENCH_DEBUG"):
            raise
        print(f"{NAME}: {message}", file=sys.stderr, flush=True)
        sys.exit(1)
    for path in _written:
        say(f"{NAME}: wrote {shown(path)}")


def _cleanup() -> None:
    """Stop the children; a second Ctrl-C meanwhile is ignored, so it cannot leave one running."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    stop_children()
