"""The capacity planner: bin packing keeps every box within its memory, the simulator agrees with
queueing theory (M/M/1, M/D/1, non-preemptive priority), and `bedside plan` answers on the demo
repository or refuses a bad workload in one line. Simulations are seeded: no timing, no sleeps."""

from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

from bedside.cli import main
from bedside.modelconfig.scheduling import SchedulingPolicy
from bedside.planning.binpack import DoesNotFit, ModelSize, pack
from bedside.planning.simulate import Deterministic, Empirical, Exponential, SimModel, Stream, simulate
from bedside.planning.workload import WorkloadError, parse_workload

NO_AGING = SchedulingPolicy(aging_us=0)


# --- bin packing ---------------------------------------------------------------------------------


def sizes() -> list[ModelSize]:
    return [
        ModelSize("ecg", 3, session_mb=300, instance_mb=50),
        ModelSize("vitals", 2, session_mb=120, instance_mb=10),
        ModelSize("lab", 1, session_mb=40, instance_mb=5),
        ModelSize("notes", 2, session_mb=500, instance_mb=200),
    ]


@pytest.mark.parametrize("budget", [1000, 1400, 2000, 4000])
def test_no_box_goes_over_its_budget_and_every_instance_is_placed(budget):
    packing = pack(sizes(), budget, reserve_mb=60, headroom=0.1)
    capacity = budget * 0.9 - 60
    for box in packing.boxes:
        # recompute what the box holds from the model sizes: one session per model on the box
        used = sum(m.session_mb + box.instances[m.name] * m.instance_mb for m in sizes() if m.name in box.instances)
        assert used == pytest.approx(box.used_mb)
        assert used <= capacity + 1e-9
    for m in sizes():
        assert sum(b.instances.get(m.name, 0) for b in packing.boxes) == m.instances


def test_more_memory_never_needs_more_boxes():
    counts = [pack(sizes(), budget, reserve_mb=60).box_count() for budget in (900, 1200, 1600, 2400, 4000)]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] > counts[-1] == 1


def test_instances_of_a_model_share_its_session_on_a_box():
    packing = pack([ModelSize("ecg", 4, session_mb=300, instance_mb=50)], 1000, headroom=0)
    assert packing.box_count() == 1
    assert packing.boxes[0].used_mb == pytest.approx(300 + 4 * 50)


def test_an_instance_larger_than_a_box_is_refused_clearly():
    with pytest.raises(DoesNotFit, match=r"'notes' needs 700\.0 MB for one instance"):
        pack(sizes(), 800, reserve_mb=60, headroom=0.1)
    with pytest.raises(DoesNotFit, match="no room for models"):
        pack(sizes(), 50, reserve_mb=60)


# --- the simulator against closed forms --------------------------------------------------------


def one_queue(service, streams, instances=1, cores=8.0, max_batch=0, policy=NO_AGING, seconds=200.0, seed=1):
    model = SimModel("m", policy, max_batch, instances, 1, service, streams)
    return simulate([model], cores=cores, seconds=seconds, seed=seed)["m"]


def test_mm1_mean_wait_matches_the_closed_form():
    mu = 1000.0  # per second: 1 ms mean service
    for lam in (500.0, 800.0):
        result = one_queue(Exponential(1e6), [Stream(3, lam)])
        expected_ms = lam / (mu * (mu - lam)) * 1e3  # Wq = rho / (mu - lambda)
        assert result.levels[3].queue_ms["mean"] == pytest.approx(expected_ms, rel=0.05)
        assert result.utilisation == pytest.approx(lam / mu, rel=0.02)


def test_md1_mean_wait_matches_pollaczek_khinchine():
    mu, lam = 1000.0, 800.0
    result = one_queue(Deterministic(1e6), [Stream(3, lam)])
    rho = lam / mu
    expected_ms = rho / (2 * mu * (1 - rho)) * 1e3  # P-K with zero service variance: half of M/M/1
    assert result.levels[3].queue_ms["mean"] == pytest.approx(expected_ms, rel=0.05)


