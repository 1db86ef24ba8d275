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
) -> None:
    """Serve every model in the repository over OIP v2 REST (KServe / Triton / MLServer clients work)."""
    from bedside.server.run import serve as run_server

    root = _repository(repository)
    console.print(f"bedside serving [bold]{root}[/bold] on http://{host}:{port}/v2")
    run_server(root, host, port, max_body_mb << 20, log_level)


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
