"""The cluster sizing (planning/cluster.py) against a case computed by hand: a synthetic profile with
known costs, no measurement, no sleeping; the simulations are seeded.

The hand case: 60 beds in wards of 10. Each ward box runs one model, 1 ms per request whatever the
batch, on a box of 1 core, and each bed keeps 0.1 core busy outside the models (its stream). With B
beds on a box the background is 0.1 x B cores, so a request shares the core with it: 1 ms of work
takes (1 + 0.1 B) ms. Requests are rare (under 0.5 % of them ever wait), so the p99 is that service
time: 1 + 0.1 B ms. Target 3.5 ms: a box may hold at most 25 beds, so 20 (2 wards).

- 1 box: 60 beds, 7 ms; 2 boxes: 30 beds, 4 ms; 3 boxes: 20 beds each, 3 ms: needed = 3.
- 4 boxes hold 20, 20, 10, 10 beds; one lost (a 20), its two wards go one to each 10: 20, 20, 20,
  3 ms: recommended = 4 (N+1).
- headroom at 3 boxes: 20 beds x m must keep 1 + 2 m <= 3.5 ms: m <= 1.25.
"""

from __future__ import annotations

import pytest

from bedside.modelconfig.scheduling import SchedulingPolicy
from bedside.planning.cluster import BoxSpec, beds_after_loss, size_cluster, split_wards
from bedside.planning.planner import Setup
from bedside.planning.profile import ModelProfile, Profile
from bedside.planning.simulate import Empirical
from bedside.planning.workload import Site, WorkloadError, parse_workload

PER_BED = 0.1  # cores of stream handling per bed
TARGET_MS = 3.5


def workload(central: bool = True) -> dict:
    doc: dict = {
        "site": {"beds": 60, "ward_beds": 10, "central": ["lab"] if central else []},
        # 0.01 requests/s per bed: one box of all 60 beds gets 0.6/s, each 7 ms: busy 0.4 % of the time
        "ecg": {"rate": 0.6, "priorities": {"1": 1.0}, "target_p99_ms": TARGET_MS},
    }
    if central:
        # 2 ms on a central box with no stream load: far under its 10 ms target at 1 box
        doc["lab"] = {"rate": 0.5, "target_p99_ms": 10}
    return doc


def model(name: str, ms: float) -> tuple[Setup, ModelProfile]:
    setup = Setup(name, SchedulingPolicy(aging_us=0), 0, 1, 1, Empirical({1: [ms]}))
    measured = ModelProfile(name, 1, 1, 0, 1, 1, file_mb=1.0, session_mb=10.0, run_mb=1.0, latency_ms={1: [ms]})
    return setup, measured


def sizing(central: bool = True):
    wl = parse_workload(workload(central))
    ecg, ecg_profile = model("ecg", 1.0)
    lab, lab_profile = model("lab", 2.0)
    setups = {"ecg": ecg, "lab": lab}
    profile = Profile({}, 50.0, {"ecg": ecg_profile, "lab": lab_profile})
    spec = BoxSpec(cores=1.0, budget_mb=1000.0, reserve_mb=50.0, stream_cores_per_bed=PER_BED, min_samples=400)
    return size_cluster(wl, setups, profile, spec, headroom_precision=0.02)


def test_wards_go_largest_first_onto_the_lightest_box():
    assert split_wards([10] * 6, 4) == [[10, 10], [10, 10], [10], [10]]
    assert split_wards([32, 32, 32, 20], 2) == [[32, 32], [32, 20]]
    assert [sum(b) for b in split_wards(Site(500, 32).wards(), 5)] == [116, 96, 96, 96, 96]
    assert Site(500, 32).wards() == [32] * 15 + [20]


def test_a_lost_box_moves_its_wards_to_the_lightest_survivors():
    assert beds_after_loss([[10, 10], [10, 10], [10], [10]]) == 20  # a 20 lost: 20, 20, 20
    assert beds_after_loss([[10, 10], [10]]) == 30
    assert beds_after_loss([[32, 32], [32, 20]]) == 116
    assert beds_after_loss([[10]]) is None  # nothing left to carry it
    # the lost box's wards move onto the survivors as they are, not a fresh split of every ward
    # (which would give 30 + 15 = 45): losing the 30 puts it on a box of 30
    assert beds_after_loss([[30], [20, 10], [15, 15]]) == 60


