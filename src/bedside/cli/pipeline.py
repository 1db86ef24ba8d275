"""Model pipeline commands: `demo` (build the demo repository), `export` (to ONNX, checked and
published), `optimize` (behind the accuracy gate) and `bench` (the reference clinical models).

Every mistake in what the user gave (names, files, options that do not go together, data that does
not fit the model) ends in one red line naming what was expected and what was found, exit code 2:
option checks here call fail(); what the pipeline finds wrong with a value (bedside.errors.InvalidInput,
NotFound) is left to bedside.cli.main, which prints its message the same way and, with --debug,
the traceback that shows where it was found."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from bedside.cli.common import console, fail

# Spelled out here so that help texts need no torch or onnx import; tests/test_pipeline_cli.py
# checks them against bedside.models.reference.NAMES, pipeline.provenance, optimize and gate.
REFERENCES = ("ecg_cnn", "vitals_lstm", "resnet18", "efficientnet_b0", "ner_bert")
PROVENANCES = ("trained", "synthetic", "untrained")
METHODS = ("int8-static", "int8-dynamic", "fp16", "graph")
METRICS = ("auroc", "accuracy", "f1", "agreement")


def demo(
    out: Annotated[
        Path | None,
        typer.Option(help="Where to write it. Default: ~/.cache/bedside/demo-repository (or $BEDSIDE_DEMO_DIR)."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if it exists.")] = False,
) -> None:
    """Build the demo repository from real data shipped in scikit-learn (no download)."""
    from bedside.models.demo import ensure_demo

    def say(line: str) -> None:  # a line per model, in a terminal or not (the spinner shows only in one)
        console.print(escape(line))

    with console.status("training and converting the demo models..."):
        path = ensure_demo(out, force=force, progress=say)
    console.print(f"demo repository ready at [bold]{escape(str(path))}[/bold]")
    for card in sorted(path.glob("*/MODEL_CARD.md")):
        console.print(f"  {escape(card.parent.name)}: see {escape(str(card))}", soft_wrap=True)


def note(message: str) -> None:
    console.print(f"[yellow]{escape(message)}[/yellow]", soft_wrap=True)


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
        str | None,
        typer.Option(
            help=f"Or one of bedside's reference architectures: {', '.join(REFERENCES)}. Their weights are random "
            "unless --weights gives trained ones; random weights need --untrained. ecg_cnn is published with a "
            "softmax: it answers per-class probabilities."
        ),
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option(
            help="With --reference: the trained weights, a state_dict saved with "
            "torch.save(model.state_dict(), FILE) (loaded as weights only)."
        ),
    ] = None,
    untrained: Annotated[
        bool,
        typer.Option(
            "--untrained",
            help="With --reference and no --weights: publish the random weights, for benchmarking only "
            "(stamped untrained: its answers mean nothing).",
        ),
    ] = False,
    provenance: Annotated[
        str | None,
        typer.Option(
            help="Where the weights came from: trained (real data), synthetic (synthetic data) or untrained "
            "(random). Stamped into the model and its card. Default: trained (untrained with --untrained)."
        ),
    ] = None,
    provenance_note: Annotated[
        str | None, typer.Option(help="One short line stored beside the provenance, e.g. the training data.")
    ] = None,
    sample: Annotated[
        Path | None,
        typer.Option(
            help="Sample inputs for the numerical check: .npy (or .npz, one array per input). "
            "A float64 sample is exported with FP32 inputs unless --float64."
        ),
    ] = None,
    float64: Annotated[
        bool,
        typer.Option("--float64", help="Keep FP64 inputs for a float64 sample (FP32 clients cannot call the model)."),
    ] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    tolerance: Annotated[
        float,
        typer.Option(help="Numerical check: every output value within tolerance + rtol x |source value|."),
    ] = 1e-5,
    rtol: Annotated[
        float, typer.Option(help="Relative part of the check (float32 rounding of outputs far from 0).")
    ] = 1e-5,
) -> None:
    """Export a model to ONNX, check it against the source model, and publish it as a new version
    stamped with its provenance (and a short MODEL_CARD.md if the model has none)."""
    from bedside.errors import BedsideError, InvalidInput
    from bedside.pipeline.export import framework_of
    from bedside.pipeline.workflow import export_to_repository

    if (model_file is None) == (reference is None):
        fail("give exactly one of --model-file or --reference", 2)
    if provenance is not None and provenance not in PROVENANCES:
        fail(f"--provenance {provenance!r} is not one of {', '.join(PROVENANCES)}", 2)
    try:
        if reference is not None:
            model, x, source, provenance = _reference_model(reference, weights, untrained, provenance, sample)
        else:
            assert model_file is not None
            model, x, source = _model_file(model_file, weights, untrained, sample)
            provenance = provenance or "trained"
        x = _floats(x, float64, framework_of(model))
        path, result = export_to_repository(
            repository,
            name,
            model,
            x,
            contract=_reference_contract(reference),
            provenance=provenance,
            provenance_note=provenance_note,
            source=source,
            **_reference_outputs(reference),
            opset=opset,
            tolerance=tolerance,
            rtol=rtol,
        )
    except InvalidInput:
        raise  # main(): its message, exit 2
    except BedsideError as exc:
        fail(f"export failed: {exc.message}", 1)
    diffs = ", ".join(f"{k} {v:.2g}" for k, v in result.max_abs_diff.items())
    console.print(
        f"exported {result.framework} model to [bold]{escape(str(path))}[/bold] (provenance: {provenance}); "
        f"max |diff| per output: {escape(diffs)}",
        soft_wrap=True,
    )
    if provenance != "trained":
        from bedside.pipeline.provenance import MEANING

        note(MEANING[provenance])


def _reference_model(
    reference: str, weights: Path | None, untrained: bool, provenance: str | None, sample: Path | None
) -> tuple[Any, Any, str, str]:
    """(module, sample, source, provenance) for --reference, or one line and exit 2."""
    from bedside.errors import InvalidInput

    if reference not in REFERENCES:
        raise InvalidInput(f"unknown reference model {reference!r}; choose one of {', '.join(REFERENCES)}")
    if weights is not None and untrained:
        fail("give --weights FILE or --untrained, not both", 2)
    if weights is None and not untrained:
        fail(
            f"--reference {reference} has random weights: give --weights FILE (a state_dict of the trained network, "
            "torch.save(model.state_dict(), FILE)) or --untrained (random weights, for benchmarking only)",
            2,
        )
    if untrained and provenance not in (None, "untrained"):
        fail(f"--untrained publishes random weights; it cannot be --provenance {provenance}", 2)
    from bedside.models import reference as references
    from bedside.pipeline.data import load_sample

    module = references.servable(reference, references.build(reference, weights))
    x = load_sample(sample) if sample else references.sample(reference)
    if not isinstance(x, dict) and reference in references.INPUT_NAMES:
        x = {references.INPUT_NAMES[reference]: x}  # the input's name in the published model
    source = f"reference architecture {reference}" + (" + softmax" if reference == "ecg_cnn" else "")
    source += f", weights from {weights.name}" if weights else ", random weights"
    return module, x, source, "untrained" if untrained else (provenance or "trained")


def _model_file(model_file: Path, weights: Path | None, untrained: bool, sample: Path | None) -> tuple[Any, Any, str]:
    if weights is not None or untrained:
        fail("--weights and --untrained go with --reference; a --model-file holds its own weights", 2)
    if sample is None:
        fail("--sample is required with --model-file: a few rows of real inputs (.npy) for the numerical check", 2)
    if not model_file.is_file():
        fail(f"cannot use {model_file}: No such file or directory", 2)
    from bedside.pipeline.data import check_tabular_sample, load_sample
    from bedside.pipeline.export import framework_of

    model = _load_model(model_file)
    framework = framework_of(model)  # a pickle of something bedside cannot export is refused first
    x = load_sample(sample)
    if framework != "pytorch":
        check_tabular_sample(model, x)
    return model, x, model_file.name


def _floats(x: Any, keep_float64: bool, framework: str) -> Any:
    """A float64 sample becomes float32 (FP32 inputs, what clients send) unless --float64."""
    arrays = x if isinstance(x, dict) else {"": x}
    wide = [k for k, v in arrays.items() if v.dtype == np.float64]
    if keep_float64:
        if framework in ("LightGBM", "XGBoost"):
            fail(f"--float64: {framework} models convert with FP32 inputs only; leave it out", 2)
        if not wide:
            note("--float64 has no effect: the sample is not float64")
        return x
    if not wide:
        return x
    note("note: the sample is float64; the model is exported with FP32 inputs (--float64 keeps FP64 inputs)")
    cast = {k: v.astype(np.float32) if k in wide else v for k, v in arrays.items()}
    return cast if isinstance(x, dict) else cast[""]


def _reference_outputs(reference: str | None) -> dict[str, Any]:
    from bedside.models.reference import OUTPUT_NAMES

    return {"output_names": OUTPUT_NAMES[reference]} if reference in OUTPUT_NAMES else {}


def _reference_contract(reference: str | None) -> dict[str, Any] | None:
    """The reference rhythm network's classes, in output order, so the ECG stream can name them."""
    if reference != "ecg_cnn":
        return None
    from bedside.synthetic.ecg import RHYTHMS

    return {"labels": list(RHYTHMS)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:120] if text else type(exc).__name__


