"""Text formats some settings take (a time window), parsed once here for the check and the user."""

from __future__ import annotations


def parse_window(text: str) -> tuple[int, int] | None:
    """'HH:MM-HH:MM' as (start, end) minutes after midnight (end < start: the window spans midnight);
    None for an empty text (any time). ValueError says what is wrong."""
    if not text.strip():
        return None
    parts = text.strip().split("-")
    if len(parts) != 2:
        raise ValueError("one '-' between two times")
    minutes = []
    for part in parts:
        hh, sep, mm = part.strip().partition(":")
        if not (sep and hh.isascii() and hh.isdigit() and mm.isascii() and mm.isdigit() and len(mm) == 2):
            raise ValueError(f"{part.strip()!r} is not HH:MM")
        if int(hh) > 23 or int(mm) > 59:
            raise ValueError(f"{part.strip()!r} is not a time of day")
        minutes.append(int(hh) * 60 + int(mm))
    if minutes[0] == minutes[1]:
        raise ValueError("an empty window")
    return minutes[0], minutes[1]


def check_window(value: str) -> str | None:
    try:
        parse_window(value)
    except ValueError as exc:
        return f"must be HH:MM-HH:MM (local time) or empty: {exc}"
    return None
