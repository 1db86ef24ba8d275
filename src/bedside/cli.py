"""The `bedside` command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import orjson
import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="bedside: a point-of-care AI inference server (Open Inference Protocol v2).",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()

RepoOption = Annotated[
    Path | None,
    typer.Option(
        "--repository", "-r", help="Model repository folder. Default: the built-in demo repository, built on first use."
    ),
]
UrlOption = Annotated[str, typer.Option("--url", help="Address of a running bedside server.")]


def _repository(repository: Path | None) -> Path:
    if repository is not None:
        if not repository.is_dir():
            console.print(f"[red]repository {repository} is not a folder[/red]")
            raise typer.Exit(2)
        return repository
    from bedside.models.demo import ensure_demo

    with console.status("building the demo repository (first run only)..."):
        return ensure_demo()


@app.command()
def serve(
    repository: RepoOption = None,
    host: Annotated[str, typer.Option(help="Interface to listen on. 127.0.0.1 keeps it on this box.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    max_body_mb: Annotated[int, typer.Option(help="Largest request body accepted, in MiB (larger gets 413).")] = 64,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    mllp_port: Annotated[int, typer.Option(help="HL7v2/MLLP listener port for patient monitors; -1: none.")] = 2575,
    score_interval: Annotated[float, typer.Option(help="Seconds between per-bed vital-sign scorings.")] = 15.0,
    streams: Annotated[bool, typer.Option(help="Run the bedside streams (HL7 vitals, ECG, alerts).")] = True,
    alerts_hl7: Annotated[
        str | None, typer.Option(help="Also send every alert as HL7 ORU^R01 over MLLP to HOST:PORT.")
    ] = None,
) -> None:
    """Serve every model in the repository over OIP v2 REST (KServe / Triton / MLServer clients work),
    with the bedside streams: HL7v2 vitals over MLLP, ECG over WebSocket, alerts over SSE."""
    from bedside.server.run import serve as run_server
    from bedside.streams.service import StreamsConfig

    target = _host_port(alerts_hl7, "--alerts-hl7", "") if alerts_hl7 is not None else None
    root = _repository(repository)
    config = (
        StreamsConfig(
            mllp_host=host,
            mllp_port=None if mllp_port < 0 else mllp_port,
            score_interval_s=score_interval,
            alerts_hl7=target,
        )
        if streams
        else None
    )
    console.print(
        f"bedside serving [bold]{root}[/bold] on http://{host}:{port}/v2"
        + (f", HL7 MLLP on {host}:{mllp_port}" if config and config.mllp_port is not None else "")
        + (f", alerts as HL7 to {alerts_hl7}" if target else "")
    )
    run_server(root, host, port, max_body_mb << 20, log_level, config)


@app.command()
def demo(
    out: Annotated[
        Path | None,
        typer.Option(help="Where to write it. Default: ~/.cache/bedside/demo-repository (or $BEDSIDE_DEMO_DIR)."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if it exists.")] = False,
) -> None:
    """Build the demo repository from real data shipped in scikit-learn (no download)."""
    from bedside.models.demo import ensure_demo

    with console.status("training and converting the demo models..."):
        path = ensure_demo(out, force=force)
    console.print(f"demo repository ready at [bold]{path}[/bold]")
    for card in sorted(path.glob("*/MODEL_CARD.md")):
        console.print(f"  {card.parent.name}: see {card}")


@app.command()
def models(
    url: UrlOption = "http://127.0.0.1:8000",
    repository: Annotated[
        Path | None,
        typer.Option("--repository", "-r", help="Check a repository folder offline instead of asking a server."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON, for scripts.")] = False,
) -> None:
    """List models with their versions and state (READY / UNAVAILABLE and why)."""
    if repository is not None:
        from bedside.engine import Engine

        engine = Engine(repository)
        engine.start()
        rows = engine.index()
        engine.close()
    else:
        from bedside.client import Client

        rows = _call(lambda: Client(url).request("POST", "/v2/repository/index", {}))
    if as_json:
        typer.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return
    table = Table("model", "version", "state", "provider", "reason")
    for row in rows:
        style = "green" if row.get("state") == "READY" else "red"
        table.add_row(
            row["name"],
            row.get("version", "-"),
            f"[{style}]{row.get('state', '')}[/{style}]",
            row.get("provider", "").replace("ExecutionProvider", ""),
            row.get("reason", ""),
        )
    console.print(table)


@app.command()
def infer(
    model: Annotated[str, typer.Argument(help="Model name.")],
    data: Annotated[
        str, typer.Option("--data", "-d", help='Rows as JSON, e.g. "[[1.0, 2.0, ...]]", for a model with one input.')
    ] = "",
    input_file: Annotated[Path | None, typer.Option("--npy", help="A .npy file for a model with one input.")] = None,
    version: Annotated[str | None, typer.Option(help="Model version (default: latest ready).")] = None,
    url: UrlOption = "http://127.0.0.1:8000",
) -> None:
    """Send one inference request and print the result."""
    from bedside.client import Client

    client = Client(url)
    meta = _call(lambda: client.request("GET", f"/v2/models/{model}"))
    if len(meta["inputs"]) != 1:
        console.print(f"[red]{model} takes {len(meta['inputs'])} inputs; use a client library for that[/red]")
        raise typer.Exit(2)
    spec = meta["inputs"][0]
    from bedside.protocol.datatypes import numpy_dtype

    if input_file is not None:
        array = np.load(input_file)
    elif data:
        try:
            array = np.asarray(orjson.loads(data))
        except orjson.JSONDecodeError as exc:
            console.print(f"[red]--data is not valid JSON: {exc}[/red]")
            raise typer.Exit(2) from None
    else:
        console.print("[red]give --data or --npy[/red]")
        raise typer.Exit(2)
    array = array.astype(numpy_dtype(spec["datatype"]))
    result = _call(lambda: client.infer(model, {spec["name"]: array}, version))
    console.print_json(orjson.dumps(result).decode())


@app.command()
def export(
    name: Annotated[str, typer.Argument(help="Model name in the repository (a new version is added).")],
    repository: Annotated[Path, typer.Option("--repository", "-r", help="Model repository to write into.")],
    model_file: Annotated[
        Path | None,
        typer.Option(
            help="A pickled scikit-learn / LightGBM / XGBoost model, or a whole PyTorch module saved with torch.save."
        ),
    ] = None,
    reference: Annotated[
        str | None, typer.Option(help="Or one of bedside's reference architectures, e.g. ecg_cnn.")
    ] = None,
    sample: Annotated[Path | None, typer.Option(help="Sample inputs (.npy), used for the numerical check.")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    tolerance: Annotated[float, typer.Option(help="Largest allowed |ONNX - source| on the sample outputs.")] = 1e-5,
) -> None:
    """Export a model to ONNX, check it against the source model, and publish it as a new version."""
    from bedside.errors import BedsideError
    from bedside.pipeline.workflow import export_to_repository

    if (model_file is None) == (reference is None):
        console.print("[red]give exactly one of --model-file or --reference[/red]")
        raise typer.Exit(2)
    if reference is not None:
        from bedside.models.reference import build

        model = build(reference)
        x = np.load(sample) if sample else _reference_sample(reference)
    else:
        if sample is None:
            console.print("[red]--sample is required with --model-file[/red]")
            raise typer.Exit(2)
        model, x = _load_model(model_file), np.load(sample)  # type: ignore[arg-type]
    try:
        path, result = export_to_repository(repository, name, model, x, opset=opset, tolerance=tolerance)
    except BedsideError as exc:
        console.print(f"[red]export failed: {exc.message}[/red]")
        raise typer.Exit(1) from None
    console.print(
        f"exported {result.framework} model to [bold]{path}[/bold]; max |diff| per output: {result.max_abs_diff}"
    )


def _reference_sample(name: str) -> np.ndarray:
    shapes = {
        "ecg_cnn": (2, 12, 1250),
        "vitals_lstm": (2, 60, 8),
        "resnet18": (1, 3, 224, 224),
        "efficientnet_b0": (1, 3, 224, 224),
    }
    if name not in shapes:
        raise typer.BadParameter(f"give --sample for {name}")
    return np.random.default_rng(0).standard_normal(shapes[name]).astype(np.float32)


def _load_model(path: Path):  # type: ignore[no-untyped-def]
    if path.suffix in (".pt", ".pth"):
        import torch

        return torch.load(path, weights_only=False)  # a whole module: only load files you trust
    import pickle

    with path.open("rb") as fh:
        return pickle.load(fh)


@app.command()
def optimize(
    name: Annotated[str, typer.Argument(help="Model name in the repository.")],
    repository: Annotated[Path, typer.Option("--repository", "-r", help="Model repository.")],
    method: Annotated[str, typer.Option(help="int8-static, int8-dynamic, fp16 or graph.")],
    eval_data: Annotated[
        Path, typer.Option("--eval", help="Held-out data (.npz): one array per model input, and `y` labels.")
    ],
    calibration: Annotated[
        Path | None, typer.Option(help="Calibration inputs (.npz, one array per input) for int8-static.")
    ] = None,
    metric: Annotated[
        str, typer.Option(help="auroc, accuracy, f1, or agreement (with the FP32 model, no labels).")
    ] = "auroc",
    tolerance_pp: Annotated[float, typer.Option(help="Largest allowed metric drop, in percentage points.")] = 1.0,
) -> None:
    """Optimize the latest version; publish it as a new version only if it passes the accuracy gate."""
    from bedside.errors import BedsideError
    from bedside.pipeline.gate import AccuracyGateFailed
    from bedside.pipeline.workflow import optimize_version

    held_out = dict(np.load(eval_data))
    labels = held_out.pop("y", None)
    calib = dict(np.load(calibration)) if calibration else None
    try:
        path, report = optimize_version(repository, name, method, held_out, labels, metric, tolerance_pp, calib)
    except AccuracyGateFailed as exc:
        console.print(f"[red]{exc.message}[/red]\nthe report is saved under {repository / name / 'refused'}")
        raise typer.Exit(1) from None
    except BedsideError as exc:
        console.print(f"[red]optimize failed: {exc.message}[/red]")
        raise typer.Exit(1) from None
    console.print(f"[green]{report.summary()}[/green]\npublished as [bold]{path}[/bold] (report.json beside it)")


@app.command()
def bench(
    models: Annotated[
        str, typer.Option(help="Comma-separated reference models.")
    ] = "gbm,ecg_cnn,vitals_lstm,resnet18,efficientnet_b0,ner_bert",
    out: Annotated[Path, typer.Option(help="Where to write reference_models.json and .png.")] = Path("bench/results"),
    seconds: Annotated[float, typer.Option(help="Timing per model and precision.")] = 3.0,
    quick: Annotated[bool, typer.Option(help="Smaller training and calibration sets (for a smoke run).")] = False,
) -> None:
    """Benchmark the reference clinical models (FP32 and INT8, batch 1) against published edge figures."""
    from rich.progress import Progress

    from bedside.pipeline.benchmark import run

    names = [m.strip() for m in models.split(",") if m.strip()]
    with Progress(console=console) as progress:
        task = progress.add_task("reference models", total=len(names) * 2)

        def step(message: str) -> None:
            progress.update(task, advance=1, description=message)

        doc = run(names, out, seconds, quick, step)
    columns = {
        "model": "model",
        "fp32_p95_ms": "FP32 p95",
        "int8_p95_ms": "INT8 p95",
        "int8_speedup_p50": "INT8 x",
        "fp32_size_mb": "FP32 MB",
        "int8_size_mb": "INT8 MB",
        "gate_passed": "gate",
        "target_p95_ms": "target",
        "jetson_orin_nano_p95_ms": "Orin Nano",
        "raspberry_pi5_p95_ms": "Pi 5",
    }
    table = Table(*columns.values(), title="reference models: p95 ms at batch 1 on this CPU (all fields in the JSON)")
    for row in doc["rows"]:
        table.add_row(*(str(row.get(c, "-")) for c in columns))
    console.print(table)
    console.print(f"written {out / 'reference_models.json'} and {out / 'reference_models.png'}")


@app.command()
def replay(
    url: UrlOption = "http://127.0.0.1:8000",
    mllp: Annotated[
        str, typer.Option(help="HL7 MLLP listener host:port; '' to send no vital signs.")
    ] = "127.0.0.1:2575",
    beds: Annotated[int, typer.Option(help="Number of SYNTHETIC beds to generate.")] = 10,
    seconds: Annotated[float, typer.Option(help="Length of each bed's recording (simulated seconds).")] = 60.0,
    speed: Annotated[float, typer.Option(help="1 = real time; 10 = ten times faster.")] = 1.0,
    vitals_every: Annotated[float, typer.Option(help="Simulated seconds between HL7 vital-sign messages.")] = 15.0,
    ecg: Annotated[bool, typer.Option(help="Stream 12-lead ECG per bed over WebSocket.")] = True,
    hl7_file: Annotated[
        Path | None, typer.Option(help="Replay recorded HL7 messages from a file instead of generating them.")
    ] = None,
    ecg_file: Annotated[
        Path | None,
        typer.Option(help="Stream a recorded DICOM 12-lead ECG (looped) for every bed instead of SYNTHETIC ECG."),
    ] = None,
) -> None:
    """Feed SYNTHETIC (or recorded) HL7 vitals and 12-lead ECG into a running bedside; print a summary."""
    import asyncio

    from rich.progress import BarColumn, Progress, TextColumn

    from bedside.streams.ecgfile import ECGFileError
    from bedside.streams.replay import replay as run_replay

    target = _host_port(mllp, "--mllp", "127.0.0.1") if mllp else None
    expected_ecg = beds * max(0, int(seconds) - 4) if ecg else 0
    expected_hl7 = (
        (len(hl7_file.read_bytes().split(b"MSH")) - 1 if hl7_file else beds * max(1, int(seconds / vitals_every)))
        if target
        else 0
    )
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), console=console
    ) as bar:
        hl7_task = bar.add_task("HL7 messages", total=expected_hl7)
        ecg_task = bar.add_task("ECG windows", total=expected_ecg)

        def update(stats) -> None:  # type: ignore[no-untyped-def]
            bar.update(hl7_task, completed=stats.hl7_sent)
            bar.update(ecg_task, completed=len(stats.ecg_results))

        try:
            stats = asyncio.run(
                run_replay(url, target, beds, seconds, speed, vitals_every, ecg, hl7_file, update, ecg_file=ecg_file)
            )
        except ECGFileError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from None
        except OSError as exc:
            console.print(f"[red]cannot reach bedside: {exc}[/red]")
            raise typer.Exit(1) from None
        update(stats)
    summary = stats.summary()
    table = Table("measure", "value", title="replay summary")
    for key, value in summary.items():
        table.add_row(key, str(value))
    console.print(table)
    if summary["errors"] or summary["hl7_rejected"]:
        raise typer.Exit(1)


def _host_port(text: str, option: str, default_host: str) -> tuple[str, int]:
    """HOST:PORT (HOST may be left out where there is a default), or a clear error and exit 2."""
    host, _, port = text.rpartition(":")
    host = host or default_host
    if not host or not port.isdigit():
        console.print(f"[red]{option} wants HOST:PORT, got {text!r}[/red]")
        raise typer.Exit(2)
    return host, int(port)


def _call(fn):  # type: ignore[no-untyped-def]
    from bedside.client import ServerError

    try:
        return fn()
    except ServerError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    except OSError as exc:
        console.print(f"[red]cannot reach the server: {exc}[/red]")
        raise typer.Exit(1) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
