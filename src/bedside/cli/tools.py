"""Client tools: `replay` feeds a running bedside (SYNTHETIC or recorded HL7 vitals and 12-lead ECG);
`samples` makes the files the README's examples use."""

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
    vitals_every: Annotated[
        float, typer.Option(help="Simulated seconds between generated HL7 vital-sign messages.")
    ] = 15.0,
    ecg: Annotated[bool, typer.Option(help="Stream 12-lead ECG per bed over WebSocket.")] = True,
    hl7_file: Annotated[
        Path | None,
        typer.Option(
            help="Replay recorded HL7 messages from a file instead of generating them, paced by their recorded "
            "spacing (divided by --speed) and re-timed to now."
        ),
    ] = None,
    keep_times: Annotated[
        bool,
        typer.Option(
            "--keep-times",
            help="Send --hl7-file's timestamps as recorded (the server refuses observations older than "
            "streams.max_observation_age_s).",
        ),
    ] = False,
    ecg_file: Annotated[
        Path | None,
        typer.Option(help="Stream a recorded DICOM 12-lead ECG (looped) for every bed instead of SYNTHETIC ECG."),
    ] = None,
) -> None:
    """Feed SYNTHETIC (or recorded) HL7 vitals and 12-lead ECG into a running bedside; print a summary.
    Exit 1 when the server refused any message or observation, 130 when interrupted."""
    import asyncio

    from rich.progress import BarColumn, Progress, TextColumn

    from bedside.tools.ecgfile import ECGFileError, read_dicom_ecg
    from bedside.tools.replay import HL7FileError, ReplayStats, Unreachable, check_server, read_hl7_file
    from bedside.tools.replay import replay as run_replay

    target = _host_port(mllp, "--mllp", "127.0.0.1") if mllp else None
    if speed <= 0 or vitals_every <= 0 or seconds <= 0 or beds < 0:
        fail("--speed, --vitals-every and --seconds must be above 0, --beds 0 or more", 2)
    if hl7_file is not None and target is None:
        fail("--hl7-file needs an HL7 listener to send to: drop --mllp ''", 2)
    if keep_times and hl7_file is None:
        fail("--keep-times applies to --hl7-file only", 2)
    if ecg_file is not None and not ecg:
        fail("--ecg-file streams ECG: drop --no-ecg", 2)
    try:  # the files are read before anything is sent: a mistake in one is one line and exit 2
        messages = read_hl7_file(hl7_file) if hl7_file is not None else None
        if ecg_file is not None:
            read_dicom_ecg(ecg_file)
    except (HL7FileError, ECGFileError) as exc:
        fail(f"{'--hl7-file' if isinstance(exc, HL7FileError) else '--ecg-file'}: {exc}", 2)
    try:
        check_server(url)
    except Unreachable as exc:
        fail(str(exc), 1)
    expected_ecg = beds * max(0, int(seconds) - 4) if ecg else 0
    expected_hl7 = (len(messages) if messages else beds * max(1, int(seconds / vitals_every))) if target else 0
    stats = ReplayStats()
    failure: tuple[str, int] | None = None
    interrupted = False
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        console=console,
        transient=True,  # the summary says it all once the replay ends
    ) as bar:
        hl7_task = bar.add_task("HL7 messages", total=expected_hl7)
        ecg_task = bar.add_task("ECG windows", total=expected_ecg)

        def update(stats: ReplayStats) -> None:
            bar.update(hl7_task, completed=stats.hl7_sent)
            bar.update(ecg_task, completed=len(stats.ecg_results))

        try:
            asyncio.run(
                run_replay(
                    url,
                    target,
                    beds,
                    seconds,
                    speed,
                    vitals_every,
                    ecg,
                    hl7_file,
                    update,
                    ecg_file=ecg_file,
                    keep_times=keep_times,
                    stats=stats,
                )
            )
        except (HL7FileError, ECGFileError) as exc:
            failure = (str(exc), 2)
        except Unreachable as exc:
            failure = (str(exc), 1)
        except KeyboardInterrupt:
            interrupted = True
    if failure is not None:
        fail(*failure)
    _print_summary(stats, hl7=target is not None, ecg=ecg)
    if interrupted:
        console.print("interrupted (the summary covers what was sent before Ctrl-C)")
        raise typer.Exit(130)
    refusal = stats.refusal(keep_times)
    if refusal:
        fail(refusal, 1)
    if stats.errors:
        fail(f"{len(stats.errors)} stream errors; the first: {stats.errors[0]}", 1)


def _print_summary(stats: ReplayStats, hl7: bool, ecg: bool) -> None:
    """The summary's rows for what was replayed (HL7, ECG), every answer that was not a plain AA
    on a line of its own."""
    table = Table("measure", "value", title="replay summary")
    for key, value in stats.summary().items():
        if (key.startswith("hl7_") and not hl7) or (key.startswith("ecg_") and not ecg):
            continue
        if isinstance(value, list):
            value = "\n".join(str(v) for v in value) or "-"
        table.add_row(key, escape(str(value)))
    console.print(table)


def samples(
    out: Annotated[Path, typer.Option(help="Folder to write the sample files into.")] = Path("samples"),
    force: Annotated[
        bool, typer.Option("--force", help="Write into a non-empty folder that `bedside samples` did not make.")
    ] = False,
) -> None:
    """Make the files the README's examples use: a LightGBM model on REAL breast-cancer data, the
    reference ECG network trained on SYNTHETIC ECG with its data, a SYNTHETIC HL7 recording and a
    REAL 12-lead DICOM ECG. README.txt in the folder says what each is and where it comes from."""
    from bedside.models.samples import SamplesError, make_samples

    console.print(
        f"writing sample files into {escape(str(out))}/ (about 20 s; the ECG network is trained here)", soft_wrap=True
    )
    try:
        make_samples(out, force, lambda line: console.print(f"  {escape(line)}", soft_wrap=True))
    except SamplesError as exc:
        fail(str(exc), 2)


def aggregate(
    url: UrlOption = "http://127.0.0.1:8000",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the export to this file (default: print it).")
    ] = None,
) -> None:
    """The de-identified aggregate of a running bedside for a central dashboard (GET /v2/aggregate):
    counts and latency histograms per model with small counts withheld, drift per feature, streams and
    update figures; no identifiers, no values, times in whole windows. Needs the monitor role
    (BEDSIDE_TOKEN) when authentication is on. Exit 1 when the server cannot be reached or refuses."""
    import json

    from bedside.tools.client import Client, ServerError

    client = Client(url)
    try:
        doc = client.request("GET", "/v2/aggregate")
    except ServerError as exc:
        fail(f"the server refused the export: {exc}", 1)
    except OSError as exc:
        fail(f"cannot reach {url}: {exc.strerror or type(exc).__name__}", 1)
    finally:
        client.close()
    text = json.dumps(doc, indent=2) + "\n"
    if out is None:
        print(text, end="")
        return
    try:
        out.write_text(text)
    except OSError as exc:
        fail(f"cannot write {out.name}: {exc.strerror or type(exc).__name__}", 2)
    console.print(f"wrote the aggregate export ({len(doc['models'])} model versions) to {escape(str(out))}")
