"""The `bedside` command: one typer app, its commands grouped by concern in the modules beside
this one (serving, pipeline, tools; common holds what they share)."""

from __future__ import annotations

import typer

from bedside.cli import pipeline, serving, tools

app = typer.Typer(
    help="bedside: a point-of-care AI inference server (Open Inference Protocol v2).",
    no_args_is_help=True,
    add_completion=False,
)

app.command()(serving.serve)
app.command("settings")(serving.show_settings)
app.command()(pipeline.demo)
app.command()(serving.models)
app.command()(serving.infer)
app.command()(pipeline.export)
app.command()(pipeline.optimize)
app.command()(pipeline.bench)
app.command()(tools.replay)


def main() -> None:
    app()


__all__ = ["app", "main"]
