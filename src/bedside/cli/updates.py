"""Over-the-air model updates from the command line. The publisher's side: `publish` (a signed TUF
repository of model versions, its keys kept outside it) and `rollout` (which boxes get a version,
stage by stage, from their reports). The box's side: `update`, one pass of the agent that
`bedside serve` runs when updates.url is set."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from bedside.cli.common import console, fail
from bedside.settings import SettingsError, audit_path, from_environment, state_dir
from bedside.updates.publisher import Publisher
from bedside.updates.rollout import ModelRollout, RolloutPlan

RepoDir = Annotated[Path, typer.Option("--repo", help="The update repository folder (served as static files).")]
KeysDir = Annotated[
    Path, typer.Option("--keys", help="The signing keys folder: keep it off the server, owner-only; never in --repo.")
]
ReportsDir = Annotated[Path, typer.Option("--reports", help="Folder of the boxes' reports (publish serve writes it).")]

publish_app = typer.Typer(
    help="The signed update repository (TUF): create it, add versions, re-sign, rotate keys, serve.",
    no_args_is_help=True,
)
rollout_app = typer.Typer(
    help="Roll a published version out in stages, from the boxes' health reports.", no_args_is_help=True
)


def _publisher(repo: Path, keys: Path, must_exist: bool = True) -> Publisher:
    if must_exist and not (repo / "metadata" / "root.json").is_file():
        fail(f"{repo} is not an update repository (run `bedside publish init --repo {repo} --keys ...` first)", 2)
    return Publisher(repo, keys)


@publish_app.command("init")
def publish_init(
    repo: RepoDir,
    keys: KeysDir,
    root_keys: Annotated[int, typer.Option(help="Root keys to make (keep each offline, apart).")] = 1,
    root_threshold: Annotated[int, typer.Option(help="Root signatures a new root needs.")] = 1,
) -> None:
    """Create an update repository and its keys (root, targets, snapshot, timestamp)."""
    publisher = _publisher(repo, keys, must_exist=False)
    publisher.init(root_keys, root_threshold)
    console.print(f"update repository created; give each box {escape(str(repo / 'metadata' / '1.root.json'))} "
                  "as updates.root (its trust anchor)")  # fmt: skip


@publish_app.command("add")
def publish_add(
    version_folder: Annotated[
        Path, typer.Argument(help="A version folder of a model repository, e.g. models/sepsis/3.")
    ],
    repo: RepoDir,
    keys: KeysDir,
    name: Annotated[str, typer.Option(help="Model name (default: the folder above the version folder).")] = "",
    golden: Annotated[
        Path | None, typer.Option(help="golden.json with the team's own cases (default: the folder's, else made).")
    ] = None,
    latency_ms: Annotated[float | None, typer.Option(help="p99 latency bound the box checks (ms).")] = None,
) -> None:
    """Publish a model version (model, config, model card, golden checks) as signed targets, with a
    delta from the version before it."""
    from bedside.updates.packaging import version_files

    files = version_files(version_folder, golden, latency_ms)
    model = name or version_folder.resolve().parent.name
    version = _publisher(repo, keys).add_version(model, files)
    sizes = ", ".join(f"{k} {len(v):,} B" for k, v in sorted(files.items()))
    console.print(f"published {escape(model)} v{version}: {escape(sizes)}")


@publish_app.command("refresh")
def publish_refresh(repo: RepoDir, keys: KeysDir) -> None:
    """Sign snapshot and timestamp again with fresh expiry: run it at least daily (cron), or boxes
    refuse the stale metadata as a freeze attack."""
    _publisher(repo, keys).refresh()
    console.print("snapshot and timestamp signed again")


@publish_app.command("rotate-key")
def publish_rotate(
    role: Annotated[str, typer.Argument(help="root, targets, snapshot or timestamp")], repo: RepoDir, keys: KeysDir
) -> None:
    """Replace a role's key; boxes follow through the new root, signed by the old and new root keys."""
    keyid = _publisher(repo, keys).rotate(role)
    console.print(f"{role} key rotated; new key id {keyid[:16]}")


@publish_app.command("serve")
def publish_serve(
    repo: RepoDir,
    reports: ReportsDir,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8700,
) -> None:
    """Serve the update repository over HTTP (with Range requests, for resumed downloads) and take
    the boxes' reports at POST /reports/<device>. Any static server can serve the repository alone."""
    from bedside.updates.reports import serve_repository

    if not (repo / "metadata" / "timestamp.json").is_file():
        fail(f"{repo} is not an update repository", 2)
    httpd = serve_repository(repo, reports, host, port)
    console.print(f"serving updates on http://{host}:{httpd.server_address[1]}/ (reports: POST /reports/<device>)")
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()


@rollout_app.command("start")
def rollout_start(
    model: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(help="Published version to roll out.")],
    repo: RepoDir,
    keys: KeysDir,
    stages: Annotated[
        str, typer.Option(help="Stages: percents of the fleet and group:NAME, e.g. group:canary,5,50,100.")
    ] = "5,50,100",
    urgent: Annotated[bool, typer.Option(help="Install outside the boxes' maintenance windows.")] = False,
) -> None:
    """Start (or replace) a model's rollout at its first stage."""
    from bedside.updates.rollout import parse_stages

    publisher = _publisher(repo, keys)
    plan = publisher.plan()
    plan.models[model] = ModelRollout(version, parse_stages(stages), urgent=urgent)
    publisher.set_plan(plan)
    console.print(f"{escape(model)} v{version}: stage 1 of {len(plan.models[model].stages)} "
                  f"({escape(plan.models[model].stages[0].label())})")  # fmt: skip


