"""Client tools that feed a running bedside: `replay` (SYNTHETIC or recorded HL7 vitals and 12-lead ECG)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from bedside.cli.common import UrlOption, _host_port, console, fail

if TYPE_CHECKING:
    from bedside.tools.replay import ReplayStats


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

    from bedside.tools.ecgfile import ECGFileError
    from bedside.tools.replay import read_hl7_file
    from bedside.tools.replay import replay as run_replay

    target = _host_port(mllp, "--mllp", "127.0.0.1") if mllp else None
    if hl7_file is not None and not hl7_file.is_file():
        fail(f"--hl7-file {hl7_file} is not a file", 2)
    if ecg_file is not None and not ecg_file.is_file():
        fail(f"--ecg-file {ecg_file} is not a file", 2)
    if speed <= 0 or vitals_every <= 0 or seconds <= 0 or beds < 0:
        fail("--speed, --vitals-every and --seconds must be above 0, --beds 0 or more", 2)
    expected_ecg = beds * max(0, int(seconds) - 4) if ecg else 0
    expected_hl7 = (
        (len(read_hl7_file(hl7_file)) if hl7_file else beds * max(1, int(seconds / vitals_every))) if target else 0
    )
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), console=console
    ) as bar:
        hl7_task = bar.add_task("HL7 messages", total=expected_hl7)
        ecg_task = bar.add_task("ECG windows", total=expected_ecg)

        def update(stats: ReplayStats) -> None:
            bar.update(hl7_task, completed=stats.hl7_sent)
            bar.update(ecg_task, completed=len(stats.ecg_results))

        try:
            stats = asyncio.run(
                run_replay(url, target, beds, seconds, speed, vitals_every, ecg, hl7_file, update, ecg_file=ecg_file)
            )
        except ECGFileError as exc:
            fail(str(exc), 2)
        except OSError as exc:
            fail(f"cannot reach bedside: {exc}", 1)
        update(stats)
    summary = stats.summary()
    table = Table("measure", "value", title="replay summary")
    for key, value in summary.items():
        table.add_row(key, escape(str(value)))
    console.print(table)
    if summary["errors"] or summary["hl7_rejected"]:
        raise typer.Exit(1)