def test_non_preemptive_priority_matches_cobham_and_stat_waits_less():
    mu, stat, routine = 1000.0, 200.0, 600.0
    result = one_queue(Exponential(1e6), [Stream(1, stat), Stream(3, routine)])
    rho1, rho = stat / mu, (stat + routine) / mu
    w0 = (stat + routine) * (2 / mu**2) / 2  # mean residual work: sum(lambda E[S^2]) / 2
    assert result.levels[1].queue_ms["mean"] == pytest.approx(w0 / (1 - rho1) * 1e3, rel=0.05)
    assert result.levels[3].queue_ms["mean"] == pytest.approx(w0 / ((1 - rho1) * (1 - rho)) * 1e3, rel=0.05)
    assert result.levels[1].queue_ms["p99"] < result.levels[3].queue_ms["p99"] / 2


def test_the_same_seed_gives_the_same_prediction():
    args = (Exponential(1e6), [Stream(1, 100.0), Stream(3, 500.0)])
    a, b = one_queue(*args, seconds=5, seed=7), one_queue(*args, seconds=5, seed=7)
    assert a.levels == b.levels
    assert one_queue(*args, seconds=5, seed=8).levels != a.levels


def test_batching_serves_a_load_that_batch_one_cannot():
    # 1 ms per execution whatever the batch (up to 8): 1,500 req/s is 150 % of batch-1 capacity
    service = Empirical({1: [1.0] * 10, 8: [1.0] * 10})
    batched = one_queue(service, [Stream(3, 1500.0)], max_batch=8, seconds=20)
    assert batched.levels[3].rejected == 0 and batched.mean_batch > 1.4
    unbatched = one_queue(service, [Stream(3, 1500.0)], max_batch=0, seconds=20)
    assert unbatched.levels[3].rejected > 0  # the queue fills (1,024 waiting) and refuses


def test_shared_cores_slow_service_down():
    # two models, 1 instance each, 1 ms deterministic at 30 % each: on 2 cores they never meet; on one
    # core, whenever both run each goes at half speed
    def box(cores):
        models = [SimModel(n, NO_AGING, 0, 1, 1, Deterministic(1e6), [Stream(3, 300.0)]) for n in ("a", "b")]
        return simulate(models, cores=cores, seconds=50, seed=3)

    roomy, shared = box(2.0), box(1.0)
    md1_ms = 1.0 + 0.3 / (2 * 1000 * 0.7) * 1e3  # service + P-K wait: each model alone is an M/D/1 queue
    assert roomy["a"].levels[3].latency_ms["mean"] == pytest.approx(md1_ms, rel=0.03)
    assert shared["a"].levels[3].latency_ms["mean"] > 1.3 * md1_ms
    assert shared["a"].utilisation > 1.2 * roomy["a"].utilisation  # busy longer: running at half speed


def test_empirical_service_interpolates_between_measured_batch_sizes():
    service = Empirical({1: [1.0], 4: [4.0], 8: [6.0]})
    import numpy as np

    rng = np.random.default_rng(0)
    assert service.draw(1, rng) == pytest.approx(1e6)
    assert service.draw(2, rng) == pytest.approx(2e6)
    assert service.draw(6, rng) == pytest.approx(5e6)
    assert service.draw(16, rng) == pytest.approx(10e6)  # extrapolated along the last two sizes


# --- the workload file ---------------------------------------------------------------------------


def test_workload_parses_levels_targets_and_graph_calls():
    w = parse_workload(
        {
            "seconds": 30,
            "m": {"rate": 10, "priorities": {"1": 0.25, "3": 0.75}, "target_p99_ms": {"1": 5, "3": 50}},
            "g": {"rate": 2, "calls": {"m": 2}, "target_p99_ms": 20},
        }
    )
    m, g = w.demands
    assert m.priorities == {1: 0.25, 3: 0.75} and m.target(1) == 5 and m.target(2) is None
    assert g.calls == {"m": 2} and g.target(3) == 20
    assert w.seconds == 30 and w.models_called() == {"m"}


@pytest.mark.parametrize(
    ("doc", "phrase"),
    [
        ({}, "names no model"),
        ({"m": {"rate": -1}}, "rate"),
        ({"m": {"rate": 1, "priorities": {"1": 0.5}}}, "adding up to 1"),
        ({"m": {"rate": 1, "priorities": {"stat": 1.0}}}, "not a priority level"),
        ({"m": {"rate": 1, "speed": 3}}, "unknown keys speed"),
        ({"m": {"rate": 1, "calls": {"x": 0}}}, "calls.x"),
        ({"m": 5}, "must be a table"),
    ],
)
def test_workload_mistakes_are_named(doc, phrase):
    with pytest.raises(WorkloadError, match=phrase):
        parse_workload(doc)


