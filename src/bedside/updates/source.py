"""The update repository as the box sees it: TUF's client verifies the metadata (signatures,
thresholds, versions, expiry, lengths and hashes), then each file is downloaded, resumably, and
verified against its signed length and SHA-256 before anything uses it. A model comes as a bsdiff
delta against the installed version where one is published; the patched bytes must match the signed
hash of the full model, else the full model is downloaded instead."""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import bsdiff4
from tuf.api import exceptions as tuf_errors
from tuf.ngclient import TargetFile, Updater, UpdaterConfig

from bedside.errors import BedsideError
from bedside.updates.fetch import Fetcher, RateLimit
from bedside.updates.publisher import delta_target, model_target
from bedside.updates.rollout import PLAN_TARGET, PlanError, RolloutPlan

TUF_ERRORS = (tuf_errors.RepositoryError, tuf_errors.DownloadError)
STALE_PART_S = 7 * 86_400.0  # an interrupted download not continued within a week is dropped


class UpdateRefused(BedsideError):
    """An update that is not installed: the reason says why (the old version keeps serving)."""

    status = 409


@dataclass
class Fetched:
    files: dict[str, bytes]
    bytes_downloaded: int
    delta_used: bool
    delta_refused: str = ""  # why a published delta was not used


def describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class UpdateSource:
    def __init__(
        self, url: str, state: Path, trusted_root: Path | None, rate: RateLimit, timeout_s: float, max_bytes: int
    ) -> None:
        self.base = url.rstrip("/")
        self.metadata = state / "metadata"
        self.staging = state / "staging"
        self.max_bytes = max_bytes
        self.fetcher = Fetcher(rate, timeout_s)
        self.metadata.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        root = self.metadata / "root.json"
        if not root.exists():
            if trusted_root is None or not trusted_root.is_file():
                raise UpdateRefused("no trusted root.json: set updates.root to the repository's first root.json")
            shutil.copyfile(trusted_root, root)
        self._updater: Updater | None = None
        self._downloaded = 0
        self._parts: set[Path] = set()  # parts of the version being fetched, dropped by forget()

    def refresh(self) -> RolloutPlan | None:
        """Verify the newest metadata (TUF's refresh) and return the signed rollout plan (None: none)."""
        self._updater = Updater(
            str(self.metadata),
            f"{self.base}/metadata/",
            str(self.staging),
            f"{self.base}/targets/",
            fetcher=self.fetcher,
            config=UpdaterConfig(app_user_agent="bedside-update-agent"),
            bootstrap=None,
        )
        try:
            self._updater.refresh()
            info = self._updater.get_targetinfo(PLAN_TARGET)
            return None if info is None else RolloutPlan.from_json(self._download(info))
        except tuf_errors.DownloadError as exc:
            if isinstance(exc, tuf_errors.DownloadLengthMismatchError):  # endless metadata: an attack, not an outage
                raise UpdateRefused(f"update metadata refused ({describe(exc)})") from None
            raise UpdateRefused(f"the update repository is unreachable or incomplete ({describe(exc)})") from None
        except OSError as exc:  # a full or read-only disk on this box: said without the path
            raise UpdateRefused(f"update metadata could not be stored ({exc.strerror or type(exc).__name__})") from None
        except TUF_ERRORS as exc:
            raise UpdateRefused(f"update metadata refused ({describe(exc)})") from None
        except PlanError as exc:
            raise UpdateRefused(f"the signed rollout plan cannot be used ({exc.message})") from None

    def info(self, path: str) -> TargetFile | None:
        assert self._updater is not None, "refresh() first"
        try:
            return self._updater.get_targetinfo(path)
        except TUF_ERRORS as exc:
            raise UpdateRefused(f"update metadata refused ({describe(exc)})") from None

    def fetch_version(self, name: str, version: int, base: int | None, base_model: bytes | None) -> Fetched:
        files: dict[str, bytes] = {}
        before = self.downloaded
        self._parts = set()  # another version's interrupted download stays, to be continued later
        model = self.info(model_target(name, version, "model.onnx"))
        if model is None:
            raise UpdateRefused(f"{name} v{version} is not published")
        self._parts.add(self.staging / f"{model.hashes.get('sha256', '-')}.part")  # cut short by an earlier run
        for file in ("config.toml", "MODEL_CARD.md", "golden.json"):
            info = self.info(model_target(name, version, file))
            if info is not None:
                files[file] = self._download(info)
        if "golden.json" not in files:
            raise UpdateRefused(f"{name} v{version} ships no golden.json; a version must be checked before it serves")
        delta_used, delta_refused = False, ""
        delta = self.info(delta_target(name, version, base)) if base is not None and base_model is not None else None
        if delta is not None and base_model is not None:
            try:
                patched = bsdiff4.patch(base_model, self._download(delta))
                model.verify_length_and_hashes(patched)
                files["model.onnx"], delta_used = patched, True
            except (ValueError, tuf_errors.LengthOrHashMismatchError, UpdateRefused) as exc:
                delta_refused = f"delta from v{base} not used ({describe(exc)}); the full model was downloaded"
        if not delta_used:
            files["model.onnx"] = self._download(model)
        return Fetched(files, self.downloaded - before, delta_used, delta_refused)

    @property
    def downloaded(self) -> int:
        return self._downloaded

    def _download(self, info: TargetFile) -> bytes:
        """The target's bytes, verified against its signed length and hash; a `.part` file left by an
        interrupted run is continued. A mismatch deletes the part and refuses the update."""
        if info.length > self.max_bytes:
            raise UpdateRefused(f"{info.path} is {info.length} bytes, over updates.max_download_mb")
        sha = info.hashes.get("sha256")
        if sha is None or len(sha) != 64 or not all(c in "0123456789abcdef" for c in sha):
            raise UpdateRefused(f"{info.path} has no SHA-256 in its signed metadata")
        folder, _, name = info.path.rpartition("/")
        url = f"{self.base}/targets/{folder + '/' if folder else ''}{sha}.{name}"
        part = self.staging / f"{sha}.part"
        self._parts.add(part)
        try:
            self._downloaded += self.fetcher.resume(url, part, info.length)
            with open(part, "rb") as fh:
                info.verify_length_and_hashes(fh)
            data = part.read_bytes()
            part.unlink()  # verified and in memory; only an interrupted download keeps its part
        except tuf_errors.LengthOrHashMismatchError:
            part.unlink(missing_ok=True)
            raise UpdateRefused(f"{info.path} does not match its signed length and hash; deleted") from None
        except tuf_errors.DownloadLengthMismatchError:
            part.unlink(missing_ok=True)
            raise UpdateRefused(f"{info.path} is longer than its signed length; deleted") from None
        except tuf_errors.DownloadError as exc:  # kept: the next run continues it
            raise UpdateRefused(f"{info.path} could not be downloaded ({describe(exc)})") from None
        except OSError as exc:  # a full or read-only disk on this box: said without the path
            raise UpdateRefused(f"{info.path} could not be stored ({exc.strerror or type(exc).__name__})") from None
        return data

    def forget(self) -> None:
        """Drop what is left of the last version's downloads (it is installed, or refused for good):
        e.g. the full model cut short before its delta was used."""
        for part in self._parts:
            part.unlink(missing_ok=True)
        self._parts.clear()

    def clean(self, older_than_s: float = STALE_PART_S) -> None:
        """Drop interrupted downloads nobody continued (a version no longer rolled out)."""
        cutoff = time.time() - older_than_s
        for part in self.staging.glob("*.part"):
            with contextlib.suppress(OSError):
                if part.stat().st_mtime < cutoff:
                    part.unlink()
