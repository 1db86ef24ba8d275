"""How a setting is declared: its default, its help text and what values it may take. Each section
of the settings (here and in its own module, such as cluster.py) declares its fields with `option`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field
from typing import Any

_KIND = {int: "an integer", float: "a number", str: "text", bool: "true or false"}


class SettingsError(ValueError):
    """A setting with a value it cannot take; the message names the setting."""


Check = Callable[[Any], str | None]  # a text's format: what the value must be ("must ..."), or None when it is


def option(
    default: Any,
    help: str,
    low: float | None = None,
    high: float | None = None,
    *choices: str,
    check: Check | None = None,
) -> Any:
    meta = {"help": help, "low": low, "high": high, "choices": choices, "check": check}
    return field(default=default, metadata=meta)
