"""The DDL pgrelief performs or advises, described once, without deciding how it is quoted.

The same ALTER used to be written three times: as the text an action shows, as the statement
``act`` executes, and as the fix text a diagnosis prints. Each is now a rendering of one
``Statement`` built here: a template whose ``{}`` holes are filled by parts that say what
they are (an object name, a configuration parameter name, or a value). ``advice`` renders
the text with its quoting; ``act`` renders ``psycopg.sql.Composed`` with ``Identifier`` and
``Literal``, because DDL cannot take server-side parameters. Being pure data, the description
stays in the pure core: this module imports nothing, psycopg least of all.

Templates are written with their key words in upper case and hold nothing case-sensitive
(names and values are parts), so a renderer may lower-case a template without changing what
PostgreSQL reads.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Name:
    """An object name (a role, a database): an SQL identifier."""

    value: str


@dataclass(frozen=True, slots=True)
class Parameter:
    """A configuration parameter name (``statement_timeout``): an SQL identifier too."""

    value: str


@dataclass(frozen=True, slots=True)
class Value:
    """A literal: a string, or an integer written as a number."""

    value: str | int


Part = Name | Parameter | Value


@dataclass(frozen=True, slots=True)
class Statement:
    """One SQL statement: ``template`` with one ``{}`` per part, no trailing semicolon."""

    template: str
    parts: tuple[Part, ...] = ()

    def __post_init__(self) -> None:
        # A template with other braces would be read differently by str.format and psycopg.
        holes = self.template.count("{}")
        if holes != len(self.parts) or self.template.count("{") != holes:
            raise ValueError(f"template {self.template!r} does not take {len(self.parts)} parts")


RELOAD_CONF = Statement("SELECT pg_reload_conf()")


def alter_role_connection_limit(role: str, limit: int) -> Statement:
    return Statement("ALTER ROLE {} CONNECTION LIMIT {}", (Name(role), Value(limit)))


def alter_database_connection_limit(database: str, limit: int) -> Statement:
    return Statement("ALTER DATABASE {} CONNECTION LIMIT {}", (Name(database), Value(limit)))


def alter_role_set(role: str, setting: str, value: str | None) -> Statement:
    """A per-role default (``RESET`` when ``value`` is None); it applies to new sessions."""
    if value is None:
        return Statement("ALTER ROLE {} RESET {}", (Name(role), Parameter(setting)))
    return Statement("ALTER ROLE {} SET {} = {}", (Name(role), Parameter(setting), Value(value)))


def alter_system_set(setting: str, value: str | int | None) -> Statement:
    """``ALTER SYSTEM SET`` (``RESET`` when ``value`` is None); ``RELOAD_CONF`` applies it."""
    if value is None:
        return Statement("ALTER SYSTEM RESET {}", (Parameter(setting),))
    return Statement("ALTER SYSTEM SET {} = {}", (Parameter(setting), Value(value)))
