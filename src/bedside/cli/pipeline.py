"""Model pipeline commands: `demo` (build the demo repository), `export` (to ONNX, checked and
published), `optimize` (behind the accuracy gate) and `bench` (the reference clinical models)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from bedside.cli.common import console, fail


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
    console.print(f"demo repository ready at [bold]{escape(str(path))}[/bold]")
    for card in sorted(path.glob("*/MODEL_CARD.md")):
        console.print(f"  {escape(card.parent.name)}: see {escape(str(card))}")


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
        fail("give exactly one of --model-file or --reference", 2)
    if reference is not None:
        from bedside.models.reference import build

        model = build(reference)
        x = np.load(sample) if sample else _reference_sample(reference)
    else:
        if sample is None:
            fail("--sample is required with --model-file", 2)
        model, x = _load_model(model_file), np.load(sample)  # type: ignore[arg-type]
    try:
        path, result = export_to_repository(
            repository, name, model, x, contract=_reference_contract(reference), opset=opset, tolerance=tolerance
        )
    except BedsideError as exc:
        fail(f"export failed: {exc.message}", 1)
    console.print(
        f"exported {result.framework} model to [bold]{escape(str(path))}[/bold]; "
        f"max |diff| per output: {result.max_abs_diff}"
    )


def _reference_contract(reference: str | None) -> dict[str, Any] | None:
    """The reference rhythm network's classes, in output order, so the ECG stream can name them."""
    if reference != "ecg_cnn":
        return None
    from bedside.synthetic.ecg import RHYTHMS

    return {"labels": list(RHYTHMS)}


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


def _load_model(path: Path) -> Any:
    if path.suffix in (".pt", ".pth"):
        import torch

        return torch.load(path, weights_only=False)  # a whole module: only load files you trust
    import pickle

    with path.open("rb") as fh:
        return pickle.load(fh)


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
        console.print(
            f"[red]{escape(exc.message)}[/red]\nthe report is saved under {escape(str(repository / name / 'refused'))}"
        )
        raise typer.Exit(1) from None
    except BedsideError as exc:
        fail(f"optimize failed: {exc.message}", 1)
    console.print(
        f"[green]{escape(report.summary())}[/green]\n"
        f"published as [bold]{escape(str(path))}[/bold] (report.json beside it)"
    )


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

    from bedside.models.benchmark import run

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
    written = " and ".join(str(out / f"reference_models.{ext}") for ext in ("json", "png"))
    console.print(f"written {escape(written)}")