@rollout_app.command("status")
def rollout_status(model: str, repo: RepoDir, reports: ReportsDir) -> None:
    """Where a rollout stands: stage, boxes that kept, watch, failed, are behind."""
    import json

    from bedside.updates.progress import stage_health
    from bedside.updates.reports import ReportStore

    rollout = _rollout(repo, None, model)
    health = stage_health(model, rollout, ReportStore(reports).all())
    state = "halted: " + rollout.halted if rollout.halted else "paused" if rollout.paused else "active"
    doc = {"version": rollout.version, "stage": f"{rollout.stage + 1}/{len(rollout.stages)}", "state": state}
    console.print_json(json.dumps({**doc, "stage_label": rollout.stages[rollout.stage].label(), **health.to_dict()}))


@rollout_app.command("advance")
def rollout_advance(
    model: str,
    repo: RepoDir,
    keys: KeysDir,
    reports: ReportsDir,
    min_kept: Annotated[int, typer.Option(help="Boxes of the stage that must have kept the version.")] = 1,
) -> None:
    """Go to the next stage if the current one is healthy; halt the rollout if any box refused or
    rolled the version back (exit 1). Waiting: exit 0 with what it waits for."""
    from bedside.updates.progress import decide, stage_health
    from bedside.updates.reports import ReportStore

    publisher = _publisher(repo, keys)
    plan = publisher.plan()
    rollout = _rollout(repo, keys, model, plan)
    if not rollout.active:
        fail(f"{model}'s rollout is {'halted: ' + rollout.halted if rollout.halted else 'paused'}", 2)
    action, reason = decide(rollout, stage_health(model, rollout, ReportStore(reports).all()), min_kept)
    if action == "halt":
        rollout.halted = reason
        publisher.set_plan(plan)
        fail(f"rollout halted: {reason}", 1)
    if action == "advance":
        rollout.stage += 1
        publisher.set_plan(plan)
        reason += f"; now stage {rollout.stage + 1} ({rollout.stages[rollout.stage].label()})"
    console.print(f"{action}: {escape(reason)}")


@rollout_app.command("pause")
def rollout_pause(model: str, repo: RepoDir, keys: KeysDir) -> None:
    """Hold a rollout where it is: boxes not yet updated wait."""
    _set_paused(model, repo, keys, True)


@rollout_app.command("resume")
def rollout_resume(model: str, repo: RepoDir, keys: KeysDir) -> None:
    """Let a paused rollout go on (a halted one stays halted: start a new version)."""
    _set_paused(model, repo, keys, False)


def _set_paused(model: str, repo: Path, keys: Path, paused: bool) -> None:
    publisher = _publisher(repo, keys)
    plan = publisher.plan()
    _rollout(repo, keys, model, plan).paused = paused
    publisher.set_plan(plan)
    console.print(f"{escape(model)}: {'paused' if paused else 'resumed'}")


def _rollout(repo: Path, keys: Path | None, model: str, plan: RolloutPlan | None = None) -> ModelRollout:
    from bedside.updates.publisher import Publisher

    if not (repo / "metadata" / "targets.json").is_file():
        fail(f"{repo} is not an update repository", 2)
    plan = plan or Publisher(repo, keys).plan()
    if model not in plan.models:
        fail(f"no rollout of {model!r}; start one with `bedside rollout start`", 2)
    return plan.models[model]


def update(
    repository: Annotated[Path, typer.Option("--repository", "-r", help="The box's model repository.")],
    url: Annotated[str, typer.Option(help="Update repository URL (default: updates.url).")] = "",
    root: Annotated[str, typer.Option(help="Trusted root.json (default: updates.root).")] = "",
    device_id: Annotated[str, typer.Option(help="This box's id (default: updates.device_id).")] = "",
) -> None:
    """One pass of the update agent: verify, download, install beside, golden-check and switch (no
    watch: that needs traffic, inside `bedside serve`). Exit 1 if an update was refused."""
    import json
    from dataclasses import asdict

    from bedside.security.audit import AuditLog
    from bedside.security.keys import KeyProviderError, load_keyring
    from bedside.updates.agent import UpdateAgent

    try:
        settings, _ = from_environment(os.environ)
        values = {
            k: v for k, v in {"updates.url": url, "updates.root": root, "updates.device_id": device_id}.items() if v
        }
        settings = settings.replace(values)
    except SettingsError as exc:
        fail(str(exc), 2)
    if not settings.updates.url:
        fail("no update repository: give --url or set BEDSIDE_UPDATES_URL", 2)
    if not repository.is_dir():
        fail(f"repository {repository} is not a folder", 2)
    try:
        keys = load_keyring(settings.security.key, os.environ)
    except KeyProviderError as exc:
        fail(str(exc), 2)
    state = state_dir(settings.streams.state_dir, os.environ) / "updates"
    security = settings.security
    audit = None
    if security.audit:  # every check, download, install and refusal, as inside the server
        audit = AuditLog(audit_path(settings, os.environ), buffer_max=security.audit_buffer,
                         flush_ms=security.audit_flush_ms, retention_days=security.audit_retention_days)  # fmt: skip
    try:
        outcomes = UpdateAgent(settings.updates, state, repository, keys=keys, audit=audit).check()
    finally:
        if audit is not None:
            audit.close()
    for outcome in outcomes:
        console.print_json(json.dumps(asdict(outcome)))
    if any(o.action == "refused" for o in outcomes):
        raise typer.Exit(1)
