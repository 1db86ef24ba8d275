"""Scheduled warm-up: the schedule (pure, with a given clock), the keep-hot idle rule, and real runs
through the dataplane on the demo models. No test sleeps: the task's clock and sleep are injected."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from bedside.dataplane import Dataplane
from bedside.dataplane.types import ModelMetadata, TensorMetadata
from bedside.dataplane.warmup import TENANT, WarmupTask, start_warmup, synthesize, warm_up
from bedside.dataplane.warmup_schedule import (
    MAX_NAP_S,
    Schedule,
    idle_due,
    in_window,
    next_fire,
    parse_times,
    seconds_to_window,
)
from bedside.protocol.types import SYSTEM
from bedside.settings import DEFAULTS, Settings, SettingsError, WarmupSettings, from_environment
from tests.models import SCALE_CONFIG, all_types_model, scale_model, write_config

DEMO = ("breast_mass_malignancy", "diabetes_progression", "vitals_deterioration")


def at(hh: int, mm: int, ss: int = 0, day: int = 10) -> datetime:
    return datetime(2025, 3, day, hh, mm, ss)


# --- the schedule ---------------------------------------------------------------------------------


def test_times_parse_sorted_and_distinct():
    assert parse_times("") == () and parse_times(" , ") == ()
    assert parse_times("18:30, 06:30,6:30,") == (6 * 60 + 30, 18 * 60 + 30)
    assert parse_times("00:00,23:59") == (0, 23 * 60 + 59)
    for bad in ("24:00", "06:60", "6", "06:3", "ab:cd", "06-30", "０６:30", "06:30:00"):
        with pytest.raises(ValueError, match="not a time of day"):
            parse_times(bad)


def test_settings_refuse_what_the_schedule_cannot_read():
    """The settings check and the schedule's parser are two readers of one format: they agree."""
    for text in ("", "06:30", "6:30,18:30", "00:00, 23:59,", "24:00", "06:60", "x", "06:3", "1:2:3", "06:30,,7"):
        try:
            parse_times(text)
            parsed = True
        except ValueError:
            parsed = False
        try:
            DEFAULTS.replace({"warmup.times": text})
            accepted = True
        except SettingsError:
            accepted = False
        assert parsed == accepted, text


def test_next_fire_later_today_then_tomorrow():
    times = parse_times("06:30,18:30")
    assert next_fire(times, at(5, 0)) == at(6, 30)
    assert next_fire(times, at(6, 29, 59)) == at(6, 30)
    assert next_fire(times, at(6, 30)) == at(18, 30)  # strictly after: a run in its own minute fires once
    assert next_fire(times, at(6, 30, 1)) == at(18, 30)
    assert next_fire(times, at(23, 59, 59)) == at(6, 30, day=11)  # wraps midnight
    assert next_fire((0,), at(23, 59, 30)) == at(0, 0, day=11)
    assert next_fire((), at(6, 0)) is None


def test_keep_hot_window_and_its_opening():
    morning, night = (6 * 60, 9 * 60), (22 * 60, 2 * 60)  # night spans midnight
    assert in_window(morning, at(6, 0)) and in_window(morning, at(8, 59, 59))
    assert not in_window(morning, at(9, 0)) and not in_window(morning, at(5, 59))
    assert in_window(night, at(23, 0)) and in_window(night, at(1, 59)) and not in_window(night, at(2, 0))
    assert not in_window(None, at(7, 0))
    assert seconds_to_window(morning, at(5, 59)) == 60
    assert seconds_to_window(morning, at(9, 0)) == 21 * 3600  # tomorrow's
    assert seconds_to_window(morning, at(7, 0)) == 0


def test_idle_rule_due_and_next_wait():
    now = 1_000_000
    last = {"never": 0, "busy": now - 10_000, "quiet": now - 300_000, "soon": now - 250_000}
    due, wait = idle_due(last, now, idle_s=300)
    assert sorted(due) == ["never", "quiet"]
    assert wait == 50  # "soon" is idle in 50 s, before "busy"
    assert idle_due({}, now, 300) == ([], None)
    assert idle_due({"a": now}, now, 300) == ([], 300)


def test_nap_until_the_nearest_event_capped():
    schedule = Schedule(parse_times("06:30"), (7 * 60, 9 * 60), 120)
    assert schedule.nap(at(6, 29, 50), at(6, 30), None) == 10  # the fire time
    assert schedule.nap(at(6, 0), at(6, 30), None) == MAX_NAP_S  # never longer: a clock step is noticed
    assert schedule.nap(at(6, 59, 30), None, None) == 30  # the window opens
    assert schedule.nap(at(7, 30), None, 5.0) == 5  # inside: the next model going idle
    assert schedule.nap(at(7, 30), None, None) == MAX_NAP_S  # nothing loaded: idle_s, capped
    assert not Schedule().active and Schedule((1,)).active and Schedule(keep_hot=(1, 2)).active


# --- settings ----------------------------------------------------------------------------------


