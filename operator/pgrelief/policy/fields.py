"""What the ConnectionPolicy models share: the API identity, field types and their checks.

Every spec and status model derives from ``PolicyModel`` (camelCase aliases, unknown fields and
type coercion refused, frozen), and the string-typed fields (durations, PostgreSQL names,
networks) carry a validator for pgrelief and a JSON-schema pattern or bound for the API server,
so the two read a value the same way. The API group/version is written once, as the type of
``ConnectionPolicy.apiVersion``; the constants the CRD and the policy file reader use derive
from it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

from pgrelief.durations import DurationError, parse_duration
from pgrelief.pgbouncer_ini import is_ini_key

ApiVersion = Literal["pgrelief.dev/v1alpha1"]
Kind = Literal["ConnectionPolicy"]
API_VERSION_FULL: ApiVersion = get_args(ApiVersion)[0]
API_GROUP, API_VERSION = API_VERSION_FULL.split("/")
KIND: Kind = get_args(Kind)[0]

# PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes; a longer name in a policy would
# silently address a different (truncated) role, so it is refused instead.
MAX_IDENTIFIER_BYTES = 63
INT4_MAX = 2**31 - 1

# The same grammar as pgrelief.durations.parse_duration, for the API server's own validation.
DURATION_PATTERN = r"^ *([0-9]+(\.[0-9]+)? *(ms|min|s|m|h|d) *)+$"
# What PgBouncer's ini parser reads as a key (pgbouncer_ini.is_ini_key), for the API server.
PGBOUNCER_KEY_PATTERN = r"^[0-9A-Za-z_.-]+$"


def _check_duration(text: str) -> str:
    try:
        parse_duration(text)
    except DurationError as error:
        raise ValueError(str(error)) from None
    return text


def _check_positive_duration(text: str) -> str:
    if parse_duration(_check_duration(text)) <= 0:
        raise ValueError(f"duration {text!r} must be greater than zero")
    return text


def _check_interval(text: str) -> str:
    if parse_duration(_check_duration(text)) < 0.1:
        raise ValueError(f"interval {text!r} is too short; the minimum is 100ms")
    return text


def _check_milliseconds(text: str) -> str:
    # These map to PostgreSQL settings whose unit is the millisecond: a fraction of one would
    # be rounded by the server and then never compare equal to what the policy says.
    seconds = parse_duration(_check_duration(text))
    if abs(seconds * 1000 - round(seconds * 1000)) > 1e-6:
        raise ValueError(f"duration {text!r} must be a whole number of milliseconds")
    if round(seconds * 1000) > INT4_MAX:
        raise ValueError(f"duration {text!r} is longer than PostgreSQL accepts (about 24 days)")
    return text


def _check_identifier(name: str) -> str:
    if not name:
        raise ValueError("name must not be empty")
    if "\x00" in name:
        raise ValueError("name must not contain a NUL character")
    size = len(name.encode("utf-8"))
    if size > MAX_IDENTIFIER_BYTES:
        raise ValueError(
            f"name is {size} bytes in UTF-8; PostgreSQL names are at most "
            f"{MAX_IDENTIFIER_BYTES} bytes (longer ones are truncated)"
        )
    return name


def _check_pgbouncer_key(name: str) -> str:
    _check_identifier(name)
    if not is_ini_key(name):
        raise ValueError(
            f"{name!r} cannot be a pgbouncer.ini key: only letters, digits, _ . and - "
            "(PgBouncer's parser takes no quoting)"
        )
    return name


def _check_cidr(text: str) -> str:
    try:
        ipaddress.ip_network(text, strict=True)
    except ValueError as error:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not an IP network in CIDR notation: {error}") from None
        raise ValueError(f"{text!r} has host bits set; did you mean {loose}?") from None
    return text


_DURATION_SCHEMA = WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN})

Duration = Annotated[str, AfterValidator(_check_duration), _DURATION_SCHEMA]
"""A duration string as ``pgrelief.durations.parse_duration`` reads it: 250ms, 10s, 5m, 1h."""
PositiveDuration = Annotated[str, AfterValidator(_check_positive_duration), _DURATION_SCHEMA]
IntervalDuration = Annotated[str, AfterValidator(_check_interval), _DURATION_SCHEMA]
MillisecondDuration = Annotated[str, AfterValidator(_check_milliseconds), _DURATION_SCHEMA]
Identifier = Annotated[
    str,
    AfterValidator(_check_identifier),
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": MAX_IDENTIFIER_BYTES}),
]
Cidr = Annotated[str, AfterValidator(_check_cidr)]
PgBouncerKey = Annotated[
    str,
    AfterValidator(_check_pgbouncer_key),
    WithJsonSchema(
        {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_IDENTIFIER_BYTES,
            "pattern": PGBOUNCER_KEY_PATTERN,
        }
    ),
]
"""A PostgreSQL name that is also a pgbouncer.ini key as it is (a database clients ask for by
name, the lookup role): PgBouncer's parser takes no quoting."""
Percent = Annotated[int, Field(ge=1, le=100)]

Mode = Literal["Enforce", "DryRun", "Off"]
OnDelete = Literal["Keep", "Revert"]
SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


# Lists keyed by name: the API server itself rejects two entries for the same role/database.
LIST_BY_NAME: dict[str, Any] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["name"],
}
# Keeps the CEL rule below within the API server's cost budget.
MAX_PGBOUNCER_PARAMETERS = 100
MAX_PGBOUNCER_DATABASES = 100
MAX_PGBOUNCER_USERS = 1000
# Lists of names without duplicates: the API server refuses a second entry itself.
LIST_OF_NAMES: dict[str, Any] = {"x-kubernetes-list-type": "set"}


class PolicyModel(BaseModel):
    """The strict base of every policy model: camelCase in YAML, nothing unknown or coerced."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        strict=True,
        frozen=True,
        use_attribute_docstrings=False,
    )


def reject_duplicates(names: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what} {name!r} is listed more than once")
        seen.add(name)
