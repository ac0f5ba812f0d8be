"""The ConnectionPolicy CustomResourceDefinition, generated from the pydantic model.

The model in ``pgrelief.policy`` is the one source of truth; this module turns its JSON
schema into the *structural* OpenAPI v3 schema Kubernetes requires (no ``$ref``, a ``type``
on every node, no ``anyOf``, no ``title``), so the API server
validates and documents (``kubectl explain``) exactly the fields the code reads. The YAML in
``crds/`` is this module's output; a test fails when the two drift apart.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from pgrelief.policy import (
    API_GROUP,
    API_VERSION,
    KIND,
    ConnectionPolicySpec,
    ConnectionPolicyStatus,
)

PLURAL = "connectionpolicies"
SINGULAR = "connectionpolicy"
SHORT_NAMES = ("cpol",)
CRD_NAME = f"{PLURAL}.{API_GROUP}"
CRD_FILE = f"{CRD_NAME}.yaml"

# JSON Schema keywords a structural CRD schema may carry (apiextensions.k8s.io/v1 JSONSchemaProps).
_ALLOWED = frozenset(
    {
        "type",
        "format",
        "description",
        "default",
        "enum",
        "nullable",
        "properties",
        "required",
        "items",
        "additionalProperties",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minLength",
        "maxLength",
        "pattern",
        "minItems",
        "maxItems",
        "uniqueItems",
        "minProperties",
        "maxProperties",
        "multipleOf",
        "x-kubernetes-list-type",
        "x-kubernetes-list-map-keys",
        "x-kubernetes-map-type",
        "x-kubernetes-validations",
        "x-kubernetes-preserve-unknown-fields",
        "x-kubernetes-int-or-string",
        "x-kubernetes-embedded-resource",
    }
)


_DESCRIPTION = (
    "ConnectionPolicy tells pgrelief how to keep one PostgreSQL server's connection slots free: "
    "when the server is under pressure, which stale sessions it may terminate (within a budget, "
    "never protected ones), which role/database limits and timeouts to apply, and whether to run "
    "PgBouncer in front of it."
)


class SchemaError(ValueError):
    """The model uses a JSON Schema construct a structural CRD schema cannot express."""


def crd_manifest() -> dict[str, Any]:
    """The CustomResourceDefinition (apiextensions.k8s.io/v1) for ConnectionPolicy."""
    spec_schema = structural(ConnectionPolicySpec.model_json_schema(by_alias=True), spec=True)
    status_schema = structural(ConnectionPolicyStatus.model_json_schema(by_alias=True))
    schema = {
        "type": "object",
        "description": _DESCRIPTION,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "pgrelief"},
        },
        "spec": {
            "group": API_GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["pgrelief"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": _printer_columns(),
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def crd_yaml() -> str:
    """``crd_manifest()`` as YAML, in a stable order (the committed file is compared to it)."""
    header = (
        "# Generated from the ConnectionPolicy model (operator/pgrelief/policy/) by "
        "`pgrelief crd`.\n# Do not edit: change the model and regenerate.\n"
    )
    body = yaml.safe_dump(crd_manifest(), sort_keys=False, allow_unicode=True, width=100)
    return header + body


def _printer_columns() -> list[dict[str, Any]]:
    return [
        {
            "name": "Ready",
            "type": "string",
            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
        },
        {
            "name": "Pressure",
            "type": "string",
            "jsonPath": ".status.pressure",
            "description": "Pressure level of the last diagnosis",
        },
        {
            "name": "Utilization",
            "type": "integer",
            "jsonPath": ".status.utilizationPercent",
            "description": "Client backends as a percent of usable slots",
        },
        {
            "name": "Mode",
            "type": "string",
            "jsonPath": ".spec.remediation.mode",
        },
        {
            "name": "Age",
            "type": "date",
            "jsonPath": ".metadata.creationTimestamp",
        },
    ]


def structural(schema: dict[str, Any], *, spec: bool = False) -> dict[str, Any]:
    """A pydantic JSON schema rewritten as a structural CRD schema.

    With ``spec``, optional object-valued fields without required fields of their own get
    ``default: {}`` so the API server fills in their nested defaults (and
    ``.spec.remediation.mode`` is always there for the printer column).
    """
    # ``X | None`` becomes plain X, not ``nullable``: the API server then prunes an explicit
    # null, which the model reads as absent anyway, and CEL rules never see a null.
    definitions = schema.get("$defs", {})
    return _convert(schema, definitions, spec_defaults=spec, seen=())


def _convert(
    node: dict[str, Any],
    definitions: dict[str, Any],
    *,
    spec_defaults: bool,
    seen: tuple[str, ...],
) -> dict[str, Any]:
    node = dict(node)
    if "$ref" in node:
        name = node.pop("$ref").rsplit("/", 1)[-1]
        if name in seen:
            raise SchemaError(f"recursive model {name} cannot be inlined")
        target = copy.deepcopy(definitions[name])
        # The referencing field's own keywords (its description, default) win.
        target.update({k: v for k, v in node.items() if k != "allOf"})
        return _convert(target, definitions, spec_defaults=spec_defaults, seen=(*seen, name))
    for combinator in ("anyOf", "oneOf"):
        if combinator in node:
            choices = node.pop(combinator)
            options = [o for o in choices if o.get("type") != "null"]
            if len(options) != 1:
                raise SchemaError(f"{combinator} with several non-null options: {options}")
            merged = {**options[0], **node}
            converted = _convert(merged, definitions, spec_defaults=spec_defaults, seen=seen)
            if len(options) < len(choices) and converted.get("default", ...) is None:
                del converted["default"]
            return _ordered(converted)
    if "allOf" in node:
        parts = node.pop("allOf")
        if len(parts) != 1:
            raise SchemaError("allOf with several parts")
        merged = dict(parts[0])
        merged.update(node)
        return _convert(merged, definitions, spec_defaults=spec_defaults, seen=seen)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in _ALLOWED:
            continue
        if key == "description":
            out[key] = _text(str(value))
        elif key == "properties":
            out[key] = {
                name: _convert(child, definitions, spec_defaults=spec_defaults, seen=seen)
                for name, child in value.items()
            }
        elif key in ("items",) or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = _convert(value, definitions, spec_defaults=spec_defaults, seen=seen)
        elif key == "additionalProperties":
            # `false` (extra='forbid') is what pruning and strict field validation already do,
            # and Kubernetes forbids it next to `properties`.
            continue
        else:
            out[key] = value
    if "type" not in out and "enum" in out:
        out["type"] = "string"
    if spec_defaults and "properties" in out:
        required = set(out.get("required", ()))
        for name, child in out["properties"].items():
            if (
                name not in required
                and child.get("type") == "object"
                and "properties" in child
                and "default" not in child
                and not child.get("required")
            ):
                out["properties"][name] = _ordered({**child, "default": {}})
    return _ordered(out)


# Keys first in the order a reader expects, the rest after in their given order.
_ORDER = ("description", "type", "format", "nullable", "default", "enum")


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    first = {k: node[k] for k in _ORDER if k in node}
    return first | {k: v for k, v in node.items() if k not in first}


def _text(text: str) -> str:
    return " ".join(text.split())