def test_the_hand_computed_case():
    result = sizing()
    ward = result.ward
    p99 = {o.boxes: o.busiest.evaluation.rows[0].p99_ms for o in ward.options}
    beds = {o.boxes: max(o.beds) for o in ward.options}
    assert beds == {1: 60, 2: 30, 3: 20, 4: 20, 5: 20}  # scanned to needed + 2
    assert p99[1] == pytest.approx(7.0, rel=0.02)
    assert p99[2] == pytest.approx(4.0, rel=0.02)
    assert p99[3] == pytest.approx(3.0, rel=0.02)
    assert ward.needed == 3
    assert ward.recommended == 4
    assert ward.after_loss is not None and ward.after_loss.beds == 20 and ward.after_loss.meets()
    lo, hi = ward.headroom[3]
    assert lo <= 1.25 < hi
    assert hi / lo <= 1.02 + 1e-9
    # the busiest of 3 boxes: 2 cores of stream load on 1 core, and the model's 0.2/s x 3 ms = 0.06 %
    assert ward.option(3).busiest.cores_busy == pytest.approx(2.0 + 0.0006, abs=0.0003)
    assert result.central is not None
    assert result.central.needed == 1 and result.central.recommended == 2
    assert result.central.options[0].busiest.evaluation.rows[0].p99_ms == pytest.approx(2.0, rel=0.02)
    assert result.boxes_needed() == 4 and result.boxes_recommended() == 6


def test_a_looser_target_needs_fewer_boxes():
    doc = workload(central=False)
    doc["ecg"]["target_p99_ms"] = 4.5  # 30 beds (4 ms) now fit a box: 2 boxes
    wl = parse_workload(doc)
    ecg, ecg_profile = model("ecg", 1.0)
    spec = BoxSpec(cores=1.0, budget_mb=1000.0, stream_cores_per_bed=PER_BED, min_samples=400)
    result = size_cluster(wl, {"ecg": ecg}, Profile({}, 0.0, {"ecg": ecg_profile}), spec)
    assert result.central is None
    assert result.ward.needed == 2
    # 3 boxes of 20: one lost, 30 and 30: 4 ms, still under 4.5
    assert result.ward.recommended == 3 and result.ward.after_loss.beds == 30


def test_a_site_that_names_an_unknown_central_demand_is_refused():
    doc = workload()
    doc["site"]["central"] = ["imaging"]
    with pytest.raises(WorkloadError, match="central names imaging"):
        parse_workload(doc)
    doc["site"] = {"beds": 0, "ward_beds": 10}
    with pytest.raises(WorkloadError, match="beds must be a whole number"):
        parse_workload(doc)


def test_the_event_loop_is_a_queue_in_front_of_the_model():
    # one ward of 10 beds, 0.5 requests/s: the loop costs 2 ms per request plus 1 ms of CPU every
    # second whatever the load, spread over the requests: 2 + 1 / 0.5 = 4 ms each; then the model's
    # 1 ms. Two cores hold the loop and the model side by side: p99 = 4 + 1 = 5 ms.
    doc = {"site": {"beds": 10, "ward_beds": 10}, "ecg": {"rate": 0.5, "priorities": {"1": 1.0}, "target_p99_ms": 5.5}}
    ecg, ecg_profile = model("ecg", 1.0)
    profile = Profile({}, 0.0, {"ecg": ecg_profile})
    spec = BoxSpec(cores=2.0, budget_mb=1000.0, loop_ms=(("ecg", 2.0),), loop_cores=0.001, min_samples=300)
    result = size_cluster(parse_workload(doc), {"ecg": ecg}, profile, spec)
    busiest = result.ward.options[0].busiest
    row = busiest.evaluation.rows[0]
    assert row.kind == "graph" and row.p99_ms == pytest.approx(5.0, rel=0.02)
    assert busiest.evaluation.utilisation["event loop"] == pytest.approx(0.5 * 0.004, rel=0.15)
    assert result.ward.needed == 1
    doc["ecg"]["target_p99_ms"] = 4.5  # the model alone (1 ms) would meet it; with the loop in front, no box does
    result = size_cluster(parse_workload(doc), {"ecg": ecg}, profile, spec)
    assert result.ward.needed is None
