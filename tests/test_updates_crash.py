"""Crash test of the model update: a real SIGKILL of the update agent at every install step and at random
instants, then a restart; the box must serve exactly the old version or the new one, never a part of
one, and the next pass of the agent must finish the update.

Every trial runs in processes forked from this one (multiprocessing, 'fork'), against one loopback
update repository served by a separate process:

1. the box's folder (models/ and the agent's state/) is copied from a prepared template;
2. a child process updates it from v1 (y = 2x) to v2 (y = 3x), as `bedside update` does (an
   UpdateAgent without a server), or inside a running server (a Dataplane and its lifecycle), and is
   killed with SIGKILL: by its own `checkpoint(step)` callback at a chosen step, or by this process
   after a seeded random delay, counted from the start of the run, of the install (its first write
   to the repository) or of the switch (the write of serving.json, or the rename of a new model into
   place), within that span's duration measured without a kill;
3. a second child is the restarted box: `install.recover()`, then a fresh Dataplane loads the
   repository as a restarted server does. The model must be READY; an unversioned inference must
   answer 2.0 (v1) or 3.0 (v2) for x = 1; the file of the version that answered must hash to exactly
   the box's v1 or the published v2; no `.incoming-*` folder may remain; serving.json, when present,
   must parse and name the version that serves; every version folder on disk must hold exactly its
   version's files. Then the agent runs once more (in that process) and the box must reach v2, which
   another fresh Dataplane load confirms.

The templates vary what the crashed run finds: v1 installed by the agent (serving.json pins it) or
placed by hand (no serving.json: `adopt` writes it; its bytes differ from the published v1, so the
published delta does not apply and the full model is downloaded), every download done and verified
but its `.part` not dropped yet, or the model's download cut halfway (continued with a Range request),
and a box without the model at all (the agent's `_add` path: the old state is "no model"). Beside the
install, a version refused by its golden check and one rolled back are removed; a kill during that
removal is tested too (the folder is renamed away first, so nothing partial stays). The models carry a
block of weights (`payload_kb`), so writes and fsyncs take a measurable time and a kill can land in the
middle of one.

bench/update_crash.py runs the same lab for hundreds of kills and writes the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bedside.dataplane import Dataplane
from bedside.protocol.types import InferRequest
from bedside.repository.serving import SERVING_FILE, ServingState
from bedside.repository.store import MODEL_FILE
from bedside.settings import DEFAULTS, UpdateSettings
from bedside.updates import agent as agent_module
from bedside.updates import install
from bedside.updates.agent import UpdateAgent
from bedside.updates.publisher import Publisher
from bedside.updates.rollout import ModelRollout, parse_stages
from tests.fleet import golden_for
from tests.models import SCALE_CONFIG

NAME = "scale"
OLD, NEW = 2.0, 3.0  # y for x = 1: v1 doubles, v2 triples
# The checkpoints of install.py and agent.py, in the order a run passes them.
REPLACE_STEPS = (
    "adopted",
    "staging created",
    "model written",
    "files written",
    "files synced",
    "version renamed",
    "version durable",
    "switched",
)
ADD_STEPS = (
    "staging created",
    "model written",
    "files written",
    "files synced",
    "version renamed",
    "version durable",
    "state written",
    "model synced",
    "model renamed",
)
REMOVING = "removing the refused version, files deleted:"  # + a count: the kill inside shutil.rmtree
AFTER = ("run", "install", "switch")  # what a random delay is counted from
CHILD_TIMEOUT_S = 60.0  # a child that takes longer is hung: killed and reported
_FORK = multiprocessing.get_context("fork")


@dataclass(frozen=True)
class Scenario:
    name: str
    template: str  # agent | agent-warm | hand | hand-half | empty (see CrashLab._templates)
    server: bool = False  # inside a server (Dataplane + lifecycle) rather than `bedside update`
    watch_s: float = 0.0  # in a server: the new version is watched (phase "watching") after the switch
    rollback: bool = False  # after the pass, the agent rolls the new version back (v2 ends refused)

    @property
    def steps(self) -> tuple[str, ...]:
        return ADD_STEPS if self.template == "empty" else REPLACE_STEPS


SCENARIOS = (
    Scenario("update, v1 by the agent", "agent"),
    Scenario("update, downloads done before", "agent-warm"),
    Scenario("update, v1 placed by hand", "hand"),
    Scenario("update, half-downloaded model", "hand-half"),
    Scenario("update, model new on the box", "empty"),
    Scenario("server", "agent", server=True),
    Scenario("server, watched, v1 by hand", "hand", server=True, watch_s=3600.0),
)


@dataclass
class Kill:
    """How a trial's update run is killed: at a checkpoint, or `delay_s` after the start of the run
    (`after="run"`), of the install (`"install"`: its first write to the repository) or of the switch
    (`"switch"`: the write of serving.json that puts the new version on the air); neither: not killed."""

    scenario: Scenario
    step: str | None = None
    delay_s: float | None = None
    after: str = "run"

    @property
    def kind(self) -> str:
        if self.step is not None:
            return "step"
        return "none" if self.delay_s is None else f"random-{self.after}"


@dataclass
class Timing:
    """An update run without a kill: the checkpoints it passed, and how long it took."""

    steps: list[str]
    run_s: float  # from the start of the child to its exit
    install_s: float  # from the start of the install to the end of the run
    switch_s: float  # from the start of the switch to the end of the run

    def span(self, after: str) -> float:
        """The window a random kill `after` the start of run, install or switch is drawn in."""
        return {"run": self.run_s, "install": self.install_s, "switch": self.switch_s}[after]


@dataclass
class Trial:
    scenario: str
    kind: str  # step | random-run | random-install | none
    step: str | None
    delay_s: float | None
    killed: bool
    reached: str  # the last checkpoint the run passed before it died (or "start", "install", "switch" began)
    served: str  # old | new | partial
    problems: list[str] = field(default_factory=list)  # at the restart: anything here is a partial version
    completed: bool = False
    after: list[str] = field(default_factory=list)  # why the update did not complete after the restart
    outcome: str = ""  # the second run's action
    removed: int = 0  # hidden folders install.recover() removed
    leftover_parts: int = 0  # .part files in the staging folder once the update completed
    update_s: float = 0.0
    restart_s: float = 0.0
    total_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.served in ("old", "new") and not self.problems and self.completed


# --- models ---------------------------------------------------------------------------------------


def payload_model(factor: float, payload_kb: int, doc: str = "") -> bytes:
    """y = x * factor, x: FP32 [batch, 4], carrying `payload_kb` KiB of weights that take part in the
    graph (sum(w) * 0 is added), so that the file has a model's size and loads without a warning."""
    rng = np.random.default_rng(0)
    weights = rng.standard_normal(max(1, payload_kb * 256)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    inits = [
        helper.make_tensor("k", TensorProto.FLOAT, [], [factor]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        onnx.numpy_helper.from_array(weights, "w"),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "k"], ["scaled"]),
        helper.make_node("ReduceSum", ["w"], ["total"], keepdims=1),
        helper.make_node("Mul", ["total", "zero"], ["nothing"]),
        helper.make_node("Add", ["scaled", "nothing"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "scale", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], doc_string=doc)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- child processes ------------------------------------------------------------------------------


def _child(target: Callable[..., Any], conn: Connection, args: tuple[Any, ...]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it ends the children
    try:
        conn.send(("done", target(conn, *args)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def spawn(target: Callable[..., Any], *args: Any) -> tuple[Any, Connection]:
    """A forked child running target(conn, *args); what it returns or raises comes back on `conn`."""
    reader, writer = _FORK.Pipe(duplex=False)
    proc = _FORK.Process(target=_child, args=(target, writer, args), daemon=True)
    proc.start()
    writer.close()
    return proc, reader


def drain(conn: Connection, timeout: float = CHILD_TIMEOUT_S) -> list[tuple[Any, ...]]:
    """Every message a child sent, up to its end (a child killed mid-message ends the list; one that
    sends nothing for `timeout` s is hung, and finish() kills it)."""
    out = []
    with contextlib.suppress(Exception):  # EOFError at the end; a message cut short by the kill does not load
        while conn.poll(timeout):
            out.append(conn.recv())
    conn.close()
    return out


def finish(proc: Any, timeout: float = CHILD_TIMEOUT_S) -> int:
    proc.join(timeout)
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        return -999  # hung
    return proc.exitcode


def update_run(
    conn: Connection, box: Path, settings: UpdateSettings, server: bool, kill_step: str | None, rollback: bool = False
) -> dict:
    """The crashed process: one pass of the agent, telling the parent where it is as it goes."""

    def checkpoint(step: str) -> None:
        conn.send(("step", step, time.monotonic()))
        if step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def announced(what: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def begins(*args: Any, **kwargs: Any) -> Any:
            conn.send((what, time.monotonic()))
            return fn(*args, **kwargs)

        return begins

    # this process only: the install's first write to the repository and the switch (the agent's
    # write of serving.json, or the rename of a new model into place) tell the parent they begin
    install.adopt = announced("install", install.adopt)
    install.new_model_folder = announced("install", install.new_model_folder)
    install.place_new_model = announced("switch", install.place_new_model)
    agent_module.write_state = announced("switch", agent_module.write_state)
    if kill_step is not None and kill_step.startswith(REMOVING):
        # no checkpoint inside the removal of a refused version: killed after `n` of its files went
        n, rmtree = int(kill_step.rsplit(" ", 1)[1]), shutil.rmtree

        def cut_short(path: Any, *args: Any, **kwargs: Any) -> Any:
            folder = Path(path)
            if folder.parent.parent == box / "models" and (folder.name.isdigit() or "-discarded-" in folder.name):
                for file in sorted(folder.iterdir())[:n]:
                    file.unlink()
                checkpoint(kill_step)
            return rmtree(path, *args, **kwargs)

        shutil.rmtree = cut_short  # type: ignore[assignment]
    dataplane = None
    if server:
        dataplane = Dataplane(box / "models")
        dataplane.start()
    agent = UpdateAgent(
        settings,
        box / "state",
        box / "models",
        lifecycle=dataplane.lifecycle if dataplane else None,
        checkpoint=checkpoint,
    )
    outcomes = agent.check()
    if rollback:
        outcomes.append(agent.rollback(NAME, "rolled back by the crash test"))
    if dataplane is not None:
        dataplane.close()
    return {"outcomes": [dataclasses.asdict(o) for o in outcomes], "end": time.monotonic()}


def answer(dataplane: Dataplane) -> tuple[str, float, list[float]]:
    """(version that answered, y[0, 0], all of y) for an unversioned request with x = 1."""
    request = InferRequest({"x": np.ones((1, 4), np.float32)})
    response = asyncio.run(dataplane.infer(NAME, None, request))
    y = np.asarray(response.outputs["y"], dtype=np.float64).ravel().tolist()
    return str(response.model_version), y[0], y


# --- the lab --------------------------------------------------------------------------------------


class CrashLab:
    """An update repository (v1 and v2 of `scale`, a delta between them) served by a child process,
    box templates, and trials: copy a template, update it in a child, kill it, restart, check."""

    def __init__(
        self,
        root: Path,
        payload_kb: int = 256,
        popen: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen,
        refused: bool = False,
    ) -> None:
        """`refused`: v2 ships the golden outputs of another model, so its golden check fails and the
        box must stay at v1, with v2 refused and removed."""
        self.root = root
        self.payload_kb = payload_kb
        self.refused = refused
        self.server: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.config = SCALE_CONFIG.encode()
        self.models = {1: payload_model(OLD, payload_kb), 2: payload_model(NEW, payload_kb)}
        self.hand_v1 = payload_model(OLD, payload_kb, doc="placed by hand")  # same answers, other bytes
        self.files: dict[int, dict[str, bytes]] = {}
        for version, model in self.models.items():
            self.files[version] = {
                MODEL_FILE: model,
                "golden.json": golden_for(payload_model(5.0, payload_kb) if refused and version == 2 else model),
                "MODEL_CARD.md": f"# {NAME} v{version}\nSYNTHETIC test model.\n".encode(),
                install.SHIPPED_CONFIG: self.config,
            }
        self.publisher = Publisher(root / "pub" / "repo", root / "pub" / "keys")
        self.publisher.init()
        self._publish(1)
        self._start_server(popen)
        self.templates = root / "templates"
        self.expected: dict[str, dict[int, dict[str, bytes]]] = {}  # template -> version -> its folder's files
        try:
            self._templates()
        except BaseException:
            self.close()
            raise

    # -- set up --

    def _publish(self, version: int) -> None:
        shipped = self.files[version]
        files = {
            "model.onnx": shipped[MODEL_FILE],
            "config.toml": self.config,
            "golden.json": shipped["golden.json"],
            "MODEL_CARD.md": shipped["MODEL_CARD.md"],
        }
        assert self.publisher.add_version(NAME, files) == version
        plan = self.publisher.plan()
        plan.models[NAME] = ModelRollout(version, parse_stages("100"), urgent=True)
        self.publisher.set_plan(plan)

    def _start_server(self, popen: Callable[..., subprocess.Popen[bytes]]) -> None:
        code = (
            "import sys\nfrom pathlib import Path\nfrom bedside.updates.reports import serve_repository\n"
            "s = serve_repository(Path(sys.argv[1]), Path(sys.argv[2]), '127.0.0.1', 0)\n"
            "print(s.server_address[1], flush=True)\ns.serve_forever()\n"
        )
        pub = self.root / "pub"
        self.server = popen(
            [sys.executable, "-c", code, str(pub / "repo"), str(pub / "reports")],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert self.server.stdout is not None
        line = self.server.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"the update repository server did not start (exit {self.server.poll()})")
        self.url = f"http://127.0.0.1:{int(line)}"

    def settings(self, scenario: Scenario | None = None) -> UpdateSettings:
        trusted = self.root / "pub" / "repo" / "metadata" / "1.root.json"
        watch = scenario.watch_s if scenario else 0.0
        return dataclasses.replace(DEFAULTS.updates, url=self.url, root=str(trusted), watch_s=watch, poll_s=1.0)

    def _run_update(self, box: Path) -> dict:
        proc, conn = spawn(update_run, box, self.settings(), False, None)
        messages = drain(conn)
        code = finish(proc)
        done = [m[1] for m in messages if m[0] == "done"]
        errors = [m[1] for m in messages if m[0] == "error"]
        if errors:
            raise RuntimeError(f"update run failed:\n{errors[0]}")
        if code != 0 or not done:
            raise RuntimeError(f"update run failed (exit {code})")
        return done[0]

    def _templates(self) -> None:
        t = self.templates
        agent_v1 = {1: dict(self.files[1])}
        hand_v1 = {1: {MODEL_FILE: self.hand_v1}}
        # agent: v1 installed by the agent itself (a model new on the box), serving.json pins it
        (t / "agent" / "models").mkdir(parents=True)
        (t / "agent" / "state").mkdir()
        result = self._run_update(t / "agent")
        assert [o["action"] for o in result["outcomes"]] == ["installed"], result
        assert self._folder_files(t / "agent" / "models" / NAME / "1") == agent_v1[1]
        self.expected["agent"] = agent_v1
        self._publish(2)  # from here on the plan wants v2 (a delta from v1 is published beside it)
        # agent-warm: every v2 download done and verified, the run cut before it dropped their parts
        shutil.copytree(t / "agent", t / "agent-warm")
        for digest, data in self._targets(2).items():
            (t / "agent-warm" / "state" / "staging" / f"{digest}.part").write_bytes(data)
        self.expected["agent-warm"] = agent_v1
        # hand: v1 put there by hand, no serving.json, no agent state yet
        (t / "hand" / "models" / NAME / "1").mkdir(parents=True)
        (t / "hand" / "models" / NAME / "config.toml").write_bytes(self.config)
        (t / "hand" / "models" / NAME / "1" / MODEL_FILE).write_bytes(self.hand_v1)
        (t / "hand" / "state").mkdir()
        self.expected["hand"] = hand_v1
        # hand-half: hand, with the full v2 model's download cut off halfway (the delta does not apply to
        # this v1, so the run continues it with a Range request)
        shutil.copytree(t / "hand", t / "hand-half")
        (t / "hand-half" / "state" / "staging").mkdir()
        v2 = self.models[2]
        (t / "hand-half" / "state" / "staging" / f"{sha(v2)}.part").write_bytes(v2[: len(v2) // 2])
        self.expected["hand-half"] = hand_v1
        # empty: a box without the model
        (t / "empty" / "models").mkdir(parents=True)
        (t / "empty" / "state").mkdir()
        self.expected["empty"] = {}

    def _targets(self, version: int) -> dict[str, bytes]:
        """Every file published for `version` (the delta too), by SHA-256, as the repository stores them."""
        prefix = f"models/{NAME}/{version}/"
        out = {}
        for path, info in self.publisher.targets().targets.items():
            if path.startswith(prefix):
                digest = info.hashes["sha256"]
                stored = self.publisher.files / prefix / f"{digest}.{path.rpartition('/')[2]}"
                out[digest] = stored.read_bytes()
        assert len(out) >= 4, out.keys()
        return out

    def close(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(10)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        self.server = None

    def __enter__(self) -> CrashLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- a run without a kill --

    def calibrate(self, scenario: Scenario, runs: int = 1) -> Timing:
        """Run the update `runs` times without a kill (each checked like a trial): the steps it
        passes, and the shortest run, install and switch (the windows random kills are drawn in)."""
        steps: list[str] = []
        run_s, install_s, switch_s = [], [], []
        for _ in range(runs):
            trial, messages = self._trial(Kill(scenario))
            if not trial.ok or trial.served != "new" or trial.killed:
                raise AssertionError(f"an update without a kill did not end at v2: {trial}")
            begun = [m[1] for m in messages if m[0] == "install"]
            switched = [m[1] for m in messages if m[0] == "switch"]
            end = next(m[1]["end"] for m in messages if m[0] == "done")
            steps = [m[1] for m in messages if m[0] == "step"]
            run_s.append(trial.update_s)
            install_s.append(end - begun[0])
            switch_s.append(end - switched[-1])
        return Timing(steps, min(run_s), min(install_s), min(switch_s))

    # -- trials --

    def trial(self, kill: Kill) -> Trial:
        return self._trial(kill)[0]

    def _trial(self, kill: Kill) -> tuple[Trial, list[tuple[Any, ...]]]:
        scenario = kill.scenario
        box = self.root / "box"
        if box.exists():
            shutil.rmtree(box)
        shutil.copytree(self.templates / scenario.template, box)
        started = time.monotonic()
        proc, conn = spawn(update_run, box, self.settings(scenario), scenario.server, kill.step, scenario.rollback)
        messages: list[tuple[Any, ...]] = []
        if kill.delay_s is not None:
            if kill.after != "run":  # wait for the install's or the switch's first write, then the delay
                while True:
                    if not conn.poll(CHILD_TIMEOUT_S):
                        break
                    try:
                        message = conn.recv()
                    except (EOFError, OSError):
                        break
                    messages.append(message)
                    if message[0] == kill.after:
                        break
            time.sleep(max(0.0, kill.delay_s - (time.monotonic() - started if kill.after == "run" else 0.0)))
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
        messages += drain(conn)
        code = finish(proc)
        update_s = time.monotonic() - started
        killed = code == -signal.SIGKILL
        marks = [m[1] if m[0] == "step" else m[0] for m in messages if m[0] in ("step", "install", "switch")]
        reached = marks[-1] if marks else "start"
        errors = [m[1] for m in messages if m[0] == "error"]
        trial = Trial(scenario.name, kill.kind, kill.step, kill.delay_s, killed, reached, "partial")
        if errors or (not killed and code != 0):
            trial.problems.append(f"the update run failed (exit {code}): {errors[0] if errors else ''}")
        restarted = time.monotonic()
        proc, conn = spawn(restart, box, self, scenario)
        found = drain(conn)
        code = finish(proc)
        trial.update_s = update_s
        trial.restart_s = time.monotonic() - restarted
        trial.total_s = time.monotonic() - started
        result = next((m[1] for m in found if m[0] == "done"), None)
        crash = next((m[1] for m in found if m[0] == "error"), None)
        if result is None:
            trial.problems.append(f"the restarted box failed (exit {code}): {crash or 'no result'}")
            trial.after.append("not run: the restart failed")
            return trial, messages
        trial.served = result["served"]
        trial.problems += result["problems"]
        trial.after = result["after"]
        trial.completed = not result["after"]
        trial.outcome = result["outcome"]
        trial.removed = result["removed"]
        trial.leftover_parts = result["leftover_parts"]
        if trial.problems:
            trial.served = "partial"
        return trial, messages

    # -- checks --

    @staticmethod
    def _folder_files(folder: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.is_dir() else {}

    def expected_files(self, template: str, version: int) -> dict[str, bytes] | None:
        return self.files[2] if version == 2 else self.expected[template].get(version)

    def check_box(self, models: Path, template: str) -> tuple[list[str], ServingState | None]:
        """What is wrong on disk (nothing: whole versions only, a readable switch), and the switch."""
        problems = []
        folders = [models, *(p for p in models.iterdir() if p.is_dir())] if models.is_dir() else []
        for parent in folders:
            problems += [f"{p.relative_to(models)} left after recover()" for p in parent.glob(install.INCOMING + "*")]
        folder = models / NAME
        state = None
        if not folder.is_dir():
            if template != "empty":
                problems.append(f"{NAME}/ is gone")
            return problems, None
        if (folder / "config.toml").read_bytes() != self.config:
            problems.append("config.toml is not the model's config")
        raw = (folder / SERVING_FILE).read_bytes() if (folder / SERVING_FILE).exists() else None
        if raw is not None:
            try:
                state = ServingState.from_json(raw)
            except (ValueError, TypeError) as exc:
                problems.append(f"{SERVING_FILE} does not parse ({exc}): {raw[:80]!r}")
        elif template == "empty":
            problems.append(f"{NAME}/ arrived without {SERVING_FILE}")
        versions = sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
        for version in versions:
            want = self.expected_files(template, version)
            if want is None:
                problems.append(f"v{version} should not be on this box")
                continue
            have = self._folder_files(folder / str(version))
            if have.keys() != want.keys():
                problems.append(f"v{version} holds {sorted(have)}, not {sorted(want)}")
            else:
                problems += [f"v{version}/{n} differs from its version's file" for n in want if have[n] != want[n]]
        if state is not None and state.version not in versions:
            problems.append(f"{SERVING_FILE} names v{state.version}, which is not on disk ({versions})")
        return problems, state

    def check_serving(
        self, dataplane: Dataplane, models: Path, template: str, state: ServingState | None
    ) -> tuple[str, list[str]]:
        """(old | new | partial, problems) of what a loaded Dataplane answers."""
        if NAME not in dataplane.lifecycle.names():
            return ("old", []) if template == "empty" else ("partial", [f"{NAME} is not in the repository"])
        ready = dataplane.lifecycle.ready_versions(NAME)
        if not ready:
            return "partial", [f"{NAME} is not READY after the restart"]
        version, y, ys = answer(dataplane)
        path = models / NAME / version / MODEL_FILE
        digest = sha(path.read_bytes()) if path.is_file() else "(no file)"
        old = self.expected[template].get(1, {}).get(MODEL_FILE)
        problems = []
        if version == "1" and old is not None and y == OLD and digest == sha(old):
            served = "old"
        elif version == "2" and y == NEW and digest == sha(self.models[2]):
            served = "new"
        else:
            served = "partial"
            problems.append(f"v{version} answered {ys} from a file hashing {digest[:16]}")
        if any(v != ys[0] for v in ys):
            problems.append(f"the answer {ys} is not one value")
        if state is not None and str(state.version) != version:
            problems.append(f"{SERVING_FILE} names v{state.version} but v{version} answered")
        return served, problems


def restart(conn: Connection, box: Path, lab: CrashLab, scenario: Scenario) -> dict:
    """The restarted box: recover, load as a server does, check; then the agent's next pass, and a
    fresh load again, which must serve v2."""
    models = box / "models"
    refused = lab.refused or scenario.rollback  # the box must stay at v1, v2 refused
    removed = install.recover(models)
    problems, state = lab.check_box(models, scenario.template)
    dataplane = Dataplane(models)
    dataplane.start()
    try:
        served, found = lab.check_serving(dataplane, models, scenario.template, state)
        problems += found
        # the update completes: the agent's next pass (inside this server, or `bedside update`)
        agent = UpdateAgent(
            lab.settings(scenario), box / "state", models, lifecycle=dataplane.lifecycle if scenario.server else None
        )
        outcomes = agent.check()
        after = []
        actions = {o.model: (o.action, o.serving, o.reason) for o in outcomes}
        action, serving, reason = actions.get(NAME, ("missing", None, ""))
        final = 1 if refused else 2
        accepted = ("refused",) if refused else ("installed", "up-to-date", "watching")
        if serving != final or action not in accepted:
            after.append(f"the next pass: {action}, serving {serving} {reason}".strip())
        if scenario.server:
            version, y, _ = answer(dataplane)
            if (version, y) != (str(final), OLD if refused else NEW):
                after.append(f"the server answers v{version} {y} after the next pass")
    finally:
        dataplane.close()
    disk, state = lab.check_box(models, scenario.template)
    after += disk
    if state is None or state.version != final or (refused and "2" not in state.refused):
        after.append(f"{SERVING_FILE} says {state}, not v{final}")
    fresh = Dataplane(models)
    fresh.start()
    try:
        served_now, found = lab.check_serving(fresh, models, scenario.template, state)
        if served_now != ("old" if refused else "new") or found:
            after.append(f"a restart after the next pass serves {served_now} {found}".strip())
    finally:
        fresh.close()
    parts = len(list((box / "state" / "staging").glob("*.part")))
    return {
        "served": served,
        "problems": problems,
        "after": after,
        "outcome": action,
        "removed": removed,
        "leftover_parts": parts,
    }


def kills(scenario: Scenario, timing: Timing, repeats: int, randoms: int, seed: int) -> list[Kill]:
    """Every checkpoint `repeats` times, and `randoms` random instants, in turn from the start of the
    run, of the install and of the switch (each within its duration measured without a kill)."""
    rng = random.Random(seed)
    out = [Kill(scenario, step=step) for _ in range(repeats) for step in timing.steps]
    for i in range(randoms):
        after = AFTER[i % len(AFTER)]
        out.append(Kill(scenario, delay_s=rng.uniform(0.0, timing.span(after)), after=after))
    return out


def describe(trial: Trial) -> str:
    how = f"at {trial.step!r}" if trial.step else f"{trial.kind} +{(trial.delay_s or 0) * 1e3:.1f} ms"
    return (
        f"{trial.scenario}, killed {how} (after {trial.reached!r}): served {trial.served}, "
        f"problems {trial.problems}, after {trial.after}"
    )


# --- the tests ------------------------------------------------------------------------------------

RANDOM_KILLS = 6  # per scenario, beside every checkpoint once: 6 x 8 + 9 + 7 x 6 = 99 kills


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    with CrashLab(tmp_path_factory.mktemp("crash"), payload_kb=256) as built:
        yield built


@pytest.fixture(scope="module")
def tally() -> dict[str, int]:
    return {"kills": 0, "old": 0, "new": 0}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_a_kill_at_any_point_of_an_update_leaves_the_old_or_the_new_version(lab, tally, scenario):
    timing = lab.calibrate(scenario)
    assert timing.steps == list(scenario.steps)  # every checkpoint the code has is one this test kills at
    seed = 1000 + SCENARIOS.index(scenario)
    trials = [lab.trial(k) for k in kills(scenario, timing, 1, RANDOM_KILLS, seed)]
    for trial in trials:
        if trial.kind == "step":
            assert trial.killed, f"not killed at {trial.step!r}"
    bad = [describe(t) for t in trials if not t.ok]
    assert not bad, "\n".join(bad)
    killed = [t for t in trials if t.killed]
    served = {s: sum(t.served == s for t in killed) for s in ("old", "new")}
    # a kill before the switch leaves the old version, after it the new one
    switch = "model renamed" if scenario.template == "empty" else "switched"
    for t in killed:
        if t.kind == "step":
            assert t.served == ("new" if t.step == switch else "old"), describe(t)
    assert served["old"] and served["new"]
    tally["kills"] += len(killed)
    tally["old"] += served["old"]
    tally["new"] += served["new"]


def test_the_suite_killed_the_agent_at_least_50_times(tally):
    if len(SCENARIOS) and tally["kills"] == 0:
        pytest.skip("the crash trials did not run (deselected)")
    assert tally["kills"] >= 50, tally


# --- what the crash trials found ------------------------------------------------------------------


@pytest.fixture(scope="module")
def refused_lab(tmp_path_factory: pytest.TempPathFactory):
    with CrashLab(tmp_path_factory.mktemp("crash-refused"), payload_kb=64, refused=True) as built:
        yield built


REFUSED = Scenario("golden check fails", "agent")
ROLLED_BACK = Scenario("rolled back", "agent", server=True, watch_s=3600.0, rollback=True)


@pytest.mark.parametrize("scenario", [REFUSED, ROLLED_BACK], ids=["golden check fails", "rolled back"])
def test_a_refused_version_is_removed_whole_and_the_old_one_serves(lab, refused_lab, scenario):
    trial = (refused_lab if scenario is REFUSED else lab).trial(Kill(scenario))
    assert not trial.killed and trial.ok and trial.served == "old" and trial.outcome == "refused", describe(trial)


@pytest.mark.parametrize("deleted", [1, 3])
@pytest.mark.parametrize("scenario", [REFUSED, ROLLED_BACK], ids=["golden check fails", "rolled back"])
def test_a_kill_while_a_refused_version_is_removed_leaves_no_partial_version_folder(
    lab, refused_lab, scenario, deleted
):
    trial = (refused_lab if scenario is REFUSED else lab).trial(Kill(scenario, step=f"{REMOVING} {deleted}"))
    assert trial.killed and trial.reached.startswith(REMOVING), describe(trial)
    # the folder is renamed to a hidden name before it is removed: recover() deletes what the kill left
    assert not trial.problems and not trial.after and trial.served == "old", describe(trial)
