"""pg_settings dumps, and the slot arithmetic a live observation would have read.

A dump rarely says everything: what it lacks is PostgreSQL's default (``DEFAULT_SETTINGS``),
and the diagnosis names each assumed setting so nobody mistakes a default for a fact.

Three shapes arrive: ``select * from pg_settings`` (raw values with a ``unit`` column and the
server-wide ``reset_val``), ``select name, setting from pg_settings`` (raw values, no unit) and
``SHOW ALL`` (values as people write them: ``128MB``, ``5min``). Values without a unit column
get the unit PostgreSQL defines for that setting, or are converted from the unit they carry,
so ``shared_buffers`` means the same bytes whichever way it was dumped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from pgrelief.dumps.tables import Table, preview
from pgrelief.errors import DumpError
from pgrelief.snapshot import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_RESERVED,
    DEFAULT_SUPERUSER_RESERVED,
    ServerFacts,
    Setting,
)

# PostgreSQL's defaults, used for what a dump does not say: (setting, unit, context, since).
# ``since`` is the first server_version_num having the setting (skipped for older servers).
DEFAULT_SETTINGS: Mapping[str, tuple[str, str | None, str, int]] = {
    "max_connections": (str(DEFAULT_MAX_CONNECTIONS), None, "postmaster", 0),
    "superuser_reserved_connections": (str(DEFAULT_SUPERUSER_RESERVED), None, "postmaster", 0),
    "reserved_connections": (str(DEFAULT_RESERVED), None, "postmaster", 160000),
    "shared_buffers": ("16384", "8kB", "postmaster", 0),
    "work_mem": ("4096", "kB", "user", 0),
    "maintenance_work_mem": ("65536", "kB", "user", 0),
    "temp_buffers": ("1024", "8kB", "user", 0),
    "autovacuum_max_workers": ("3", None, "postmaster", 0),
    "max_worker_processes": ("8", None, "postmaster", 0),
    "statement_timeout": ("0", "ms", "user", 0),
    "lock_timeout": ("0", "ms", "user", 0),
    "idle_in_transaction_session_timeout": ("0", "ms", "user", 0),
    "idle_session_timeout": ("0", "ms", "user", 140000),
    "tcp_keepalives_idle": ("0", "s", "user", 0),
    "tcp_keepalives_interval": ("0", "s", "user", 0),
    "tcp_keepalives_count": ("0", None, "user", 0),
    "client_connection_check_interval": ("0", "ms", "user", 140000),
}

HOW_TO_SETTINGS = (
    "expected the output of \\copy (select * from pg_settings) to 'file.csv' csv header, "
    'of psql -At -c "select json_agg(s) from pg_settings s", or psql\'s output of SHOW ALL'
)
# The unit pg_settings gives each setting pgrelief reads: what a bare number means.
KNOWN_UNITS: Mapping[str, str] = {
    **{name: unit for name, (_, unit, _, _) in DEFAULT_SETTINGS.items() if unit},
    "autovacuum_work_mem": "kB",
}
_MEMORY = {"B": 1, "kB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_TIME_MS = {
    "us": 0.001,
    "ms": 1.0,
    "s": 1000.0,
    "min": 60_000.0,
    "h": 3_600_000.0,
    "d": 86_400_000.0,
}
_WITH_UNIT = re.compile(r"(-?[0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)")


def server_facts(settings: Mapping[str, Setting], source: str = "settings") -> ServerFacts:
    """Slot arithmetic from dumped settings, PostgreSQL's defaults for what is missing."""
    version = _version_num(settings)
    complete = dict(settings)
    assumed = []
    for name, (value, unit, context, since) in DEFAULT_SETTINGS.items():
        if name in complete or (version is not None and version < since):
            continue
        complete[name] = Setting(name=name, setting=value, unit=unit, context=context)
        assumed.append(name)

    def number(name: str, default: int) -> int:
        found = complete.get(name)
        if found is None:
            return default
        try:
            return found.as_int()
        except ValueError:
            raise DumpError(f"{source}: {name} is {found.setting!r}, not a number") from None

    return ServerFacts(
        version_num=version,
        max_connections=number("max_connections", DEFAULT_MAX_CONNECTIONS),
        superuser_reserved_connections=number(
            "superuser_reserved_connections", DEFAULT_SUPERUSER_RESERVED
        ),
        reserved_connections=number("reserved_connections", DEFAULT_RESERVED),
        settings=complete,
        assumed=tuple(assumed),
    )


def settings_from(table: Table) -> dict[str, Setting]:
    """pg_settings (or SHOW ALL) rows by name; ``DumpError`` if the table is neither."""
    name_at, setting_at = table.index("name"), table.index("setting")
    if name_at is None or setting_at is None:
        missing = [c for c in ("name", "setting") if table.index(c) is None]
        raise DumpError(
            f"{table.path}: not a pg_settings dump: missing column(s) {', '.join(missing)} "
            f"(found: {preview(table.columns)}); {HOW_TO_SETTINGS}"
        )
    unit_at, context_at = table.index("unit"), table.index("context")
    # reset_val is the server-wide value (what observe reads too); `setting` is the dumping
    # session's own, e.g. 0 for tcp_keepalives_* when psql came over the Unix socket.
    reset_at = table.index("reset_val")
    settings: dict[str, Setting] = {}
    for row in table.rows:
        name = row[name_at]
        if not name:
            continue
        context = row[context_at] if context_at is not None else None
        value = row[setting_at]
        if reset_at is not None and row[reset_at] not in (None, ""):
            value = row[reset_at]
        text = "" if value is None else str(value)
        if unit_at is None:
            text, unit = _without_unit_column(str(name), text)
        else:
            unit = str(row[unit_at]) if row[unit_at] else None
        settings[str(name)] = Setting(
            name=str(name),
            setting=text,
            unit=unit,
            context=str(context) if context else None,
        )
    return settings


def _without_unit_column(name: str, text: str) -> tuple[str, str | None]:
    """(value, unit) as pg_settings would say it, for a dump without the unit column."""
    unit = KNOWN_UNITS.get(name)
    found = _WITH_UNIT.fullmatch(text.strip())
    if unit is None or found is None:
        return text, unit
    number, suffix = found.groups()
    if not suffix:
        return number, unit  # a raw pg_settings value: in the setting's own unit
    if suffix in _MEMORY and unit in _memory_units():
        return _plain(float(number) * _MEMORY[suffix]), "B"
    if suffix in _TIME_MS and unit in _TIME_MS:
        return _plain(float(number) * _TIME_MS[suffix]), "ms"
    return text, unit


def _memory_units() -> frozenset[str]:
    return frozenset({"B", "kB", "8kB", "MB", "16MB"})


def _plain(number: float) -> str:
    return str(int(number)) if number == int(number) else str(number)


def _version_num(settings: Mapping[str, Setting]) -> int | None:
    found = settings.get("server_version_num")
    try:
        return found.as_int() if found is not None else None
    except ValueError:
        return None
