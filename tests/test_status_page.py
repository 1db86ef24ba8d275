"""A full run of a server whose HL7 vitals carry real-looking patient identifiers, observed the way
a ward and a central team would: the live status page in a real headless Chromium, /metrics, the
aggregate export, the JSON logs. The page must load clean, show every model and bed, and update
when an alert fires; no byte of what leaves the process may carry a patient identifier."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bedside.streams.mllp import END, frame
from bedside.tools.replay import oru
from tests.browser import Browser, chromium_path
from tests.conftest import Server, free_port, start_server

# What a real admission message carries about the patient; none of it may leave the box.
MRN, NAME, GIVEN, BIRTH, STREET, PHONE, SSN = (
    "MRN77310452", "KOWALCZYK", "HALINA", "19440229", "17 LARCHMONT AVENUE", "5550173348", "078-05-1120",
)  # fmt: skip
ACCOUNT, DOCTOR = "ACCT99120577", "OYELARAN"
IDENTIFIERS = [MRN, NAME, GIVEN, BIRTH, STREET, PHONE, SSN, ACCOUNT, DOCTOR, "Kowalczyk", "Halina"]
PID = (
    f"PID|1||{MRN}^^^GENHOSP^MR~{SSN}^^^USSSA^SS||{NAME}^{GIVEN}^M||{BIRTH}|F|||{STREET}^^SPRINGFIELD^IL^62704"
    f"||{PHONE}|||||{ACCOUNT}|{SSN}"
)
BEDS = ["ICU-1", "ICU-2", "ICU-3", "ICU-4"]
VITALS = ("heart_rate", "respiratory_rate", "systolic_bp", "diastolic_bp", "spo2", "temperature")
CALM = dict(zip(VITALS, (72, 14, 124, 78, 98, 36.8), strict=True))
SICK = dict(zip(VITALS, (138, 31, 84, 50, 86, 39.6), strict=True))


def with_patient(message: str) -> str:
    """The replay tool's ORU^R01 with a full PID segment and the attending doctor in PV1."""
    lines = message.split("\r")
    lines[1] = PID
    lines[2] = lines[2] + f"|||{DOCTOR}^ANNA^^^DR"
    return "\r".join(lines)


async def send_hl7(port: int, messages: list[str]) -> list[str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = []
    try:
        for message in messages:
            writer.write(frame(message))
            await writer.drain()
            answers.append((await asyncio.wait_for(reader.readuntil(END), 10)).decode("utf-8", "replace"))
    finally:
        writer.close()
    return answers


def get(server: Server, path: str) -> bytes:
    with urllib.request.urlopen(f"{server.url}{path}", timeout=20) as response:
        return bytes(response.read())


def snapshot(server: Server) -> dict[str, Any]:
    return dict(json.loads(get(server, "/v2/status")))


def until(condition: Any, limit_s: float = 30.0) -> Any:
    deadline = time.monotonic() + limit_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)  # polling the server for a state it reaches on its own clock
    return value


class Run:
    def __init__(self, server: Server, mllp_port: int) -> None:
        self.server, self.mllp_port = server, mllp_port
        self.control = 0

    def vitals(self, bed: str, values: dict[str, float], consciousness: str = "A") -> list[str]:
        self.control += 1
        message = with_patient(oru(bed, f"C{self.control}", values, time.time(), consciousness))
        return asyncio.run(send_hl7(self.mllp_port, [message]))


