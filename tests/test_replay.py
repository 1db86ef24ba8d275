"""The SYNTHETIC vital signs replay sends come from the generator the demo deterioration model is
trained on (bedside.synthetic.vitals), as valid HL7 at `vitals_every` seconds, every third bed
deteriorating; the client tools import nothing of the server beyond the HL7/MLLP framing.

A recorded HL7 file is replayed at its recorded spacing, re-timed to now unless --keep-times; every
answer that is not a plain AA is counted by code and reason, and a refusal ends in one line saying
why and a non-zero exit. Files that cannot be replayed, a server that is not running and Ctrl-C
each end in one line (against a real `bedside serve`), never a traceback or an unawaited coroutine.
"""

from __future__ import annotations

import ast
import gc
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bedside.cli import app
from bedside.streams.hl7v2 import HL7Error, accepted_ack, nak, parse_oru
from bedside.synthetic.vitals import WINDOW_S, course, dataset
from bedside.tools.hl7file import HL7FileError, Stamp, message_time, parse_time, schedule, shift_times
from bedside.tools.replay import ReplayStats, oru, read_ack, read_hl7_file, synthetic_vitals
from tests.conftest import Server, free_port, start_server

TOOLS = Path(__file__).parents[1] / "src" / "bedside" / "tools"
ALLOWED = ("bedside.protocol", "bedside.clinical", "bedside.synthetic", "bedside.tools")
ALLOWED += ("bedside.streams.mllp", "bedside.streams.hl7v2")
TRAINS = {"samples.py": ("bedside.models.train",)}  # `bedside samples` trains the reference ECG network