# --- the command ---------------------------------------------------------------------------------


@dataclass
class Result:
    exit_code: int
    output: str


def bedside(*args: object) -> Result:
    out = io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(out), mock.patch.object(sys, "argv", ["bedside", *map(str, args)]):
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return Result(code, out.getvalue())


WORKLOAD = """
[breast_mass_malignancy]
rate = 200
priorities = { 1 = 0.2, 3 = 0.8 }
target_p99_ms = { 1 = 50, 3 = 200 }

[triage]
rate = 20
calls = { vitals_deterioration = 1, diabetes_progression = 1 }
target_p99_ms = 100
"""


@pytest.fixture(scope="module")
def profile_file(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo models measured once (a few seconds), shared by the command's tests."""
    from bedside.planning.profile import measure

    path = tmp_path_factory.mktemp("plan") / "profile.json"
    path.write_text(measure(demo_repo, runs=20, budget_s=0.05).to_json())
    return path


def test_plan_on_the_demo_repository_meets_a_light_workload(demo_repo, profile_file, tmp_path):
    workload = tmp_path / "ward.toml"
    workload.write_text(WORKLOAD)
    out_json = tmp_path / "plan.json"
    args = ["-r", demo_repo, "-w", workload, "--profile", profile_file, "--memory-mb", 4096, "--cores", 2]
    result = bedside("plan", *args, "--seconds", 5, "--json", out_json)
    assert result.exit_code == 0, result.output
    assert "this box meets the targets" in result.output
    doc = json.loads(out_json.read_text())
    assert doc["boxes_needed"] == 1
    names = {(r["name"], r["priority"]) for r in doc["predictions"]["rows"]}
    assert names == {("breast_mass_malignancy", 1), ("breast_mass_malignancy", 3), ("triage", 3)}
    assert all(r["met"] for r in doc["predictions"]["rows"])


def test_plan_measures_when_the_profile_file_is_new(demo_repo, tmp_path):
    workload = tmp_path / "w.toml"
    workload.write_text("[diabetes_progression]\nrate = 50\ntarget_p99_ms = 100\n")
    profile = tmp_path / "new-profile.json"
    result = bedside("plan", "-r", demo_repo, "-w", workload, "--profile", profile, "--runs", 10, "--seconds", 2)
    assert result.exit_code == 0, result.output
    assert json.loads(profile.read_text())["format"] == "bedside-plan-profile/1"


def test_plan_says_how_many_boxes_an_impossible_box_needs(demo_repo, profile_file, tmp_path):
    workload = tmp_path / "w.toml"
    workload.write_text("[breast_mass_malignancy]\nrate = 200\ntarget_p99_ms = 100\n")
    # a box too small for all four demo models at once: the planner spreads them
    from bedside.planning.profile import load_profile

    profile = load_profile(profile_file)
    sizes = sorted(m.session_mb + m.run_mb for m in profile.models.values())
    budget = profile.base_mb + sizes[-1] + 0.01
    result = bedside("plan", "-r", demo_repo, "-w", workload, "--profile", profile_file, "--memory-mb", budget,
                     "--headroom", 0, "--seconds", 2)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "needs" in result.output and "do not fit in one box's memory" in result.output


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("[no_such_model]\nrate = 1\n", "not a model of the repository"),
        ("[breast_mass_malignancy\nrate = 1\n", "not valid TOML"),
        ("[breast_mass_malignancy]\nrate = 1\npriorities = { 7 = 1.0 }\n", "has levels 1..3"),
        ("[t]\nrate = 1\ncalls = { nothing = 1 }\n", "calls 'nothing'"),
    ],
)
def test_a_bad_workload_is_one_line_and_exit_2(demo_repo, profile_file, tmp_path, text, phrase):
    workload = tmp_path / "bad.toml"
    workload.write_text(text)
    result = bedside("plan", "-r", demo_repo, "-w", workload, "--profile", profile_file, "--seconds", 1)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output
    assert phrase in result.output


def test_a_missing_workload_file_is_one_line_and_exit_2(demo_repo, tmp_path):
    result = bedside("plan", "-r", demo_repo, "-w", tmp_path / "nope.toml")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "cannot read the workload" in result.output