def test_defaults_schedule_nothing():
    assert not Schedule.from_settings(DEFAULTS.warmup).active
    settings, named = from_environment({"BEDSIDE_WARMUP_TIMES": "06:30", "BEDSIDE_WARMUP_KEEP_HOT": "06:00-09:00"})
    schedule = Schedule.from_settings(settings.warmup)
    assert named == {"warmup.times", "warmup.keep_hot"}
    assert schedule.times == (390,) and schedule.keep_hot == (360, 540) and schedule.idle_s == 300


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"BEDSIDE_WARMUP_TIMES": "6.30"}, "BEDSIDE_WARMUP_TIMES"),
        ({"BEDSIDE_WARMUP_KEEP_HOT": "06:00"}, "BEDSIDE_WARMUP_KEEP_HOT"),
        ({"BEDSIDE_WARMUP_KEEP_HOT": "06:00-06:00"}, "BEDSIDE_WARMUP_KEEP_HOT"),
        ({"BEDSIDE_WARMUP_KEEP_HOT_IDLE_S": "0"}, "BEDSIDE_WARMUP_KEEP_HOT_IDLE_S"),
        ({"BEDSIDE_WARMUP_TIMEOUT_S": "nan"}, "BEDSIDE_WARMUP_TIMEOUT_S"),
        ({"BEDSIDE_WARMUP_MAX_MODELS": "0"}, "BEDSIDE_WARMUP_MAX_MODELS"),
    ],
)
def test_bad_settings_refused_by_name(env, name):
    with pytest.raises(SettingsError, match=name):
        from_environment(env)
    key = name.removeprefix("BEDSIDE_WARMUP_").lower()
    with pytest.raises(SettingsError, match=f"warmup.{key}"):
        Settings().replace({f"warmup.{key}": next(iter(env.values()))})


# --- the exercise ---------------------------------------------------------------------------------


def test_synthesized_request_is_zeros_batch_one():
    meta = ModelMetadata(
        "m", ("1",), "onnx", (TensorMetadata("x", "FP64", (-1, 10)), TensorMetadata("n", "INT8", (2, -1))), ()
    )
    request = synthesize(meta)
    assert not isinstance(request, str)
    assert request.inputs["x"].shape == (1, 10) and request.inputs["x"].dtype.name == "float64"
    assert request.inputs["n"].shape == (2, 1) and not request.inputs["n"].any()
    text = dataclasses.replace(meta, inputs=(TensorMetadata("note", "BYTES", (-1, 1)),))
    assert "BYTES" in synthesize(text)


