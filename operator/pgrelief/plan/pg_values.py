"""PostgreSQL time values as the server spells them, compared by what they mean.

A policy says ``10m``; a role's config may hold ``600s``, ``600000`` or ``10min``, and
pg_settings reports ``600000`` with a unit of ``ms``. Limits and revert both decide "is this
already so?" by comparing such values, so the reading and writing of PostgreSQL's own units
(GUC syntax, where ``m`` is not a unit) lives here once, apart from the decisions.
"""

from __future__ import annotations

import re

from pgrelief.durations import parse_duration
from pgrelief.snapshot import Setting

# PostgreSQL's time units (GUC syntax), in milliseconds; 'm' is not one of them.
PG_TIME_UNITS_MS: dict[str, float] = {
    "us": 0.001,
    "ms": 1.0,
    "s": 1000.0,
    "min": 60_000.0,
    "h": 3_600_000.0,
    "d": 86_400_000.0,
}
_PG_TIME_VALUE = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*(us|ms|s|min|h|d)?\s*")


def policy_ms(text: str) -> int:
    """A policy duration (``1500ms``, ``5m``) in whole milliseconds."""
    return round(parse_duration(text) * 1000)


def format_pg_duration(milliseconds: int) -> str:
    """A PostgreSQL time value (GUC syntax): '0', '250ms', '60s'."""
    if milliseconds == 0:
        return "0"
    if milliseconds % 1000:
        return f"{milliseconds}ms"
    return f"{milliseconds // 1000}s"


def pg_value_ms(value: str, default_unit: str | None) -> float | None:
    """A PostgreSQL time value in milliseconds; a bare number is in ``default_unit``."""
    match = _PG_TIME_VALUE.fullmatch(value)
    if match is None:
        return None
    unit = match.group(2) or default_unit
    if unit not in PG_TIME_UNITS_MS:
        return None
    return float(match.group(1)) * PG_TIME_UNITS_MS[unit]


def same_pg_value(left: str, right: str, default_unit: str | None) -> bool:
    """Equal as written, or the same time in any spelling PostgreSQL accepts."""
    if left == right:
        return True
    left_ms, right_ms = pg_value_ms(left, default_unit), pg_value_ms(right, default_unit)
    return left_ms is not None and left_ms == right_ms


def setting_text(setting: Setting) -> str:
    """A pg_settings value as PostgreSQL reads it back: time settings carry their unit."""
    if setting.unit in PG_TIME_UNITS_MS:
        milliseconds = pg_value_ms(setting.setting, setting.unit)
        if milliseconds is not None and milliseconds >= 0 and milliseconds == int(milliseconds):
            return format_pg_duration(int(milliseconds))
    return setting.setting


def setting_number(setting: Setting) -> float | None:
    """A pg_settings value as a number comparable across units (time in milliseconds)."""
    if setting.unit in PG_TIME_UNITS_MS:
        return pg_value_ms(setting.setting, setting.unit)
    try:
        return float(setting.setting)
    except ValueError:
        return None
