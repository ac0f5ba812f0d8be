"""Policy errors that name each bad field by its path as written in YAML.

A policy is written by hand, so a mistake is reported as ``spec.remediation.terminate.idleAftr:
unknown field; did you mean 'idleAfter'?`` — one line per problem, never a pydantic dump.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Union

from pydantic import BaseModel, ValidationError

from pgrelief.errors import PgreliefError
from pgrelief.policy.spec import ConnectionPolicy, ConnectionPolicySpec


class PolicyError(PgreliefError):
    """A policy that cannot be used; the message names each bad field path and the reason."""

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = tuple(problems)
        self.source = source
        where = f"invalid policy {source}: " if source else "invalid policy: "
        super().__init__(where + "; ".join(self.problems))


def validate_policy(data: Any, source: str | None = None) -> ConnectionPolicy:
    """A ConnectionPolicy from plain data (one parsed YAML document), or PolicyError."""
    if not isinstance(data, Mapping):
        raise PolicyError([f"expected a mapping, got {_type_name(data)}"], source)
    try:
        return ConnectionPolicy.model_validate(data)
    except ValidationError as error:
        raise PolicyError(format_errors(error, ConnectionPolicy), source) from None


def validate_spec(data: Any, source: str | None = None) -> ConnectionPolicySpec:
    """The spec alone (the operator gets it from the custom resource), or PolicyError."""
    if not isinstance(data, Mapping):
        raise PolicyError([f"spec: expected a mapping, got {_type_name(data)}"], source)
    try:
        return ConnectionPolicySpec.model_validate(data)
    except ValidationError as error:
        raise PolicyError(
            format_errors(error, ConnectionPolicySpec, prefix=("spec",)), source
        ) from None


def format_errors(
    error: ValidationError, model: type[BaseModel], prefix: tuple[str | int, ...] = ()
) -> list[str]:
    """One ``path: reason`` line per pydantic error, paths spelled as in YAML."""
    lines: list[str] = []
    for item in error.errors(include_url=False):
        loc = tuple(item["loc"])
        message = str(item["msg"])
        kind = item["type"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        elif kind == "extra_forbidden":
            message = _unknown_field_message(model, loc)
        elif kind == "missing":
            message = "required field is missing"
        elif kind in _SHOW_INPUT and _is_scalar(item.get("input")):
            message += f" (got {item['input']!r})"
            if kind == "string_type" and isinstance(item["input"], int | float):
                message += "; quote it, and give durations a unit, e.g. '10s'"
        line = f"{_path(prefix + loc)}: {message}"
        if line not in lines:
            lines.append(line)
    return lines


_SHOW_INPUT = frozenset(
    {"literal_error", "string_type", "int_type", "bool_type", "int_from_float", "dict_type"}
)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool) or value is None


def _path(loc: Sequence[str | int]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(document)"


def _unknown_field_message(model: type[BaseModel], loc: tuple[str | int, ...]) -> str:
    parent = _model_at(model, loc[:-1])
    if parent is None:
        return "unknown field"
    allowed = [info.alias or name for name, info in parent.model_fields.items()]
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown field{hint} (allowed: {', '.join(allowed)})"


def _model_at(model: type[BaseModel], loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = next((f for n, f in current.model_fields.items() if part in (n, f.alias)), None)
        if field is None:
            return None
        current = _model_in(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _model_in(annotation: Any) -> Any:
    """The model class inside ``X | None`` or ``list[X]``, if any."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _type_name(value: Any) -> str:
    if value is None:
        return "an empty document"
    return {list: "a list", str: "a string", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )
