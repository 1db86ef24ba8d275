"""The SYNTHETIC vital signs replay sends come from the generator the demo deterioration model is
trained on (bedside.synthetic.vitals), as valid HL7 at `vitals_every` seconds, every third bed
deteriorating; and the client tools import nothing of the server beyond the HL7/MLLP framing."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from bedside.streams.hl7v2 import parse_oru
from bedside.synthetic.vitals import WINDOW_S, course, dataset
from bedside.tools.replay import synthetic_vitals

TOOLS = Path(__file__).parents[1] / "src" / "bedside" / "tools"
ALLOWED = ("bedside.protocol", "bedside.clinical", "bedside.synthetic", "bedside.tools")
ALLOWED += ("bedside.streams.mllp", "bedside.streams.hl7v2")


def series(messages: list[tuple[float, str]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for _, text in messages:
        for obs in parse_oru(text).observations:  # raises HL7Error for anything a monitor could not send
            out.setdefault(obs.vital, []).append(obs.value)  # type: ignore[arg-type]
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
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bedside."):
                assert node.module.startswith(ALLOWED), f"{path.name} imports {node.module}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("bedside.") or alias.name.startswith(ALLOWED), path.name
