"""The `bedside` command: one typer app, its commands grouped by concern in the modules beside
this one (serving, pipeline, tools; common holds what they share)."""

from __future__ import annotations

import pickle
import sys

import typer
from rich.markup import escape

from bedside.cli import audit, certs, cluster, keys, pipeline, plan, serving, tokens, tools, updates
from bedside.cli.common import console

app = typer.Typer(
    help="bedside: a point-of-care AI inference server (Open Inference Protocol v2).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # main() turns exceptions into one line (--debug: the traceback)
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
app.command()(tools.samples)
app.command()(tools.aggregate)
app.command()(keys.encrypt)
app.add_typer(keys.keys_app, name="keys")
app.add_typer(audit.app, name="audit")
app.add_typer(certs.app, name="certs")
app.add_typer(tokens.app, name="tokens")
app.add_typer(cluster.app, name="cluster")
app.add_typer(updates.publish_app, name="publish")
app.add_typer(updates.rollout_app, name="rollout")
app.command()(updates.update)
app.command()(plan.plan)


def main() -> None:
    """Run the command. A mistake the user can fix (a missing or unreadable file, a value the
    command cannot use) ends in one line and exit code 2; anything else in one line naming where it
    happened and exit code 1. `--debug` (anywhere on the line) shows the traceback instead."""
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    try:
        app()
    except KeyboardInterrupt:
        if debug:
            raise
        console.print("interrupted")
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        code, message = explain(exc)
        console.print(f"[red]{escape(message)}[/red]", soft_wrap=True)
        sys.exit(code)


def explain(exc: Exception) -> tuple[int, str]:
    """(exit code, one line) for an exception that reached the command line."""
    from bedside.errors import BedsideError
    from bedside.monitoring.redact import describe_exception

    if isinstance(exc, BedsideError):
        return 2, exc.message
    if isinstance(exc, OSError) and exc.filename is not None:
        return 2, f"cannot use {exc.filename}: {exc.strerror or type(exc).__name__}"
    if isinstance(exc, (ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError)):
        text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        detail = text.splitlines()[0][:200] if text else type(exc).__name__
        return 2, f"cannot use the input given: {detail} (add --debug for the traceback)"
    return 1, f"unexpected error: {describe_exception(exc)} (add --debug for the traceback)"


__all__ = ["app", "main"]
