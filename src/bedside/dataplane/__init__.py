"""The protocol-neutral dataplane every transport and stream goes through."""

from bedside.dataplane.context import call_context
from bedside.dataplane.dataplane import Dataplane
from bedside.dataplane.types import CallContext, ModelContract

__all__ = ["CallContext", "Dataplane", "ModelContract", "call_context"]
