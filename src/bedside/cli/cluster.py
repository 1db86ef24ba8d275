"""`bedside cluster`: the repository served by Ray Serve replicas past one box (the cluster extra).

`up` joins the Ray cluster at cluster.address (or starts one in this process), deploys the front
and one deployment per model and graph, and stays in the foreground until Ctrl-C or SIGTERM, as
`bedside serve` does; with --detach it leaves the application on a cluster that outlives it.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from bedside.cli.common import RepoOption, _repository, console, fail

if TYPE_CHECKING:
    from bedside.settings import Settings

app = typer.Typer(help="Serve the repository on a Ray Serve cluster (past one box).", no_args_is_help=True)
AddressOption = Annotated[
    str | None, typer.Option("--address", help="Ray cluster to join (HOST:PORT, ray://HOST:PORT or auto).")
]
NOT_INSTALLED = "the cluster extra is not installed: pip install 'bedside[cluster]' (Ray Serve)"


def _settings(address: str | None, values: dict[str, Any]) -> Settings:
    from bedside.settings import SettingsError, from_environment

    try:
        settings = from_environment(os.environ)[0]
        chosen = {k: v for k, v in values.items() if v is not None}
        if address is not None:
            chosen["cluster.address"] = address
        return settings.replace(chosen)
    except SettingsError as exc:
        fail(str(exc), 2)


def _cluster() -> Any:
    try:
        from bedside.cluster import app as cluster
    except ImportError:
        fail(NOT_INSTALLED, 2)
    return cluster


def _connect(settings: Settings) -> None:
    import ray

    if not settings.cluster.address:
        fail("give the cluster to look at: --address HOST:PORT (or BEDSIDE_CLUSTER_ADDRESS)", 2)
    try:
        ray.init(address=settings.cluster.address, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError) as exc:
        fail(f"cannot reach the Ray cluster at {settings.cluster.address}: {type(exc).__name__}", 1)


@app.command()
def up(
    repository: RepoOption = None,
    address: AddressOption = None,
    port: Annotated[int | None, typer.Option(help="REST port at the Ray proxy (cluster.http_port).")] = None,
    detach: Annotated[
        bool, typer.Option(help="Return once deployed (needs --address: a cluster that outlives this).")
    ] = False,
) -> None:
    """Deploy the repository and serve OIP v2 REST at the Ray proxy."""
    cluster = _cluster()
    settings = _settings(address, {"cluster.http_port": port})
    if detach and not settings.cluster.address:
        fail("--detach needs --address: a Ray instance started here ends with this command", 2)
    try:
        cluster.check_security(settings)  # a refused configuration is the user's to fix: exit 2, before Ray starts
    except cluster.DeployError as exc:
        fail(str(exc), 2)
    folder = _repository(repository)
    console.print(
        f"deploying {escape(folder.name)} on Ray Serve ({settings.cluster.address or 'a Ray instance of this process'})"
    )
    try:
        cluster.start(folder, settings)
    except cluster.DeployError as exc:
        fail(str(exc), 1)
    _show(cluster.describe())
    console.print(f"serving on http://{settings.cluster.host}:{settings.cluster.http_port}/v2")
    if detach:
        return
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):  # a timed wait: Ray's threads may take the signal, the main thread must look
        pass
    console.print("stopping: the application is removed from the cluster")
    cluster.stop()


@app.command()
def status(address: AddressOption = None) -> None:
    """Each deployment of the bedside application: its state and replicas."""
    cluster = _cluster()
    _connect(_settings(address, {}))
    rows = cluster.describe()
    if not rows:
        fail("no bedside application runs on this cluster (bedside cluster up)", 1)
    _show(rows)


@app.command()
def down(address: AddressOption = None) -> None:
    """Remove the bedside application from the cluster (the cluster itself keeps running)."""
    cluster = _cluster()
    _connect(_settings(address, {}))
    cluster.stop()
    console.print("the bedside application was removed")


def _show(rows: list[dict[str, Any]]) -> None:
    table = Table("deployment", "status", "replicas", "message")
    for row in rows:
        replicas = ", ".join(f"{n} {state.lower()}" for state, n in sorted(row["replicas"].items()) if n)
        table.add_row(row["deployment"], row["status"], replicas, escape(str(row["message"] or "")))
    console.print(table)
