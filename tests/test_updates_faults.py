"""Faults injected into signed model updates on a real loopback HTTP server: a box that serves v1 of
"scale" is offered v2, then the repository, the network or the box's own disk misbehaves. Each case
is refused with a reason that says what was wrong (and names no path of the box), nothing new is
installed and v1 keeps answering; or, where the design says so, the agent recovers (a bad delta falls
back to the full model, an interrupted download is continued with a Range request)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import bsdiff4
import numpy as np
import onnx
import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp

from bedside.dataplane import Dataplane
from bedside.protocol.types import InferRequest
from bedside.repository.serving import read_state
from bedside.updates.agent import Outcome, UpdateAgent
from bedside.updates.publisher import Publisher, delta_target, model_target
from bedside.updates.rollout import PLAN_TARGET
from tests.fleet import UpdateServer, box, scale_bytes, update_server

KIB = 1024


# -- helpers ---------------------------------------------------------------------------------------


def answer(dataplane: Dataplane, x: float = 1.0) -> float:
    request = InferRequest({"x": np.full((1, 4), x, np.float32)})
    return float(asyncio.run(dataplane.infer("scale", None, request)).outputs["y"][0, 0])


def padded_scale(tmp: Path, factor: float, pieces: tuple[int, ...], piece: int = 100 * KIB) -> bytes:
    """A scale model of about `len(pieces) * piece` bytes: random text in its doc string, one run of
    `piece` bytes per seed in `pieces`, so that two models share the runs of the seeds they share (a
    delta between them is the size of the runs they do not)."""
    model = onnx.load_from_string(scale_bytes(tmp, factor))
    runs = (base64.b64encode(random.Random(seed).randbytes(piece * 3 // 4)).decode() for seed in pieces)
    model.doc_string = "".join(runs)
    return model.SerializeToString()


@dataclass
class World:
    tmp: Path
    server: UpdateServer
    dataplane: Dataplane
    agent: UpdateAgent
    requests: list[tuple[str, str]]  # (path, Range header) of every GET the server answered
    audits: list[tuple[str, ...]]  # (kind, model, version, outcome, detail) the agent recorded

    @property
    def publisher(self) -> Publisher:
        return self.server.publisher

    @property
    def box(self) -> Path:
        return self.tmp / "box"

    @property
    def folder(self) -> Path:
        return self.box / "models" / "scale"

    @property
    def staging(self) -> Path:
        return self.box / "state" / "staging"

    @property
    def meta(self) -> Path:
        return self.tmp / "pub" / "repo" / "metadata"

    def check(self) -> Outcome:
        [outcome] = self.agent.check()
        return outcome

    def stored(self, target: str) -> Path:
        """Where the repository keeps a published target's bytes."""
        return self.publisher._stored(self.publisher.targets().targets[target])

    def parts(self) -> list[Path]:
        """Downloads left in staging, but the rollout plan's (see the report: kept until an install)."""
        plan = self.publisher.targets().targets[PLAN_TARGET].hashes["sha256"]
        return sorted(p for p in self.staging.glob("*.part") if p.name != f"{plan}.part")

    def published(self, *paths: str) -> list[str]:
        """Those of `paths` the signed targets name (a delta is published only where it saves)."""
        targets = self.publisher.targets().targets
        return [p for p in paths if p in targets]

    def target_requests(self, version: int) -> list[tuple[str, str]]:
        return [r for r in self.requests if r[0].startswith(f"/targets/models/scale/{version}/")]


def log_requests(server: UpdateServer) -> list[tuple[str, str]]:
    handler = server.httpd.RequestHandlerClass.func  # this server's own handler class
    seen: list[tuple[str, str]] = []
    original = handler.send_head

    def send_head(self: Any) -> Any:
        seen.append((self.path, self.headers.get("Range", "")))
        return original(self)

    handler.send_head = send_head
    return seen


