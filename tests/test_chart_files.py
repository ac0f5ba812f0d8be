"""The chart's files that must agree with the rest of the repository, checked without helm:
its CRDs are the generated ones, and its values schema and defaults describe the same keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "pgrelief"


def test_the_chart_ships_the_generated_crds_byte_for_byte() -> None:
    ours = {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}
    shipped = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert sorted(shipped) == sorted(ours), "run `make crd`"
    for name, content in ours.items():
        assert shipped[name] == content, f"charts/pgrelief/crds/{name} differs: run `make crd`"


def _keys(values: dict[str, Any], schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths present on one side only (values.yaml defaults vs the schema's properties)."""
    missing: list[str] = []
    properties = schema.get("properties", {})
    for key, value in values.items():
        if key not in properties:
            missing.append(f"{path}{key}: not in values.schema.json")
        elif isinstance(value, dict) and properties[key].get("properties"):
            missing += _keys(value, properties[key], f"{path}{key}.")
    for key in properties:
        if key not in values and key != "global":
            missing.append(f"{path}{key}: no default in values.yaml")
    return missing


def test_every_value_has_a_default_and_a_schema_entry() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    assert _keys(values, schema) == []


def test_every_object_of_the_schema_refuses_unknown_keys() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))

    def walk(node: dict[str, Any], path: str) -> list[str]:
        open_ = []
        if node.get("properties") is not None and node.get("additionalProperties") is not False:
            open_.append(path or "<root>")
        for key, child in node.get("properties", {}).items():
            open_ += walk(child, f"{path}.{key}")
        return open_

    assert walk(schema, "") == []