def _load_model(path: Path) -> Any:
    if path.suffix in (".pt", ".pth"):
        import torch

        try:
            return torch.load(path, weights_only=False)  # a whole module: only load files you trust
        except Exception as exc:  # a file that is not a saved module fails in many ways
            detail = _first_line(exc)
            fail(f"cannot use the input given: --model-file {path.name} is not a saved PyTorch module ({detail})", 2)
    try:
        with path.open("rb") as fh:
            return pickle.load(fh)
    except Exception as exc:  # likewise for a file that is not a pickle (or one of a class not installed)
        fail(f"cannot use the input given: --model-file {path.name} is not a pickled model ({_first_line(exc)})", 2)


def optimize(
    name: Annotated[str, typer.Argument(help="Model name in the repository.")],
    repository: Annotated[Path, typer.Option("--repository", "-r", help="Model repository.")],
    method: Annotated[str, typer.Option(help=f"{', '.join(METHODS)}.")],
    eval_data: Annotated[
        Path, typer.Option("--eval", help="Held-out data (.npz): one array per model input, and `y` labels.")
    ],
    calibration: Annotated[
        Path | None, typer.Option(help="Calibration inputs (.npz, one array per input) for int8-static.")
    ] = None,
    metric: Annotated[
        str,
        typer.Option(
            help="auroc (binary, or macro one-vs-rest over per-class probabilities), accuracy, f1, or agreement "
            "(with the FP32 model, no labels; the only one for an untrained version)."
        ),
    ] = "auroc",
    tolerance_pp: Annotated[float, typer.Option(help="Largest allowed metric drop, in percentage points.")] = 1.0,
    version: Annotated[int | None, typer.Option(help="The version to optimize. Default: the latest.")] = None,
) -> None:
    """Optimize a version (the latest by default); publish it as a new version, with the source's
    provenance, only if it passes the accuracy gate."""
    from bedside.errors import BedsideError, InvalidInput, NotFound
    from bedside.pipeline.data import LABELS, load_npz
    from bedside.pipeline.gate import AccuracyGateFailed
    from bedside.pipeline.workflow import optimize_version
    from bedside.repository.store import ModelStore

    if method not in METHODS:
        fail(f"unknown optimization method {method!r}; choose one of {', '.join(METHODS)}", 2)
    if metric not in METRICS:
        fail(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}", 2)
    if not repository.is_dir():
        fail(f"repository {repository} is not a folder", 2)
    names = ModelStore(repository).names()
    if name not in names:
        fail(f"no model {name!r} in {repository}; the models there: {', '.join(names) or 'none'}", 2)
    ignored = calibration is not None and method != "int8-static"
    if ignored:
        calibration = None
    try:
        held_out = load_npz(eval_data, "--eval")
        labels = held_out.pop(LABELS, None)
        calib = load_npz(calibration, "--calibration") if calibration else None
        if calib is not None:
            calib.pop(LABELS, None)  # the held-out file may double as calibration data
        path, report = optimize_version(
            repository, name, method, held_out, labels, metric, tolerance_pp, calib, version
        )
    except AccuracyGateFailed as exc:
        console.print(f"[red]{escape(exc.message)}[/red]", soft_wrap=True)
        console.print(f"the report is saved under {escape(str(repository / name / 'refused'))}", soft_wrap=True)
        raise typer.Exit(1) from None
    except (InvalidInput, NotFound):
        raise  # what the user gave does not fit: main() prints its message, exit 2
    except BedsideError as exc:
        fail(f"optimize failed: {exc.message}", 1)
    console.print(f"[green]{escape(report.summary())}[/green]", soft_wrap=True)
    console.print(f"published as [bold]{escape(str(path))}[/bold] (report.json beside it)", soft_wrap=True)
    if ignored:
        note(f"--calibration is only used by int8-static; {method} did not need it")
    from bedside.pipeline.provenance import MEANING, read

    stamped, _ = read(path / "model.onnx")
    if stamped not in (None, "trained"):
        note(f"provenance kept from the source version: {MEANING[stamped]}")