@pytest.fixture
def repo(demo_repo: Path, tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for name in DEMO:
        shutil.copytree(demo_repo / name, root / name)
    all_types_model(root / "all_types" / "1" / "model.onnx")  # a text input: skipped, with the reason
    return root


@pytest.fixture
def dataplane(repo: Path):
    dp = Dataplane(repo)
    dp.start()
    yield dp
    dp.close()


def counts(dp: Dataplane) -> dict[str, int]:
    return {row.name: row.inference_count for row in dp.statistics(None, None, SYSTEM)}


def test_run_exercises_every_demo_model_and_loads_an_unloaded_one(dataplane):
    asyncio.run(dataplane.unload("diabetes_progression", SYSTEM))
    before = counts(dataplane)
    assert "diabetes_progression" not in before or before["diabetes_progression"] == 0
    results = asyncio.run(warm_up(dataplane, DEFAULTS.warmup))
    by_name = {r.name: r for r in results}
    after = counts(dataplane)
    for name in DEMO:
        assert by_name[name].ok and by_name[name].ms is not None, by_name[name]
        assert after[name] == before.get(name, 0) + 1
    assert by_name["diabetes_progression"].loaded and not by_name["breast_mass_malignancy"].loaded
    assert by_name["all_types"].skipped and "BYTES" in by_name["all_types"].reason
    # counted under a tenant of its own, so the statistics tell warm-up from real traffic
    row = dataplane.statistics("breast_mass_malignancy", None, SYSTEM)[0]
    assert set(row.detail["tenants"]) == {TENANT}


def test_max_models_bounds_a_run(dataplane):
    results = asyncio.run(warm_up(dataplane, dataclasses.replace(DEFAULTS.warmup, max_models=1)))
    assert [r.ok for r in results].count(True) == 1
    beyond = [r.name for r in results if r.reason == "beyond warmup.max_models"]
    assert len(beyond) == len(DEMO) - 1 and all(r.skipped for r in results if not r.ok)


def test_a_model_that_cannot_load_is_a_result_not_an_error(repo, dataplane):
    (repo / "corrupt" / "1").mkdir(parents=True)
    (repo / "corrupt" / "1" / "model.onnx").write_bytes(b"\x08\x07not a graph")
    results = asyncio.run(warm_up(dataplane, DEFAULTS.warmup))
    corrupt = [r for r in results if r.name == "corrupt"]
    assert len(corrupt) == 1 and not corrupt[0].ok and not corrupt[0].skipped
    assert corrupt[0].reason.startswith("load refused: ModelLoadError")
    assert str(repo) not in corrupt[0].reason  # no host paths in what the status may show
    assert sum(r.ok for r in results) == len(DEMO)


def test_an_answer_from_the_response_cache_warms_nothing_and_says_so(tmp_path):
    write_config(tmp_path / "scale", SCALE_CONFIG + "[cache]\nmax_entries = 8\n")
    scale_model(tmp_path / "scale" / "1" / "model.onnx")
    dp = Dataplane(tmp_path)
    dp.start()
    try:
        first = asyncio.run(warm_up(dp, DEFAULTS.warmup))
        second = asyncio.run(warm_up(dp, DEFAULTS.warmup))
    finally:
        dp.close()
    assert first[0].ok
    assert not second[0].ok and second[0].skipped and "response cache" in second[0].reason


class FakeTime:
    """Local wall time and the statistics' clock, moved only by the task's own sleeps."""

    def __init__(self, start: datetime, stop_after_s: float) -> None:
        self.now = start
        self.offset_s = 0.0
        self.naps: list[float] = []
        self.stop_after_s = stop_after_s
        self.epoch_ns = time.time_ns()

    def clock(self) -> datetime:
        return self.now

    def time_ns(self) -> int:
        return self.epoch_ns + int(self.offset_s * 1e9)

    def wall_ms(self) -> int:
        return self.time_ns() // 1_000_000

    async def sleep(self, seconds: float) -> None:
        self.naps.append(seconds)
        self.now += timedelta(seconds=seconds)
        self.offset_s += seconds
        if self.offset_s >= self.stop_after_s:
            raise asyncio.CancelledError


@pytest.fixture
def fake_stats_clock(monkeypatch):
    """The statistics' last_inference_ms on the fake's clock too, so idle time passes with its sleeps."""

    def install(fake: FakeTime) -> None:
        monkeypatch.setattr("bedside.monitoring.latency.time", SimpleNamespace(time_ns=fake.time_ns))

    return install


def drive(dataplane: Dataplane, settings: WarmupSettings, fake: FakeTime) -> WarmupTask:
    task = WarmupTask(dataplane, settings, clock=fake.clock, wall_ms=fake.wall_ms, sleep=fake.sleep)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(task.run())
    return task


def test_the_task_fires_at_the_scheduled_time(dataplane, fake_stats_clock):
    asyncio.run(dataplane.unload("vitals_deterioration", SYSTEM))
    fake = FakeTime(at(6, 28, 30), stop_after_s=10 * 60)
    fake_stats_clock(fake)
    task = drive(dataplane, dataclasses.replace(DEFAULTS.warmup, times="06:30,18:30"), fake)
    assert fake.naps[:2] == [60, 30]  # capped at a minute, then exactly to 06:30
    assert task.counters.scheduled_runs == 1 and task.counters.keep_hot_runs == 0
    assert task.counters.exercised == len(DEMO) and task.counters.loaded == 1 and task.counters.skipped == 1
    assert counts(dataplane)["vitals_deterioration"] == 1


def test_keep_hot_exercises_only_idle_models_inside_the_window(dataplane, fake_stats_clock):
    settings = dataclasses.replace(DEFAULTS.warmup, keep_hot="07:00-07:10", keep_hot_idle_s=120)
    fake = FakeTime(at(6, 59), stop_after_s=15 * 60)
    fake_stats_clock(fake)
    busy = "breast_mass_malignancy"
    request = synthesize(dataplane.model_metadata(busy, None, SYSTEM))
    assert not isinstance(request, str)

    real_sleep = fake.sleep

    async def sleep_with_traffic(seconds: float) -> None:
        # a real request before every nap (at most a minute) keeps one model busy: the warm-up leaves it alone
        await dataplane.infer(busy, None, request)
        await real_sleep(seconds)

    fake.sleep = sleep_with_traffic  # type: ignore[method-assign]
    before = counts(dataplane)
    task = drive(dataplane, settings, fake)
    runs = task.counters.keep_hot_runs
    # inside 07:00-07:10, idle 120 s: on opening, then at 07:02, 07:04, 07:06, 07:08; none after 07:10
    assert runs == 5, runs
    after = counts(dataplane)
    traffic = len(fake.naps)
    assert after[busy] - before[busy] == traffic  # only the "real" traffic: never idle, never warmed
    assert after["diabetes_progression"] - before["diabetes_progression"] == runs
    assert all(r.name != busy for r in task.counters.last)
    assert task.counters.failed == 0


def test_nothing_scheduled_starts_no_task(dataplane):
    async def main() -> None:
        assert start_warmup(dataplane, DEFAULTS.warmup) is None
        task = start_warmup(dataplane, dataclasses.replace(DEFAULTS.warmup, keep_hot="00:00-23:59"))
        assert task is not None
        await task.stop()  # cancels cleanly, whatever it was doing

    asyncio.run(main())
