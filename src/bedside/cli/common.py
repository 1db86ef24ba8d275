"""What the command modules share: the console, the common options and the error handling that
turns a bad argument or an unreachable server into one line and an exit code, never a traceback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from bedside.settings import split_host_port

T = TypeVar("T")

console = Console()

RepoOption = Annotated[
    Path | None,
    typer.Option(
        "--repository", "-r", help="Model repository folder. Default: the built-in demo repository, built on first use."
    ),
]
UrlOption = Annotated[str, typer.Option("--url", help="Address of a running bedside server.")]


def fail(message: str, code: int) -> NoReturn:
    """Print one red line (markup in `message` is shown as typed, never wrapped) and exit with `code`."""
    console.print(f"[red]{escape(message)}[/red]", soft_wrap=True)
    raise typer.Exit(code)


def _repository(repository: Path | None) -> Path:
    if repository is not None:
        if not repository.is_dir():
            fail(f"repository {repository} is not a folder", 2)
        return repository
    from bedside.models.demo import DEMO_STAMP, default_demo_dir, ensure_demo

    if not (default_demo_dir() / DEMO_STAMP).exists():
        # a line per model, terminal or not (a spinner shows nothing in a log or under make)
        console.print("building the demo repository (first run only, no download):")
    return ensure_demo(progress=lambda line: console.print(f"  {escape(line)}", soft_wrap=True))


def _host_port(text: str, option: str, default_host: str) -> tuple[str, int]:
    """HOST:PORT (HOST may be left out where there is a default), or a clear error and exit 2."""
    target = split_host_port(text, default_host)
    if target is None:
        fail(f"{option} wants HOST:PORT, got {text!r}", 2)
    return target


def _call(fn: Callable[[], T]) -> T:
    from bedside.tools.client import ServerError

    try:
        return fn()
    except ServerError as exc:
        # the server refused what the user sent (400, 404, 413, 422): the user's to fix, exit 2
        fail(str(exc), 2 if 400 <= exc.status < 500 and exc.status not in (408, 429) else 1)
    except OSError as exc:
        fail(f"cannot reach the server: {exc.strerror or exc} (is `bedside serve` running? see --url)", 1)