def bench(
    models: Annotated[
        str, typer.Option(help="Comma-separated reference models.")
    ] = "gbm,ecg_cnn,vitals_lstm,resnet18,efficientnet_b0,ner_bert",
    out: Annotated[Path, typer.Option(help="Where to write reference_models.json and .png.")] = Path("bench/results"),
    seconds: Annotated[float, typer.Option(help="Timing per model and precision.")] = 3.0,
    quick: Annotated[bool, typer.Option(help="Smaller training and calibration sets (for a smoke run).")] = False,
) -> None:
    """Benchmark the reference clinical models (FP32 and INT8, batch 1) against published edge figures;
    writes OUT/reference_models.json and OUT/reference_models.png (default bench/results/)."""
    from rich.progress import Progress

    from bedside.models.benchmark import EDGE, run

    names = [m.strip() for m in models.split(",") if m.strip()]
    unknown = [m for m in names if m not in EDGE]
    if unknown or not names:
        fail(f"unknown model(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(EDGE)}", 2)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create {out}: {exc.strerror or exc}", 2)
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("reference models", total=len(names) * 2)

            def step(message: str) -> None:
                progress.update(task, advance=1, description=message)

            doc = run(names, out, seconds, quick, step)
    except KeyboardInterrupt:
        console.print("interrupted")
        raise typer.Exit(130) from None
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
    written = " and ".join(str((out / f"reference_models.{ext}").resolve()) for ext in ("json", "png"))
    console.print(f"wrote {escape(written)}", soft_wrap=True)