def cut_once(server: UpdateServer, suffixes: tuple[str, ...]) -> list[str]:
    """The next download of each file whose name ends with one of `suffixes` stops half way (the
    connection closes although its Content-Length promised the whole file); returns those cut."""
    handler = server.httpd.RequestHandlerClass.func
    pending, cut = set(suffixes), []
    original = handler.copyfile

    def copyfile(self: Any, source: Any, outputfile: Any) -> None:
        hit = next((s for s in sorted(pending) if self.path.endswith(s)), None)
        if hit is None or self.headers.get("Range"):
            return original(self, source, outputfile)
        pending.discard(hit)
        cut.append(self.path)
        outputfile.write(source.read(os.fstat(source.fileno()).st_size // 2))
        outputfile.flush()
        self.close_connection = True

    handler.copyfile = copyfile
    return cut


@contextmanager
def serving_v1(tmp: Path, v1: bytes | None = None, urgent: bool = False, **settings: Any) -> Iterator[World]:
    """A publisher on loopback and a box that already serves v1 of scale (y = 2x), installed by its agent."""
    with update_server(tmp / "pub") as server:
        requests = log_requests(server)
        server.roll_out("scale", server.publish("scale", v1 or scale_bytes(tmp, 2.0)), urgent=urgent)
        with box(tmp / "box", server, **settings) as (dataplane, agent):
            audits: list[tuple[str, ...]] = []
            original = agent._audit

            def audit(kind: str, model: str, version: int | None, outcome: str, detail: str) -> None:
                audits.append((kind, model, "" if version is None else str(version), outcome, detail))
                original(kind, model, version, outcome, detail)

            agent._audit = audit  # type: ignore[method-assign]
            world = World(tmp, server, dataplane, agent, requests, audits)
            first = world.check()
            assert (first.action, first.serving) == ("installed", 1)
            assert answer(dataplane) == 2.0
            yield world


def publish_v2(world: World, model: bytes | None = None, **rollout: Any) -> int:
    v2 = world.server.publish("scale", model or scale_bytes(world.tmp, 3.0))
    world.server.roll_out("scale", v2, **rollout)
    return v2


def assert_v1_serves(world: World) -> None:
    """Nothing new installed, the state file still names v1 and v1 answers."""
    assert not (world.folder / "2").exists()
    assert world.agent.store.versions("scale") == [1]
    assert not list(world.folder.glob(".incoming-*")) and not list(world.folder.parent.glob(".incoming-*"))
    state = read_state(world.folder)
    assert state is not None and (state.version, state.phase) == (1, "serving")
    assert answer(world.dataplane) == 2.0


def assert_refused(world: World, outcome: Outcome, *says: str) -> None:
    assert outcome.action == "refused", outcome
    for text in says:
        assert text in outcome.reason, outcome.reason
    for path in {str(world.tmp), str(world.tmp.resolve()), str(world.box), str(Path.home())}:
        assert path not in outcome.reason, f"a host path in the reason: {outcome.reason}"
    assert_v1_serves(world)


def sign(signed: Root | Targets | Snapshot | Timestamp, signers: list[CryptoSigner]) -> bytes:
    md: Metadata[Any] = Metadata(signed)
    for signer in signers:
        md.sign(signer, append=True)
    return md.to_bytes()


def current(meta: Path) -> tuple[Timestamp, Snapshot, Targets]:
    timestamp = Metadata[Timestamp].from_file(str(meta / "timestamp.json")).signed
    snapshot = Metadata[Snapshot].from_file(str(meta / f"{timestamp.snapshot_meta.version}.snapshot.json")).signed
    targets = Metadata[Targets].from_file(str(meta / f"{snapshot.meta['targets.json'].version}.targets.json")).signed
    return timestamp, snapshot, targets


def window_without_now() -> str:
    minute = datetime.now().hour * 60 + datetime.now().minute
    start, end = (minute + 120) % 1440, (minute + 180) % 1440
    return f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"


# -- 1, 2: a target file altered, longer or shorter than signed ---------------------------------------


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    path.write_bytes(bytes(data))


def _append(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0" * 100)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "altered": (_flip, "does not match its signed length and hash"),
    "appended": (_append, "is longer than its signed length"),
    "truncated": (_truncate, "does not match its signed length and hash"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("target", ["model.onnx", "golden.json", "config.toml", PLAN_TARGET])
def test_a_target_file_that_does_not_match_its_signed_length_and_hash_is_refused(tmp_path, target, damage):
    with serving_v1(tmp_path) as world:
        v2 = publish_v2(world)
        if target == PLAN_TARGET:
            paths = [PLAN_TARGET]
        elif target == "model.onnx":  # its delta too, else the box never needs the full file
            paths = world.published(model_target("scale", v2, target), delta_target("scale", v2, 1))
        else:
            paths = [model_target("scale", v2, target)]
        damage_file, says = DAMAGE[damage]
        for path in paths:
            damage_file(world.stored(path))
        outcome = world.check()
        assert_refused(world, outcome, paths[0], says)
        if len(paths) == 2:  # the damaged delta was tried, then the damaged full model
            assert [r for r in world.target_requests(v2) if r[0].endswith(".bsdiff")]
        for path in paths:  # the damaged download is deleted, never left to be continued
            sha = world.publisher.targets().targets[path].hashes["sha256"]
            assert not (world.staging / f"{sha}.part").exists()


def test_a_full_model_altered_on_the_server_is_never_used_when_the_delta_rebuilds_the_signed_bytes(tmp_path):
    with serving_v1(tmp_path) as world:
        v2 = publish_v2(world)
        assert world.published(delta_target("scale", v2, 1))
        _flip(world.stored(model_target("scale", v2, "model.onnx")))
        outcome = world.check()
        assert (outcome.action, outcome.serving, outcome.delta) == ("installed", 2, True)
        assert answer(world.dataplane) == 3.0
        assert not [r for r in world.target_requests(v2) if r[0].endswith(".model.onnx")]


def test_a_stale_part_file_that_does_not_match_is_deleted_and_the_next_check_installs(tmp_path):
    """A `.part` of wrong bytes in staging (a disk error, an earlier server's bad file) is continued,
    fails its hash, is deleted: refused once, then downloaded afresh."""
    with serving_v1(tmp_path) as world:
        v2 = publish_v2(world)
        info = world.publisher.targets().targets[model_target("scale", v2, "golden.json")]
        part = world.staging / f"{info.hashes['sha256']}.part"
        part.write_bytes(b"X" * (info.length // 2))
        assert_refused(world, world.check(), "golden.json", "does not match its signed length and hash")
        assert not part.exists()
        outcome = world.check()
        assert (outcome.action, outcome.serving) == ("installed", 2)
        assert answer(world.dataplane) == 3.0


# -- 3: expired metadata (a freeze attack) ---------------------------------------------------------


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets"])
def test_expired_metadata_is_refused(tmp_path, role):
    with serving_v1(tmp_path) as world:
        publish_v2(world)
        stale = Publisher(world.publisher.repo, world.publisher.keys, expiry_days={role: -1})
        if role == "targets":
            stale.set_plan(stale.plan())  # targets signed again, expired
        else:
            stale.refresh()
        assert_refused(world, world.check(), "update metadata refused", "ExpiredMetadataError", role)
        assert not world.target_requests(2)


# -- 4: unsigned or badly signed metadata ----------------------------------------------------------


def _unsigned(raw: bytes, publisher: Publisher) -> bytes:
    doc = json.loads(raw)
    doc["signatures"] = []
    return json.dumps(doc).encode()


def _foreign_key(raw: bytes, publisher: Publisher) -> bytes:
    return sign(Metadata.from_bytes(raw).signed, [CryptoSigner.generate_ed25519()])


def _altered(raw: bytes, publisher: Publisher) -> bytes:
    doc = json.loads(raw)
    doc["signed"]["expires"] = "2100-01-01T00:00:00Z"  # signatures kept: they no longer match
    return json.dumps(doc).encode()


def _junk(raw: bytes, publisher: Publisher) -> bytes:
    return b"this is not metadata"


def _endless(raw: bytes, publisher: Publisher) -> bytes:
    return raw + b" " * (1 << 20)  # far over what a box reads of a timestamp


FORGERIES: dict[str, tuple[Callable[[bytes, Publisher], bytes], str]] = {
    "unsigned": (_unsigned, "UnsignedMetadataError"),
    "foreign-key": (_foreign_key, "UnsignedMetadataError"),
    "altered": (_altered, "UnsignedMetadataError"),
    "junk": (_junk, "DeserializationError"),
    "endless": (_endless, "DownloadLengthMismatchError"),
}


@pytest.mark.parametrize(
    ("role", "forgery"),
    [
        ("timestamp", "unsigned"),
        ("timestamp", "foreign-key"),
        ("timestamp", "altered"),
        ("timestamp", "junk"),
        ("timestamp", "endless"),
        ("snapshot", "foreign-key"),
        ("snapshot", "altered"),
        ("targets", "unsigned"),
        ("targets", "foreign-key"),
        ("targets", "altered"),
        ("root", "foreign-key"),
    ],
)
def test_unsigned_or_badly_signed_metadata_is_refused(tmp_path, role, forgery):
    with serving_v1(tmp_path) as world:
        publish_v2(world)
        timestamp, snapshot, _ = current(world.meta)
        if role == "timestamp":
            path = world.meta / "timestamp.json"
        elif role == "snapshot":
            path = world.meta / f"{timestamp.snapshot_meta.version}.snapshot.json"
        elif role == "targets":
            path = world.meta / f"{snapshot.meta['targets.json'].version}.targets.json"
        else:  # a next root the box would follow, signed by a key its root does not trust
            root = Metadata[Root].from_file(str(world.meta / "root.json")).signed
            root.version += 1
            root.add_key(CryptoSigner.generate_ed25519().public_key, "timestamp")
            path = world.meta / f"{root.version}.root.json"
            path.write_bytes(sign(root, world.publisher._signers("root")))
        make, says = FORGERIES[forgery]
        path.write_bytes(make(path.read_bytes(), world.publisher))
        assert_refused(world, world.check(), "update metadata refused", says)
        assert not world.target_requests(2)


# -- 5: replayed old metadata (a rollback attack) ----------------------------------------------------


REPLAYS = {
    "old-timestamp": "BadVersionNumberError",
    "old-snapshot-file": "BadVersionNumberError",
    "old-targets-file": "BadVersionNumberError",
    "new-timestamp-naming-an-old-snapshot": "BadVersionNumberError",
    "new-snapshot-naming-old-targets": "BadVersionNumberError",
}


@pytest.mark.parametrize("replay", sorted(REPLAYS))
def test_replayed_older_metadata_is_refused_once_the_box_has_seen_newer(tmp_path, replay):
    with serving_v1(tmp_path) as world:
        old = {p.name: p.read_bytes() for p in world.meta.iterdir() if p.is_file()}
        old_ts, old_snap, _ = current(world.meta)
        world.server.roll_out("scale", 1)  # newer targets, snapshot and timestamp, which the box then sees
        world.publisher.refresh()
        assert world.check().action == "up-to-date"
        publish_v2(world)
        timestamp, snapshot, _ = current(world.meta)
        pub = world.publisher
        if replay == "old-timestamp":
            (world.meta / "timestamp.json").write_bytes(old["timestamp.json"])
        elif replay == "old-snapshot-file":  # the name the timestamp asks for, older bytes behind it
            name = f"{old_ts.snapshot_meta.version}.snapshot.json"
            (world.meta / f"{timestamp.snapshot_meta.version}.snapshot.json").write_bytes(old[name])
        elif replay == "old-targets-file":
            name = f"{old_snap.meta['targets.json'].version}.targets.json"
            (world.meta / f"{snapshot.meta['targets.json'].version}.targets.json").write_bytes(old[name])
        elif replay == "new-timestamp-naming-an-old-snapshot":  # the timestamp key is compromised
            timestamp.version += 1
            timestamp.snapshot_meta = MetaFile(old_ts.snapshot_meta.version)
            (world.meta / "timestamp.json").write_bytes(sign(timestamp, pub._signers("timestamp")))
        else:  # snapshot and timestamp keys compromised: a fresh snapshot naming the old targets
            snapshot.version += 1
            snapshot.meta = {"targets.json": MetaFile(old_snap.meta["targets.json"].version)}
            raw = sign(snapshot, pub._signers("snapshot"))
            (world.meta / f"{snapshot.version}.snapshot.json").write_bytes(raw)
            timestamp.version += 1
            timestamp.snapshot_meta = MetaFile(snapshot.version)
            (world.meta / "timestamp.json").write_bytes(sign(timestamp, pub._signers("timestamp")))
        assert_refused(world, world.check(), "update metadata refused", REPLAYS[replay])
        assert not world.target_requests(2)


# -- 6: a delta that patches to the wrong bytes ------------------------------------------------------


def _resign(publisher: Publisher, path: str, data: bytes) -> None:
    """Publish `data` as `path` with a valid signature (what a publisher bug or a bad build would do)."""
    targets = publisher.targets()
    publisher._add(targets, path, data)
    publisher._publish(targets)


DELTAS = {
    "signed-delta-to-other-bytes": "LengthOrHashMismatchError",
    "signed-junk-delta": "ValueError",
    "altered-delta": "does not match its signed length and hash",
}


@pytest.mark.parametrize("delta", sorted(DELTAS))
def test_a_delta_that_does_not_rebuild_the_signed_model_falls_back_to_the_full_download(tmp_path, delta):
    with serving_v1(tmp_path) as world:
        v2 = publish_v2(world)
        path = delta_target("scale", v2, 1)
        v1 = (world.folder / "1" / "model.onnx").read_bytes()
        if delta == "signed-delta-to-other-bytes":
            _resign(world.publisher, path, bsdiff4.diff(v1, scale_bytes(tmp_path, 5.0)))
        elif delta == "signed-junk-delta":
            _resign(world.publisher, path, b"BSDIFF40 but not really a delta")
        else:
            _flip(world.stored(path))
        outcome = world.check()
        assert (outcome.action, outcome.serving, outcome.delta) == ("installed", 2, False)
        assert answer(world.dataplane) == 3.0  # v2 itself, not the bytes the delta made
        assert (world.folder / "2" / "model.onnx").read_bytes() == scale_bytes(tmp_path, 3.0)
        [note] = [a for a in world.audits if a[0] == "update-delta"]
        assert note[3] == "refused" and "the full model was downloaded" in note[4] and DELTAS[delta] in note[4]
        assert [r for r in world.target_requests(v2) if r[0].endswith(".model.onnx")]
        assert not world.parts()


def test_a_bad_delta_and_no_full_model_is_refused(tmp_path):
    with serving_v1(tmp_path) as world:
        v2 = publish_v2(world)
        v1 = (world.folder / "1" / "model.onnx").read_bytes()
        _resign(world.publisher, delta_target("scale", v2, 1), bsdiff4.diff(v1, scale_bytes(tmp_path, 5.0)))
        world.stored(model_target("scale", v2, "model.onnx")).unlink()
        assert_refused(world, world.check(), "models/scale/2/model.onnx could not be downloaded", "404")
        [note] = [a for a in world.audits if a[0] == "update-download"][-1:]
        assert note[3] == "refused"


# -- 7: the server is down or loses files ------------------------------------------------------------


@pytest.mark.parametrize("when", ["before-metadata", "after-metadata", "files-gone"])
def test_a_server_that_is_down_or_loses_files_is_refused_and_the_old_version_serves(tmp_path, when):
    with serving_v1(tmp_path, timeout_s=2.0) as world:
        v2 = publish_v2(world)
        if when == "before-metadata":
            world.server.close()
            says: tuple[str, ...] = ("update repository is unreachable", "DownloadError")
        elif when == "after-metadata":  # the metadata is verified, then the server goes away
            refresh = world.agent.source.refresh

            def refresh_then_down() -> Any:
                plan = refresh()
                world.server.close()
                return plan

            world.agent.source.refresh = refresh_then_down  # type: ignore[method-assign]
            says = ("could not be downloaded", "cannot reach the update repository")
        else:
            for file in ("golden.json", "model.onnx", "config.toml", "MODEL_CARD.md"):
                world.stored(model_target("scale", v2, file)).unlink()
            says = ("could not be downloaded", "HTTP 404")
        started = time.monotonic()
        outcome = world.check()
        assert time.monotonic() - started < 5
        assert_refused(world, outcome, *says)
        state = read_state(world.folder)
        assert state is not None and "2" not in state.refused  # a network fault is tried again next time


# -- 8: an interrupted download is continued -----------------------------------------------------------


@pytest.mark.parametrize("which", ["full", "delta"])
def test_an_interrupted_download_is_continued_with_a_range_request(tmp_path, which):
    v1 = padded_scale(tmp_path, 2.0, (1, 2, 3))
    with serving_v1(tmp_path, v1) as world:
        v2 = publish_v2(world, padded_scale(tmp_path, 3.0, (1, 4, 5)))  # a third of v1's bytes: a delta pays
        delta = delta_target("scale", v2, 1)
        assert world.published(delta)
        if which == "full":  # the delta withdrawn: the full model is what is downloaded
            targets = world.publisher.targets()
            del targets.targets[delta]
            world.publisher._publish(targets)
            big = model_target("scale", v2, "model.onnx")
            cut = cut_once(world.server, (".model.onnx",))
        else:  # both cut: the delta falls back to the full model, which is cut too
            big = delta
            cut = cut_once(world.server, (".model.onnx", ".bsdiff"))
        info = world.publisher.targets().targets[big]
        assert info.length > 2 * 64 * KIB  # half of it more than one chunk of the fetcher
        part = world.staging / f"{info.hashes['sha256']}.part"

        first = world.check()
        assert_refused(world, first, "models/scale/2/model.onnx could not be downloaded", "download interrupted")
        assert len(cut) == (1 if which == "full" else 2)
        have = part.stat().st_size
        assert 0 < have < info.length  # what came before the cut is kept

        second = world.check()
        assert (second.action, second.serving, second.delta) == ("installed", 2, which == "delta")
        small = sum(
            world.publisher.targets().targets[model_target("scale", v2, f)].length
            for f in ("config.toml", "MODEL_CARD.md", "golden.json")
            if model_target("scale", v2, f) in world.publisher.targets().targets
        )
        # only the rest of the model; the small files are fetched again (a verified file is not kept)
        assert second.downloaded == info.length - have + small
        ranged = [r for r in world.requests if r[1]]
        assert ranged == [(ranged[0][0], f"bytes={have}-")] and ranged[0][0].endswith(info.path.rpartition("/")[2])
        assert answer(world.dataplane) == 3.0
        assert not world.parts()


# -- 9: the rate limit -------------------------------------------------------------------------------


def test_the_rate_limit_holds_the_download_to_its_rate(tmp_path):
    rate = 64 * KIB
    with serving_v1(tmp_path, rate_kb_s=rate // KIB) as world:
        publish_v2(world, padded_scale(tmp_path, 3.0, (9, 10)))  # ~200 KiB, nothing shared with v1
        started = time.monotonic()
        outcome = world.check()
        elapsed = time.monotonic() - started
        assert (outcome.action, outcome.serving) == ("installed", 2)
        assert outcome.downloaded > 128 * KIB
        assert elapsed >= (outcome.downloaded - rate) / rate * 0.95, (elapsed, outcome.downloaded)
        assert answer(world.dataplane) == 3.0


# -- 10: the maintenance window ------------------------------------------------------------------------


def test_outside_the_maintenance_window_an_update_waits_unless_it_is_urgent(tmp_path):
    with serving_v1(tmp_path, urgent=True, window=window_without_now()) as world:
        v2 = publish_v2(world)
        deferred = world.check()
        assert (deferred.action, deferred.serving, deferred.downloaded) == ("deferred", 1, 0)
        assert "maintenance window" in deferred.reason
        assert not world.target_requests(v2) and not world.parts()
        assert_v1_serves(world)
        world.server.roll_out("scale", v2, urgent=True)
        urgent = world.check()
        assert (urgent.action, urgent.serving) == ("installed", 2)
        assert answer(world.dataplane) == 3.0


# -- 11: halted and paused rollouts, and a box outside the cohort -------------------------------------------


@pytest.mark.parametrize(
    ("rollout", "action"),
    [
        ({"halted": "canary failed its watch"}, "halted"),
        ({"paused": True}, "paused"),
        ({"stages": "group:other"}, "not-eligible"),
        ({"stages": "group:other,100"}, "not-eligible"),  # the second stage is not reached yet
    ],
    ids=["halted", "paused", "other-group", "later-stage"],
)
def test_a_halted_paused_or_foreign_rollout_installs_nothing(tmp_path, rollout, action):
    with serving_v1(tmp_path) as world:
        v2 = publish_v2(world, **rollout)
        outcome = world.check()
        assert (outcome.action, outcome.version, outcome.serving, outcome.downloaded) == (action, v2, 1, 0)
        if "halted" in rollout:
            assert outcome.reason == rollout["halted"]
        assert not world.target_requests(v2) and not world.parts()
        assert_v1_serves(world)


# -- a signed plan the box cannot use -------------------------------------------------------------


def test_a_signed_plan_the_box_cannot_read_is_refused(tmp_path):
    with serving_v1(tmp_path) as world:
        publish_v2(world)
        plan = {"models": {"scale": {"version": 2, "stages": []}}}  # no stage: PlanError on the box
        _resign(world.publisher, PLAN_TARGET, json.dumps(plan).encode())
        assert_refused(world, world.check(), "the signed rollout plan cannot be used", "at least one stage")


# -- the box's own disk fails -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["staging", "metadata"])
def test_a_box_that_cannot_write_its_update_state_refuses_without_a_traceback(tmp_path, where):
    """The box's own disk fails: `state/...` cannot be written (simulated by a folder where a file goes,
    as the tests run as root and permissions would not stop them)."""
    with serving_v1(tmp_path) as world:
        v2 = publish_v2(world)
        if where == "staging":
            sha = world.publisher.targets().targets[model_target("scale", v2, "golden.json")].hashes["sha256"]
            (world.staging / f"{sha}.part").mkdir()
        else:
            (world.box / "state" / "metadata" / "timestamp.json").unlink()
            (world.box / "state" / "metadata" / "timestamp.json").mkdir()
        assert_refused(world, world.check())
