"""The update agent: one pass (`check`) reads the signed rollout plan and brings each model this box
is in the rollout for to its version; `watch` judges a new version that has taken traffic and keeps
it or rolls it back. `bedside serve` runs both in a thread; `bedside update` runs one pass.

One version of a model changes at a time: download (delta or full, verified) -> install beside the
serving version (atomic) -> load without traffic -> golden outputs and latency -> switch (state file,
then the scheduler's pin) -> watch (error rate, latency) -> keep, or roll back (state file, pin,
retire) with the reason kept, so the refused version is not tried again. Every step is audited.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bedside.dataplane.lifecycle import Lifecycle
from bedside.protocol.types import Caller
from bedside.repository.manager import State
from bedside.repository.serving import ServingState, read_state, write_state
from bedside.repository.store import ModelStore
from bedside.security.audit import AuditLog
from bedside.security.keys import KeyRing
from bedside.settings import UpdateSettings, parse_window
from bedside.updates import install
from bedside.updates.fetch import RateLimit
from bedside.updates.golden import GoldenError, GoldenResult, check_golden, check_offline, parse_golden
from bedside.updates.outcome import Outcome
from bedside.updates.reports import Reporter
from bedside.updates.rollout import ModelRollout, check_name
from bedside.updates.source import Fetched, UpdateRefused, UpdateSource, describe

log = logging.getLogger("bedside.updates")
AGENT = Caller("update-agent", roles=frozenset({"admin"}), authenticated=True)  # an admin caller, audited as one


@dataclass
class _Watched:
    bound_ms: float
    since: float = field(default_factory=time.time)


class UpdateAgent:
    def __init__(
        self,
        settings: UpdateSettings,
        state: Path,
        repository: Path,
        *,
        keys: KeyRing | None = None,
        audit: AuditLog | None = None,
        lifecycle: Lifecycle | None = None,
        clock: Callable[[], float] = time.time,
        checkpoint: install.Checkpoint | None = None,
    ) -> None:
        self.settings = settings
        self.state = state
        self.repository = repository
        self.store = ModelStore(repository, keys)
        self.keys, self.audit, self.lifecycle, self.clock = keys, audit, lifecycle, clock
        self.checkpoint = checkpoint or (lambda step: None)
        self.state.mkdir(parents=True, exist_ok=True)
        self.device_id = self._device_id()
        self.groups = frozenset(g.strip() for g in settings.groups.split(",") if g.strip())
        self.window = parse_window(settings.window)
        trusted = Path(settings.root).expanduser() if settings.root else None
        rate = RateLimit(settings.rate_kb_s << 10)
        self.source = UpdateSource(
            settings.url, state, trusted, rate, settings.timeout_s, settings.max_download_mb << 20
        )
        self.reporter = Reporter(
            settings.report_url, self.device_id, self.groups, self.source.fetcher.pool, settings.timeout_s
        )
        self._watched: dict[str, _Watched] = {}
        self._said: dict[str, tuple[str, int | None, str]] = {}
        self._resume_checked = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        install.recover(repository)

    def _device_id(self) -> str:
        if self.settings.device_id:
            return check_name("device id", self.settings.device_id, 64)
        path = self.state / "device_id"
        if not path.exists():
            path.write_text(f"box-{secrets.token_hex(8)}\n")
        return path.read_text().strip()

    # -- one pass --------------------------------------------------------------------------------------

    def check(self) -> list[Outcome]:
        self.source.clean()
        try:
            plan = self.source.refresh()
        except UpdateRefused as exc:
            self._audit("update-check", "", None, "refused", exc.message)
            self.reporter.send([Outcome("*", "refused", reason=exc.message)], self._states())
            return [Outcome("*", "refused", reason=exc.message)]
        self._audit("update-check", "", None, "ok", "")
        outcomes = [self._update(name, rollout) for name, rollout in sorted((plan.models if plan else {}).items())]
        self.reporter.send(outcomes, self._states())
        return outcomes

    def _update(self, name: str, rollout: ModelRollout) -> Outcome:
        folder = self.repository / name
        state = read_state(folder) if folder.is_dir() else None
        serving = self._serving(name, state)
        wanted = rollout.version
        skip = self._skip(name, rollout, state, serving)
        if skip is not None:
            return skip
        try:
            fetched = self.source.fetch_version(name, wanted, serving, self._installed(name, serving))
        except UpdateRefused as exc:
            self._audit("update-download", name, wanted, "refused", exc.message)
            return Outcome(name, "refused", wanted, serving, exc.message)
        detail = "delta" if fetched.delta_used else "full"
        self._audit("update-download", name, wanted, "ok", f"{detail}, {fetched.bytes_downloaded} bytes")
        if fetched.delta_refused:
            self._audit("update-delta", name, wanted, "refused", fetched.delta_refused)
        try:
            outcome = (self._replace if folder.is_dir() else self._add)(name, wanted, serving, fetched)
        except (UpdateRefused, install.InstallError, GoldenError) as exc:
            self._audit("update-install", name, wanted, "refused", exc.args[0] if exc.args else str(exc))
            outcome = Outcome(name, "refused", wanted, serving, str(exc.args[0] if exc.args else exc))
        except OSError as exc:  # a full disk, a read-only repository: nothing switched
            why = f"install failed ({exc.strerror or type(exc).__name__})"
            self._audit("update-install", name, wanted, "failed", why)
            outcome = Outcome(name, "refused", wanted, serving, why)
        self.source.forget()  # installed or refused: an interrupted download of it is no use now
        outcome.downloaded, outcome.delta = fetched.bytes_downloaded, fetched.delta_used
        outcome.delta_refused = fetched.delta_refused
        return outcome

    def _skip(
        self, name: str, rollout: ModelRollout, state: ServingState | None, serving: int | None
    ) -> Outcome | None:
        wanted = rollout.version
        if rollout.halted:
            return Outcome(name, "halted", wanted, serving, rollout.halted)
        if rollout.paused:
            return Outcome(name, "paused", wanted, serving)
        if not rollout.admits(self.device_id, self.groups):
            return Outcome(name, "not-eligible", wanted, serving)
        if serving == wanted:
            return Outcome(name, "watching" if name in self._watched else "up-to-date", wanted, serving)
        if state is not None and str(wanted) in state.refused:
            return Outcome(name, "refused", wanted, serving, f"refused before: {state.refused[str(wanted)]}")
        if state is not None and state.phase == "watching":
            return Outcome(name, "busy", wanted, serving, f"v{state.version} is still under watch")
        if not rollout.urgent and not self.in_window():
            self._audit("update-deferred", name, wanted, "deferred", f"outside the window {self.settings.window}")
            return Outcome(name, "deferred", wanted, serving, f"outside the maintenance window {self.settings.window}")
        return None

    def in_window(self, now: datetime | None = None) -> bool:
        if self.window is None:
            return True
        now = now or datetime.fromtimestamp(self.clock())
        minute, (start, end) = now.hour * 60 + now.minute, self.window
        return start <= minute < end if start < end else minute >= start or minute < end

    def _serving(self, name: str, state: ServingState | None) -> int | None:
        if state is not None:
            return state.version
        ready = self.lifecycle.ready_versions(name) if self.lifecycle is not None else []
        if ready:
            return ready[-1]
        try:
            versions = self.store.versions(name)
        except Exception:
            return None
        return versions[-1] if versions else None

    def _installed(self, name: str, version: int | None) -> bytes | None:
        return None if version is None else install.installed_model(self.store, name, version)

    # -- install, check, switch ------------------------------------------------------------------------

    def _replace(self, name: str, version: int, serving: int | None, fetched: Fetched) -> Outcome:
        folder = self.repository / name
        golden = parse_golden(fetched.files["golden.json"])
        if serving is None:
            raise UpdateRefused(f"{name} has no version that serves to fall back on; not replaced")
        state = install.adopt(folder, serving)
        self.checkpoint("adopted")
        install.write_version(folder, version, fetched.files, self.keys, self.checkpoint)
        self._audit("update-install", name, version, "ok", f"beside v{serving}")
        status = None
        if self.lifecycle is None:
            result = check_offline(fetched.files["model.onnx"], golden, self.settings.max_latency_ms)
        else:
            status = self.lifecycle.stage(name, version, AGENT)
            if status.state is not State.READY or status.model is None:
                return self._refuse(name, version, state, f"does not load: {status.reason}", None)
            result = check_golden(status.model.run, golden, self.settings.max_latency_ms)
        self._audit("update-golden", name, version, "ok" if result.passed else "refused", result.reason)
        if not result.passed:
            return self._refuse(name, version, state, f"golden check failed: {result.reason}", result)
        watching = self.lifecycle is not None and self.settings.watch_s > 0
        new = ServingState(
            version=version,
            previous=serving,
            phase="watching" if watching else "serving",
            watch_until=self.clock() + self.settings.watch_s if watching else 0.0,
            refused=state.refused,
            changed_at=self.clock(),
        )
        write_state(folder, new)
        self.checkpoint("switched")
        if self.lifecycle is not None and status is not None:
            self.lifecycle.promote(name, status, AGENT)
            if watching:
                self._watched[name] = _Watched(result.latency_bound_ms)
            else:
                self.lifecycle.retire(name, serving, f"replaced by v{version}", AGENT)
        self._audit("update-switch", name, version, "ok", f"from v{serving}" + (", under watch" if watching else ""))
        if not watching:
            self._prune(name, new)
        return Outcome(name, "watching" if watching else "installed", version, version, "", result.summary())

    def _add(self, name: str, version: int, serving: int | None, fetched: Fetched) -> Outcome:
        """A model this box does not have: assembled and checked under a hidden name, then renamed in."""
        if "config.toml" not in fetched.files:
            raise UpdateRefused(f"{name} is new on this box and v{version} ships no config.toml")
        golden = parse_golden(fetched.files["golden.json"])
        folder = install.new_model_folder(self.repository, name, fetched.files["config.toml"])
        try:
            install.write_version(folder, version, fetched.files, self.keys, self.checkpoint)
            result = check_offline(fetched.files["model.onnx"], golden, self.settings.max_latency_ms)
            self._audit("update-golden", name, version, "ok" if result.passed else "refused", result.reason)
            if not result.passed:
                raise UpdateRefused(f"golden check failed: {result.reason}")
            install.place_new_model(folder, self.repository, name, version, self.checkpoint)
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # gone already when it was renamed in
        if self.lifecycle is not None:
            self.lifecycle.load(name, AGENT)
        self._audit("update-switch", name, version, "ok", "new model")
        return Outcome(name, "installed", version, version, "", result.summary())

    def _refuse(
        self, name: str, version: int, state: ServingState, reason: str, result: GoldenResult | None
    ) -> Outcome:
        state.refuse(version, reason)
        write_state(self.repository / name, state)
        install.discard_version(self.repository / name, version)  # never served; frees the disk
        if self.lifecycle is not None:
            self.lifecycle.retire(name, version, reason, AGENT)
        self._audit("update-refused", name, version, "refused", reason)
        return Outcome(name, "refused", version, state.version, reason, result.summary() if result else None)

    # -- watch -----------------------------------------------------------------------------------------

    def watch(self) -> list[Outcome]:
        """Judge every version under watch: roll back on errors or latency, keep it when the watch ends."""
        out = []
        for name in list(self._watched) + [n for n in self._resumed() if n not in self._watched]:
            state = read_state(self.repository / name)
            if state is None or state.phase != "watching" or state.previous is None:
                self._watched.pop(name, None)
                continue
            watched = self._watched.setdefault(name, _Watched(self._bound(name, state.version)))
            verdict = self._judge(name, state, watched)
            if verdict is not None:
                out.append(verdict)
        return out

    def _resumed(self) -> list[str]:
        """Models a restart found under watch (their state file says so): looked for once, at the
        first watch; later watches start in this process and are in `_watched`."""
        if self.lifecycle is None or self._resume_checked:
            return []
        self._resume_checked = True
        return [n for n in self.lifecycle.names() if (s := read_state(self.repository / n)) and s.phase == "watching"]

    def _bound(self, name: str, version: int) -> float:
        try:
            golden = parse_golden((self.repository / name / str(version) / "golden.json").read_bytes())
            return float(golden.get("latency_ms", self.settings.max_latency_ms))
        except (OSError, GoldenError):
            return self.settings.max_latency_ms

    def _judge(self, name: str, state: ServingState, watched: _Watched) -> Outcome | None:
        assert self.lifecycle is not None and state.previous is not None
        stats = self.lifecycle.stats(name, state.version)
        reason = ""
        if stats is not None:
            # a NaN or infinite answer is refused to the caller (NonFiniteOutput): a wrong answer, so an error here
            errors = stats.failures + stats.rejected.get("NonFiniteOutput", 0)
            total = errors + stats.request.count
            if total >= self.settings.watch_min_requests:
                rate = errors / total
                p99 = stats.request.summary().get("p99_ms") or 0.0
                if rate > self.settings.watch_max_error_rate:
                    reason = f"error rate {rate:.1%} over {total} requests under watch"
                elif p99 > watched.bound_ms:
                    reason = f"p99 latency {p99:.3f} ms under watch is over the bound {watched.bound_ms:g} ms"
        if reason:
            return self.rollback(name, reason)
        if self.clock() < state.watch_until:
            return None
        kept = ServingState(state.version, state.previous, "serving", 0.0, state.refused, self.clock())
        write_state(self.repository / name, kept)
        self.lifecycle.retire(name, state.previous, f"replaced by v{state.version}", AGENT)
        self._watched.pop(name, None)
        self._audit("update-keep", name, state.version, "ok", f"watched, v{state.previous} retired")
        self._prune(name, kept)
        outcome = Outcome(name, "kept", state.version, state.version)
        self.reporter.send([outcome], self._states())
        return outcome

    def _prune(self, name: str, state: ServingState) -> None:
        """Keep updates.keep_versions versions on disk: the serving one and the newest before it."""
        keep = self.settings.keep_versions
        older = [v for v in self.store.versions(name) if v < state.version]
        for version in older[: max(0, len(older) - (keep - 1))]:
            install.discard_version(self.repository / name, version)
            self._audit("update-prune", name, version, "ok", f"beyond updates.keep_versions={keep}")

    def rollback(self, name: str, reason: str) -> Outcome:
        """Back to the version before: the state file first, then traffic, then the new one retired."""
        folder = self.repository / name
        state = read_state(folder)
        if state is None or state.previous is None:
            return Outcome(name, "refused", None, None, "nothing to roll back to")
        bad, good = state.version, state.previous
        back = ServingState(good, None, "serving", 0.0, state.refused, self.clock())
        back.refuse(bad, reason)
        write_state(folder, back)
        self.checkpoint("rolled back")
        if self.lifecycle is not None:
            self.lifecycle.pin(name, good, AGENT)
            self.lifecycle.retire(name, bad, f"rolled back: {reason}", AGENT)
        install.discard_version(folder, bad)  # refused for good: frees the disk, as a failed check does
        self._watched.pop(name, None)
        self._audit("update-rollback", name, bad, "rolled-back", f"to v{good}: {reason}")
        log.warning("%s v%d rolled back to v%d: %s", name, bad, good, reason)
        outcome = Outcome(name, "rolled-back", bad, good, reason)
        self.reporter.send([outcome], self._states())
        return outcome

    # -- the thread inside `bedside serve` -----------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bedside-update-agent", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        next_check = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + self.settings.poll_s
                    for outcome in self.check():
                        said = (outcome.action, outcome.version, outcome.reason)
                        if said != self._said.get(outcome.model) and outcome.action not in (
                            "up-to-date",
                            "not-eligible",
                        ):
                            log.info(
                                "update %s v%s: %s %s", outcome.model, outcome.version, outcome.action, outcome.reason
                            )
                        self._said[outcome.model] = said  # a paused rollout is said once, not every poll
                self.watch()
            except Exception as exc:  # the agent must never take the server down; the next pass retries
                log.error("update agent pass failed: %s", describe(exc))
            self._stop.wait(1.0)

    # -- records ----------------------------------------------------------------------------------------

    def _states(self) -> dict[str, Any]:
        out = {}
        for name in self.store.names():
            state = read_state(self.repository / name)
            if state is not None:
                out[name] = asdict(state)
                stats = self.lifecycle.stats(name, state.version) if self.lifecycle is not None else None
                if stats is not None:  # live figures of the serving version: counts and latency, no data
                    live = stats.request.summary()
                    out[name]["live"] = {"requests": live["count"], "failures": stats.failures,
                                         "p50_ms": live["p50_ms"], "p99_ms": live["p99_ms"]}  # fmt: skip
        return out

    def _audit(self, kind: str, model: str, version: int | None, outcome: str, detail: str) -> None:
        if self.audit is not None:
            self.audit.record(kind, AGENT.name, "", "update", model, "" if version is None else str(version),
                              "", outcome, 0, detail)  # fmt: skip