def series(messages: list[tuple[float, str]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for _, text in messages:
        for obs in parse_oru(text).observations:  # raises HL7Error for anything a monitor could not send
            out.setdefault(obs.vital, []).append(obs.value)
    return out


def test_messages_come_every_vitals_every_seconds_and_parse():
    messages = synthetic_vitals("REPLAY-004", 60.0, 15.0, 3)
    assert [offset for offset, _ in messages] == [0.0, 15.0, 30.0, 45.0]
    parsed = [parse_oru(text) for _, text in messages]
    assert {p.bed for p in parsed} == {"REPLAY-004"}
    assert len({p.control_id for p in parsed}) == 4
    assert synthetic_vitals("REPLAY-001", 1.0, 15.0, 0)[0][0] == 0.0  # shorter than one interval: one message
    for seed in range(40):  # saturations stay saturations, every value is physiologically possible
        series(synthetic_vitals(f"REPLAY-{seed + 1:03d}", 120.0, 10.0, seed))


def test_every_third_bed_deteriorates():
    change: dict[bool, list[float]] = {True: [], False: []}
    for seed in range(60):
        vitals = series(synthetic_vitals(f"REPLAY-{seed + 1:03d}", 300.0, 15.0, seed))
        if len(vitals.get("respiratory_rate", [])) > 8:
            rr = vitals["respiratory_rate"]
            change[seed % 3 == 0].append(np.mean(rr[-3:]) - np.mean(rr[:3]))
    assert np.mean(change[True]) > 7 and abs(np.mean(change[False])) < 1.5
    worse = [series(synthetic_vitals("REPLAY-001", 300.0, 15.0, seed)) for seed in range(0, 60, 3)]
    assert sum("V" in v["consciousness"] for v in worse) >= 3  # some become confused late
    assert sum(v["oxygen_flow"][-1] > 0 for v in worse) >= 5  # some are put on oxygen


def test_one_generator_for_training_and_replay():
    rng = np.random.default_rng(0)
    patient = course(rng, WINDOW_S, deteriorating=True, severity=1.0, onset=0.0)
    assert patient.severity == 1.0 and patient.times[0] == 0.0 and patient.times[-1] == 3600.0
    stable = course(np.random.default_rng(1), WINDOW_S, deteriorating=False)
    assert stable.severity == 0.0 and stable.alert.all()
    x, y = dataset(200, seed=3)
    x2, y2 = dataset(200, seed=3)
    assert x.shape == (200, 20) and np.array_equal(x, x2) and np.array_equal(y, y2) and 0.15 < y.mean() < 0.45


def test_client_tools_import_no_server_code():
    for path in TOOLS.glob("*.py"):
        allowed = ALLOWED + TRAINS.get(path.name, ())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bedside."):
                assert node.module.startswith(allowed), f"{path.name} imports {node.module}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("bedside.") or alias.name.startswith(ALLOWED), path.name


# --- recorded HL7 files: read, timed, re-timed ------------------------------------------------------

NOW = 1_800_000_000.0  # 2027-01-15 08:00 UTC


def write_recording(
    path: Path, start: float, beds: tuple[str, ...] = ("RT-1", "RT-2"), count: int = 3, every: float = 2.0
) -> Path:
    """A recording as `bedside samples` writes one: messages in time order, one segment a line."""
    messages = []
    for seed, bed in enumerate(beds):
        messages += synthetic_vitals(bed, count * every, every, seed, start, utc_offset_min=60)
    messages.sort(key=lambda m: m[0])
    path.write_text("\n".join(text.replace("\r", "\n") for _, text in messages))
    return path


def obx_times(message: str) -> set[str]:
    return {s.split("|")[14] for s in message.split("\r") if s.startswith("OBX|") and len(s.split("|")) > 14}


def test_a_recording_is_retimed_to_now_with_its_spacing_and_zone_kept(tmp_path):
    recorded = read_hl7_file(write_recording(tmp_path / "monitor.hl7", start=1_736_924_400.0, count=10, every=30.0))
    assert len(recorded) == 20 and parse_time("20250115080000+0100") == Stamp(1_736_924_400, "", "+0100")
    at_speed_1 = schedule(recorded, 1.0, NOW)
    offsets = [offset for offset, _ in at_speed_1]
    assert offsets[:4] == [0.0, 0.0, 30.0, 30.0] and offsets[-1] == 270.0
    for offset, message in at_speed_1:
        assert message_time(message) == NOW + offset  # the first message is now; the spacing is kept
        msh7 = message.split("|")[6]
        assert msh7.endswith("+0100") and obx_times(message) == {msh7}  # zone kept, OBX-14 moved with MSH-7
        vitals = parse_oru(message, now=NOW + offset)  # what the server reads when it arrives
        assert not vitals.warnings and vitals.observations
    at_speed_60 = schedule(recorded, 60.0, NOW)
    assert [offset for offset, _ in at_speed_60] == offsets
    times = [message_time(m) for _, m in at_speed_60]
    assert times[-1] == int(NOW + 270 / 60)  # faster: the recording ends as the replay does...
    for (offset, _), when in zip(at_speed_60, times, strict=True):
        assert when is not None and when <= NOW + offset / 60  # ...and no message is stamped after it arrives
        assert when - times[0] == offset
    kept = schedule(recorded, 60.0, NOW, keep_times=True)
    assert [m for _, m in kept] == recorded and [o for o, _ in kept] == offsets


def test_times_without_an_offset_are_written_in_utc_and_precision_is_kept():
    message = "\r".join(
        [
            "MSH|^~\\&|MON|W|B|H|20250115080000^S||ORU^R01|c1|P|2.5",
            "PV1|1|I|W^1",
            "OBR|1|||x|||20250115075959.25+0200",
            "OBX|1|NM|8867-4^HR^LN||80|/min|||||F|||202501150800",
        ]
    )
    shifted = shift_times(message, 3600).split("\r")
    assert shifted[0].split("|")[6] == "20250115090000+0000^S"  # naive -> UTC with its offset written
    assert shifted[2].split("|")[7] == "20250115085959.25+0200"  # offset and fraction kept
    assert shifted[3].split("|")[14] == "20250115090000+0000"  # minutes -> seconds, UTC
    assert shifted[1] == "PV1|1|I|W^1"
    untimed = "MSH|^~\\&|MON|W|B|H|||ORU^R01|c2|P|2.5\rPV1|1|I|W^1\r"
    later = message.replace("20250115080000^S", "20250115080010")
    assert [o for o, _ in schedule([message, untimed, later], 1.0, NOW)] == [0.0, 0.0, 10.0]
    assert schedule([untimed], 1.0, NOW) == [(0.0, untimed)]  # nothing to re-time: sent as it is


def test_recorded_files_are_read_in_every_framing_and_refused_clearly(tmp_path):
    one = "MSH|^~\\&|M|W|B|H|20250115080000||ORU^R01|1|P|2.5\rPV1|1|I|W^1\rOBX|1|NM|8867-4^HR^LN||80|/min|||||F\r"
    framed = tmp_path / "framed.hl7"
    framed.write_bytes(b"\x0b" + one.encode() + b"\x1c\r\x0b" + one.encode() + b"\x1c\r")
    batch = tmp_path / "batch.hl7"
    batch.write_text("FHS|^~\\&|M\r\nBHS|^~\\&|M\r\n" + one.replace("\r", "\r\n") + "\r\nBTS|1\r\nFTS|1\r\n")
    assert read_hl7_file(framed) == [one, one] and read_hl7_file(batch) == [one]
    (tmp_path / "folder").mkdir()
    (tmp_path / "empty.hl7").write_text(" \n\n")
    (tmp_path / "notes.txt").write_text("vitals from bed 3\nHR 80\n")
    (tmp_path / "preamble.hl7").write_text("exported 2025-01-15\n" + one)
    (tmp_path / "binary.hl7").write_bytes(bytes(range(256)) * 4)
    cases = {
        "missing.hl7": "does not exist",
        "folder": "is a folder",
        "empty.hl7": "is empty",
        "notes.txt": "contains no HL7 messages",
        "binary.hl7": "contains no HL7 messages",
        "preamble.hl7": "line 1 ('exported 2025-01-15') comes before the first MSH",
    }
    for name, reason in cases.items():
        with pytest.raises(HL7FileError, match=re.escape(reason)):
            read_hl7_file(tmp_path / name)


def test_every_answer_that_is_not_a_plain_aa_is_counted_with_its_reason():
    stamp = time.strftime("%Y%m%d%H%M%S+0000", time.gmtime(NOW))
    old = time.strftime("%Y%m%d%H%M%S+0000", time.gmtime(NOW - 7200))
    fresh = oru("W-1", "a1", {"heart_rate": 80.0}, NOW)
    part_old = fresh.replace("|a1|", "|a2|").replace(f"|||||F|||{stamp}", f"|||||F|||{old}")
    all_old = oru("W-1", "a3", {"heart_rate": 80.0}, NOW - 7200)
    stats = ReplayStats()
    for raw in (fresh, part_old, all_old, all_old.replace("|a3|", "|a4|")):
        try:
            answer = accepted_ack(raw, parse_oru(raw, now=NOW))  # what the server answers
        except HL7Error as exc:
            answer = nak(raw, exc)
        stats.hl7_sent += 1
        stats.record(read_ack(answer))
    assert (stats.hl7_acked, stats.hl7_rejected, stats.observations_refused) == (2, 2, 1)
    lines = stats.summary()["hl7_answers"]
    assert lines[0].startswith("2 x AE: observation times are 2.0 h behind this box's clock; if the monitor")
    assert lines[1].startswith("1 x AA with warning: time is 2.0 h behind this box's clock (limit 60 min)")
    line = stats.refusal(keep_times=True)
    assert line is not None and line.startswith("2 of 4 messages were refused and 1 observations were left out")
    assert line.endswith("drop --keep-times to re-time them to now")
    assert "replay a shorter part" in (stats.refusal(keep_times=False) or "")
    assert ReplayStats().refusal() is None


# --- the command against a real server -------------------------------------------------------------


@pytest.fixture(scope="module")
def hl7_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real `bedside serve` with its MLLP listener (no models: the vitals are stored all the same)."""
    root = tmp_path_factory.mktemp("replay")
    (root / "repo").mkdir()
    mllp_port = free_port()
    server = start_server(root / "repo", root / "server.log", "--mllp-port", str(mllp_port))
    server.mllp_port = mllp_port
    yield server
    server.process.terminate()
    server.process.wait(10)


def bedside(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="250", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "bedside", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def to(server: Server) -> list[str]:
    return ["--url", server.url, "--mllp", f"127.0.0.1:{server.mllp_port}"]


def clean(output: str) -> str:
    assert "Traceback" not in output and "never awaited" not in output, output
    return output


def beds(server: Server) -> dict[str, dict]:
    client = server.client()
    try:
        return {b["bed"]: b["vitals"] for b in client.request("GET", "/v2/beds")}
    finally:
        client.close()


def test_a_recording_is_replayed_at_its_spacing_retimed_or_refused_as_recorded(hl7_server, tmp_path):
    recording = write_recording(tmp_path / "monitor.hl7", start=1_736_924_400.0)  # January 2025
    started = time.monotonic()
    done = bedside("replay", *to(hl7_server), "--hl7-file", str(recording), "--no-ecg", "--speed", "2")
    assert time.monotonic() - started >= 2.0  # 4 s of recorded spacing at twice real time
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"hl7_acked\s+│ 6\b", clean(done.stdout)) and "ecg_" not in done.stdout
    stored = beds(hl7_server)
    assert stored["RT-1"]["heart_rate"] is not None and stored["RT-2"]["respiratory_rate"] is not None
    refused = bedside(
        "replay", *to(hl7_server), "--hl7-file", str(recording), "--no-ecg", "--keep-times", "--speed", "100"
    )
    assert refused.returncode == 1
    lines = clean(refused.stdout).strip().splitlines()
    assert "6 x AE: observation times are" in refused.stdout
    assert lines[-1].startswith("6 of 6 messages were refused: observation times are")
    assert lines[-1].endswith("drop --keep-times to re-time them to now")


def test_observations_refused_inside_accepted_messages_fail_the_replay(hl7_server, tmp_path):
    now = time.time()
    stamp, old = (time.strftime("%Y%m%d%H%M%S+0000", time.gmtime(t)) for t in (now, now - 7200))
    fresh = oru("RT-3", "w1", {"heart_rate": 81.0, "respiratory_rate": 17.0}, now)
    part_old = fresh.replace("|w1|", "|w2|").replace(f"F|||{stamp}", f"F|||{old}", 1)
    (tmp_path / "mixed.hl7").write_text((fresh + part_old).replace("\r", "\n"))
    done = bedside("replay", *to(hl7_server), "--hl7-file", str(tmp_path / "mixed.hl7"), "--no-ecg", "--keep-times")
    assert done.returncode == 1
    assert (
        re.search(r"hl7_acked\s+│ 2\b", clean(done.stdout))
        and "1 x AA with warning: time is 2.0 h behind" in done.stdout
    )
    assert done.stdout.strip().splitlines()[-1].startswith("1 observations were left out of accepted messages: ")


@pytest.mark.parametrize(
    ("option", "name", "reason"),
    [
        ("--ecg-file", "missing.dcm", "does not exist"),
        ("--ecg-file", "folder", "is a folder, not a DICOM ECG file"),
        ("--ecg-file", "notes.txt", "is not a DICOM file (it has no DICOM header)"),
        ("--ecg-file", "ct.dcm", "is a DICOM file without a waveform (CT), not a 12-lead ECG"),
        ("--hl7-file", "missing.hl7", "does not exist"),
        ("--hl7-file", "empty.hl7", "is empty"),
        ("--hl7-file", "notes.txt", "contains no HL7 messages (no line starts with an MSH segment)"),
    ],
)
def test_files_that_cannot_be_replayed_are_one_line_and_exit_2(tmp_path, option, name, reason):
    (tmp_path / "folder").mkdir()
    (tmp_path / "empty.hl7").write_text("")
    (tmp_path / "notes.txt").write_text("HR 80\n")
    if name == "ct.dcm":
        pydicom_data = pytest.importorskip("pydicom.data")
        shutil.copy(pydicom_data.get_testdata_file("CT_small.dcm"), tmp_path / name)
    url = f"http://127.0.0.1:{free_port()}"  # nothing there: the file is refused before the server is tried
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, ["replay", "--url", url, "--beds", "1", option, str(tmp_path / name)])
        gc.collect()  # an unawaited coroutine warns when it is collected
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"{option}: {tmp_path / name} {reason}"
    assert not [w for w in caught if "never awaited" in str(w.message)]


def test_a_server_that_is_not_running_is_one_line(hl7_server):
    url = f"http://127.0.0.1:{free_port()}"
    down = bedside("replay", "--url", url, "--beds", "2", "--seconds", "6")
    assert down.returncode == 1
    assert clean(down.stdout + down.stderr).strip() == f"cannot reach bedside at {url} (is `bedside serve` running?)"
    no_mllp = bedside("replay", "--url", hl7_server.url, "--mllp", f"127.0.0.1:{free_port()}", "--beds", "1")
    assert no_mllp.returncode == 1
    assert clean(no_mllp.stdout + no_mllp.stderr).strip().startswith("cannot reach the HL7 listener at 127.0.0.1:")


def test_ctrl_c_ends_a_replay_with_its_partial_summary(hl7_server, tmp_path):
    recording = write_recording(tmp_path / "long.hl7", start=1_736_924_400.0, beds=("RT-9",), count=60, every=1.0)
    env = dict(os.environ, COLUMNS="250", PYTHONUNBUFFERED="1")
    args = ["replay", *to(hl7_server), "--hl7-file", str(recording), "--no-ecg"]
    process = subprocess.Popen(
        [sys.executable, "-m", "bedside", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    deadline = time.monotonic() + 30
    while "RT-9" not in beds(hl7_server) and time.monotonic() < deadline:  # the replay is under way
        time.sleep(0.05)  # polling the server, not waiting for a result
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=20)
    assert process.returncode == 130, output
    lines = clean(output).strip().splitlines()
    assert lines[-1].startswith("interrupted") and "replay summary" in output
    sent = re.search(r"hl7_sent\s+│ (\d+)", output)
    assert sent is not None and 1 <= int(sent.group(1)) < 60
