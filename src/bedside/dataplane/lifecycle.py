"""Version life cycle for the update agent: bring a version in beside the serving one, switch
traffic to it, switch back, take one off the air. Every call needs the `admin` role and is audited as
an admin action, as a load or unload over HTTP is; the agent is one more admin caller, not a way
around the dataplane."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from bedside.dataplane.access import ADMIN, Access
from bedside.errors import ModelLoadError, NotFound
from bedside.monitoring.latency import ModelStats
from bedside.protocol.types import Caller
from bedside.repository.manager import RepositoryManager, State, VersionStatus
from bedside.repository.serving import ServingState

T = TypeVar("T")
TRANSPORT = "update"


class Lifecycle:
    def __init__(self, manager: RepositoryManager, access: Access) -> None:
        self._manager = manager
        self._access = access

    @property
    def repository(self) -> str:
        return str(self._manager.store.root)

    def state(self, name: str) -> ServingState | None:
        return self._manager.state(name)

    def ready_versions(self, name: str) -> list[int]:
        try:
            return self._manager.entry(name).ready_versions()
        except NotFound:  # one stat of the folder, not a listing of the repository
            return []

    def names(self) -> list[str]:
        return self._manager.store.names()

    def stage(self, name: str, version: int, caller: Caller) -> VersionStatus:
        """Load `version` without traffic; UNAVAILABLE with the reason when it does not load."""
        return self._admin(caller, "stage", name, lambda: self._manager.stage(name, version), refused_if_unready=True)

    def promote(self, name: str, status: VersionStatus, caller: Caller) -> None:
        self._admin(caller, "promote", name, lambda: self._manager.promote(name, status))

    def load(self, name: str, caller: Caller) -> None:
        """Load a model the agent has just placed in the repository, as its state file says."""
        self._admin(caller, "load", name, lambda: self._manager.load(name))

    def pin(self, name: str, version: int, caller: Caller) -> None:
        self._admin(caller, "pin", name, lambda: self._manager.pin(name, version))

    def retire(self, name: str, version: int, reason: str, caller: Caller) -> None:
        self._admin(caller, "retire", name, lambda: self._manager.retire(name, version, reason))

    def stats(self, name: str, version: int) -> ModelStats | None:
        try:
            status = self._manager.entry(name).versions.get(version)
        except NotFound:
            return None
        return None if status is None or status.state is not State.READY else status.stats

    def _admin(
        self, caller: Caller, action: str, name: str, run: Callable[[], T], refused_if_unready: bool = False
    ) -> T:
        self._access.require(caller, ADMIN, transport=TRANSPORT, action=action)
        error: Exception | None = None
        try:
            result = run()
            if refused_if_unready and isinstance(result, VersionStatus) and result.state is not State.READY:
                error = ModelLoadError(result.reason)
            return result
        except Exception as exc:
            error = exc
            raise
        finally:
            self._access.admin_action(caller, TRANSPORT, action, name, error)