@pytest.fixture(scope="module")
def run(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    mllp = free_port()
    env = {
        "BEDSIDE_SCORING_INTERVAL_S": "0.3",
        "BEDSIDE_MONITORING_STATUS_INTERVAL_S": "0.5",
        "BEDSIDE_MONITORING_EXPORT_K": "3",
        "BEDSIDE_SERVER_LOG_FORMAT": "json",
    }
    log = tmp_path_factory.mktemp("status") / "server.log"
    server = start_server(demo_repo, log, "--mllp-port", str(mllp), "--log-level", "debug", env=env)
    started = Run(server, mllp)
    try:
        for bed in BEDS:
            assert "MSA|AA" in started.vitals(bed, CALM)[0]
        # inference traffic with identifiers where a careless server would log them: the request id,
        # a parameter, a refused body
        body = {
            "id": MRN,
            "parameters": {"patient": NAME},
            "inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 30], "data": [0.5] * 30}],
        }
        for _ in range(5):
            assert post(server, "/v2/models/breast_mass_malignancy/infer", json.dumps(body).encode()) == 200
        post(server, "/v2/models/breast_mass_malignancy/infer", f'{{"id": "{MRN}", "inputs": [{NAME}'.encode())
        post(server, f"/v2/models/{NAME}/infer", b"{}")
        # a malformed message naming the patient: refused (NAK), and the reason must not quote it
        bad = with_patient(oru("ICU-1", "BAD1", CALM, time.time())).replace("ORU^R01", f"ORU^{NAME}")
        asyncio.run(send_hl7(mllp, [bad]))
        until(lambda: all(b.get("news2") is not None for b in snapshot(server)["beds"]) and snapshot(server)["beds"])
        yield started
    finally:
        server.process.terminate()
        try:
            server.process.wait(10)
        except subprocess.TimeoutExpired:
            server.process.kill()


def post(server: Server, path: str, body: bytes) -> int:
    request = urllib.request.Request(f"{server.url}{path}", body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        return int(exc.code)


def model_names(server: Server) -> list[str]:
    return [m["name"] for m in snapshot(server)["models"]]


@pytest.mark.skipif(chromium_path() is None, reason="no chromium on this machine (Debian: apt install chromium)")
def test_the_status_page_in_chromium_shows_every_model_and_bed_and_a_new_alert(run, tmp_path):
    browser = Browser(str(chromium_path()))
    try:
        browser.navigate(f"{run.server.url}/status")
        models = model_names(run.server)
        browser.wait_for(f"document.querySelectorAll('#models tbody tr').length === {len(models)}")
        shown_models = browser.evaluate("[...document.querySelectorAll('#models tbody tr')].map(r => r.dataset.model)")
        assert sorted(shown_models) == sorted(models)
        shown_beds = browser.wait_for(
            f"(() => {{ const b = [...document.querySelectorAll('.bed')].map(c => c.dataset.bed);"
            f" return b.length === {len(BEDS)} && b; }})()"
        )
        assert sorted(shown_beds) == BEDS
        assert browser.evaluate("document.getElementById('link').textContent") == "live"
        before = int(browser.evaluate("document.body.dataset.snapshots"))

        assert "MSA|AA" in run.vitals("ICU-9", SICK, consciousness="V")[0]  # NEWS2 well above 7: an alert
        alert = browser.wait_for("(document.querySelector('#alerts li[data-bed=\"ICU-9\"]') || {}).textContent")
        assert "level 3" in alert and "ICU-9" in alert
        assert browser.evaluate("document.querySelector('.bed[data-bed=\"ICU-9\"]').className").endswith("high")
        assert int(browser.evaluate("document.body.dataset.snapshots")) > before  # pushed, not reloaded
        text = browser.evaluate("document.documentElement.outerHTML")
        shot = browser.screenshot(Path(os.environ.get("BEDSIDE_ARTIFACTS", "build/test-artifacts")) / "status_page.png")
        assert shot.stat().st_size > 10_000
        assert browser.errors() == []
        elsewhere = browser.requested(lambda url: not url.startswith(run.server.url) and not url.startswith("data:"))
        assert elsewhere == []  # no CDN, no font service: the page works offline
    finally:
        browser.close()
    assert_no_identifier("the page as drawn", text.encode())


def assert_no_identifier(where: str, data: bytes) -> None:
    lowered = data.lower()
    found = [i for i in IDENTIFIERS if i.lower().encode() in lowered]
    assert found == [], f"{where} carries patient identifiers {found}"


def test_the_export_is_coarse_and_suppresses_small_counts(run):
    export = json.loads(get(run.server, "/v2/aggregate"))
    assert export["format"] == "bedside-aggregate/1" and export["k"] == 3
    assert export["period"]["from"].endswith(("00Z",))  # whole windows of an hour: no finer time
    breast = next(m for m in export["models"] if m["model"] == "breast_mass_malignancy")
    assert breast["requests"]["ok"] == 5  # five answered: at least k, sent as is
    request = breast["latency_ms"]["request"]
    assert sum(request["counts"]) == 5 and all(n == 0 or n >= 3 for n in request["counts"])
    assert export["streams"]["beds"] in (len(BEDS), len(BEDS) + 1)  # ICU-9 too once the browser test raised its alert
    text = json.dumps(export)
    for bed in [*BEDS, "ICU-9"]:
        assert bed not in text  # beds are counted, never named


def test_no_patient_identifier_leaves_in_logs_metrics_export_or_page(run):
    server = run.server
    run.vitals("ICU-2", SICK)  # an alert's path too
    until(lambda: snapshot(server)["alerts"])
    with urllib.request.urlopen(f"{server.url}/status/stream", timeout=20) as stream:
        first = stream.readline() + stream.readline()
    surfaces = {
        "metrics": get(server, "/metrics"),
        "aggregate export": get(server, "/v2/aggregate"),
        "status snapshot": get(server, "/v2/status"),
        "status stream": first,
        "status page": get(server, "/status") + get(server, "/status/status.js") + get(server, "/status/status.css"),
        "statistics": get(server, "/v2/models/stats"),
        "alerts": get(server, "/v2/alerts"),
        "beds": get(server, "/v2/beds"),
    }
    assert b"event: snapshot" in first
    for where, data in surfaces.items():
        assert_no_identifier(where, data)
    server.process.terminate()
    server.process.wait(10)
    logged = server.log.read_bytes()
    assert b'"level"' in logged  # the JSON log ran and said something
    assert_no_identifier("the server log", logged)
    for line in logged.splitlines():
        if line.startswith(b"{"):
            assert set(json.loads(line)) <= {"ts", "level", "logger", "msg", "request_id", "model", "version",
                                             "tenant", "error", "stack"}  # fmt: skip
