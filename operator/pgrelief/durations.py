"""Durations as users write them in policies and on the command line.

Policies and flags carry durations as strings (``250ms``, ``10s``, ``5m``, ``1h``, or a
combination such as ``1h30m``); PostgreSQL settings use their own units. Parsing lives here
once so every entry point rejects the same bad input with the same message.
"""

from __future__ import annotations

import re

_UNIT_SECONDS: dict[str, float] = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|min|s|m|h|d)")


class DurationError(ValueError):
    """A duration string that cannot be read."""


def parse_duration(text: str) -> float:
    """Return the number of seconds in ``text`` (``"250ms"`` -> 0.25, ``"1h30m"`` -> 5400.0).

    A bare number is refused: a unit-less ``30`` is ambiguous between PostgreSQL's
    milliseconds and a human's seconds.
    """
    cleaned = text.strip().replace(" ", "")
    if not cleaned:
        raise DurationError("empty duration; expected e.g. 250ms, 10s, 5m, 1h")
    position = 0
    total = 0.0
    for match in _PART.finditer(cleaned):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position != len(cleaned):
        raise DurationError(f"cannot read duration {text!r}; expected e.g. 250ms, 10s, 5m, 1h")
    return total


def format_duration(seconds: float) -> str:
    """The shortest exact string ``parse_duration`` reads back to ``seconds``."""
    milliseconds = round(seconds * 1000)
    if milliseconds % 1000:
        return f"{milliseconds}ms"
    whole = milliseconds // 1000
    for unit, size in (("h", 3600), ("m", 60)):
        if whole and whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def human_age(seconds: float | None) -> str:
    """A short human reading of an age for reports (``3d4h``, ``12m5s``, ``0.4s``)."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
