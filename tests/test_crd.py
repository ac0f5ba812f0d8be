"""The generated CRD: committed file in sync with the model, structurally valid for
Kubernetes, and (on a real API server) accepting the example policies while refusing the
invalid ones the model refuses."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from pgrelief.crd import CRD_FILE, crd_manifest, crd_yaml
from pgrelief.policy import ConnectionPolicySpec, ConnectionPolicyStatus, PolicyError, validate_spec
from pgrelief.policy_file import load_policy
from tests.runs import pgrelief

REPO = Path(__file__).resolve().parent.parent
CRD_PATH = REPO / "crds" / CRD_FILE
POLICY_FILES = sorted((REPO / "policies").glob("*.yaml"))
FORBIDDEN_KEYWORDS = {"$ref", "$defs", "definitions", "anyOf", "oneOf", "allOf", "not", "title"}
FORBIDDEN_KEYWORDS |= {"const", "discriminator", "examples"}


def schema() -> dict[str, Any]:
    version = crd_manifest()["spec"]["versions"][0]
    return version["schema"]["openAPIV3Schema"]


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path (properties, items and map values)."""
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_committed_crd_matches_the_model() -> None:
    assert CRD_PATH.read_text(encoding="utf-8") == crd_yaml(), (
        f"{CRD_PATH.relative_to(REPO)} is out of date: regenerate it with "
        f"`pgrelief crd > {CRD_PATH.relative_to(REPO)}`"
    )


def test_crd_yaml_is_stable() -> None:
    assert crd_yaml() == crd_yaml()
    assert yaml.safe_load(crd_yaml()) == crd_manifest()


def test_names_scope_and_version() -> None:
    crd = crd_manifest()
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == "connectionpolicies.pgrelief.dev"
    spec = crd["spec"]
    assert spec["group"] == "pgrelief.dev"
    assert spec["scope"] == "Namespaced"
    names = spec["names"]
    assert (names["kind"], names["plural"], names["singular"], names["shortNames"]) == (
        "ConnectionPolicy",
        "connectionpolicies",
        "connectionpolicy",
        ["cpol"],
    )
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_printer_columns() -> None:
    columns = {
        c["name"]: c for c in crd_manifest()["spec"]["versions"][0]["additionalPrinterColumns"]
    }
    assert columns["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Pressure"]["jsonPath"] == ".status.pressure"
    assert columns["Mode"]["jsonPath"] == ".spec.remediation.mode"
    assert (columns["Age"]["jsonPath"], columns["Age"]["type"]) == (
        ".metadata.creationTimestamp",
        "date",
    )


def test_schema_is_structural() -> None:
    root = schema()
    assert root["type"] == "object"
    assert root["properties"]["metadata"] == {"type": "object"}
    for path, node in walk(root):
        assert not FORBIDDEN_KEYWORDS & set(node), (
            f"{path}: {sorted(FORBIDDEN_KEYWORDS & set(node))}"
        )
        assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, (
            path
        )
        assert "nullable" not in node, path
        if node["type"] == "object":
            assert "properties" not in node or "additionalProperties" not in node, path
            assert node.get("additionalProperties", {}) is not False, path
            for name in node.get("required", []):
                assert name in node["properties"], f"{path}: required {name} is not a property"
        if node["type"] == "array":
            assert isinstance(node.get("items"), dict), path
            if node.get("x-kubernetes-list-type") == "map":
                item = node["items"]
                for key in node["x-kubernetes-list-map-keys"]:
                    assert key in item.get("required", []), f"{path}: map key {key} not required"
        if "enum" in node:
            assert all(isinstance(v, str) for v in node["enum"]), path
        if "default" in node:
            assert_valid(node["default"], node, path)
        if "pattern" in node:
            re.compile(node["pattern"])


def test_every_spec_and_status_field_is_documented() -> None:
    for part in ("spec", "status"):
        for path, node in walk(schema()["properties"][part], part):
            if path.endswith(("[]", "{}")):
                continue
            assert node.get("description"), f"{path} has no description"


def model_fields(model: type[BaseModel]) -> dict[str, Any]:
    """The camelCase field tree of a model, the way the CRD should spell it."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        annotation = info.annotation
        inner = _model_inside(annotation)
        out[info.alias or name] = model_fields(inner) if inner else None
    return out


def _model_inside(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_inside(arg)
        if found:
            return found
    return None


def crd_fields(node: dict[str, Any]) -> dict[str, Any] | None:
    if node["type"] == "array":
        node = node["items"]
    if "properties" not in node:
        return None
    return {name: crd_fields(child) for name, child in node["properties"].items()}


def test_crd_has_exactly_the_model_fields() -> None:
    root = schema()["properties"]
    assert crd_fields(root["spec"]) == model_fields(ConnectionPolicySpec)
    assert crd_fields(root["status"]) == model_fields(ConnectionPolicyStatus)
    assert "phase" not in root["status"]["properties"]


def test_status_conditions_follow_the_kubernetes_convention() -> None:
    conditions = schema()["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert set(item["properties"]) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }
    assert item["required"] == ["type", "status"]
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert item["properties"]["lastTransitionTime"]["format"] == "date-time"
    status = schema()["properties"]["status"]["properties"]
    assert status["observedGeneration"]["type"] == "integer"
    assert status["utilizationPercent"]["type"] == "integer"
    assert status["pressure"]["type"] == "string"
    assert status["lastDiagnosisTime"]["format"] == "date-time"


# ---- a small structural validator: the CRD and the model agree on the examples -------------


def assert_valid(value: Any, node: dict[str, Any], path: str) -> None:
    problems = list(validate(value, node, path))
    assert not problems, problems


def validate(value: Any, node: dict[str, Any], path: str) -> Iterator[str]:
    kind = node["type"]
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
    }
    if not checks[kind](value):
        yield f"{path}: not {kind}"
        return
    if "enum" in node and value not in node["enum"]:
        yield f"{path}: {value!r} not in enum"
    if "pattern" in node and not re.search(node["pattern"], value):
        yield f"{path}: {value!r} does not match pattern"
    if "minimum" in node and value < node["minimum"]:
        yield f"{path}: below minimum"
    if "maximum" in node and value > node["maximum"]:
        yield f"{path}: above maximum"
    if "minLength" in node and len(value) < node["minLength"]:
        yield f"{path}: too short"
    if "maxLength" in node and len(value) > node["maxLength"]:
        yield f"{path}: too long"
    if kind == "object":
        properties = node.get("properties")
        for name in node.get("required", []):
            if name not in value:
                yield f"{path}.{name}: required"
        for name, child in value.items():
            if properties is not None:
                if name not in properties:
                    yield f"{path}.{name}: unknown field"
                else:
                    yield from validate(child, properties[name], f"{path}.{name}")
            elif isinstance(node.get("additionalProperties"), dict):
                yield from validate(child, node["additionalProperties"], f"{path}.{name}")
    if kind == "array":
        for index, item in enumerate(value):
            yield from validate(item, node["items"], f"{path}[{index}]")


@pytest.mark.parametrize("path", POLICY_FILES, ids=lambda p: p.name)
def test_example_policies_validate_against_the_crd_schema(path: Path) -> None:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert_valid(document, schema(), "")


_VALUE_LINE = re.compile(r"^\s*(- |[\w.-]+:\s*[^\s#])")


@pytest.mark.parametrize("path", POLICY_FILES, ids=lambda p: p.name)
def test_example_policies_are_commented_line_by_line(path: Path) -> None:
    """Users start from these files: every line that sets something says why."""
    bare = [
        f"{path.name}:{number}: {line.strip()}"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if _VALUE_LINE.match(line) and "#" not in line
    ]
    assert bare == []


def test_the_examples_cover_the_starting_points() -> None:
    modes = {p.name: load_policy(p).spec for p in POLICY_FILES}
    assert modes["dryrun-starter.yaml"].remediation.mode == "DryRun"
    assert modes["pgbouncer.yaml"].pgbouncer.pool_mode == "transaction"
    reporting = modes["reporting-limits.yaml"].limits.roles[0]
    assert reporting.connection_limit is not None and reporting.statement_timeout is not None
    emergency = modes["emergency-strict.yaml"]
    assert emergency.remediation.mode == "Enforce" and not emergency.remediation.only_under_pressure
    assert emergency.limits.on_delete == "Revert"


@pytest.mark.parametrize("path", POLICY_FILES, ids=lambda p: p.name)
def test_example_policies_load_in_pgrelief_run(path: Path, pg_server: Any, tmp_path: Path) -> None:
    """Each example runs one dry cycle against a real server (its host and login replaced by
    --dsn): it loads, plans, and reports without changing anything."""
    audit = tmp_path / "audit.jsonl"
    done = pgrelief("run", "--policy", str(path), "--dsn", pg_server.dsn(), "--once",
                    "--dry-run", "--audit-file", str(audit),
                    "--state-file", str(tmp_path / "state.json"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "[dry run]" in done.stdout
    records = [json.loads(line) for line in audit.read_text(encoding="utf-8").splitlines()]
    assert all(r["dry_run"] for r in records)
    assert not [r for r in records if r["outcome"] == "done"]


@pytest.mark.parametrize(
    "bad_spec",
    [
        {"remediation": {"mode": "enforce"}},
        {"limits": {"roles": [{"name": "app", "connectionLimit": -2}]}},
        {"remediation": {"terminate": {"idleAfter": "5 minutes"}}},
        {"remediation": {"terminate": {"idleAftr": "5m"}}},
        {"interval": 10},
        {"pressure": {"warningPercent": 0}},
        {"limits": {"roles": [{"name": "x" * 64}]}},
        {"pgbouncer": {"poolMode": "pooled"}},
    ],
)
def test_crd_schema_and_model_both_refuse(bad_spec: dict[str, Any]) -> None:
    with pytest.raises(PolicyError):
        validate_spec(bad_spec)
    assert list(validate(bad_spec, schema()["properties"]["spec"], "spec"))


# ---- on a real API server ------------------------------------------------------------------


def _apply(kube: Any, manifest: str, *, check: bool = True) -> Any:
    return kube.kubectl(
        "apply",
        "--server-side",
        "--field-manager=pgrelief-test",
        "--validate=strict",
        "-f",
        "-",
        input=manifest,
        check=check,
    )


def _policy(namespace: str, name: str, spec: dict[str, Any]) -> str:
    return json.dumps(
        {
            "apiVersion": "pgrelief.dev/v1alpha1",
            "kind": "ConnectionPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
    )


@pytest.mark.kube
def test_crd_on_a_real_api_server(kube_apiserver: Any) -> None:
    kube = kube_apiserver
    _apply(kube, CRD_PATH.read_text(encoding="utf-8"))
    kube.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", f"crd/{CRD_PATH.name[:-5]}"
    )

    # Every example policy is accepted with strict server-side field validation.
    for path in POLICY_FILES:
        namespace = load_policy(path).metadata.namespace
        assert namespace
        kube.kubectl("create", "namespace", namespace, check=False)
        _apply(kube, path.read_text(encoding="utf-8"))

    namespace = f"t-{uuid.uuid4().hex[:10]}"
    kube.kubectl("create", "namespace", namespace)

    # Defaults land on the stored object: the Mode column always has a value.
    _apply(kube, _policy(namespace, "minimal", {"postgres": {"host": "db"}}))
    stored = json.loads(
        kube.kubectl("get", "cpol", "minimal", "-n", namespace, "-o", "json").stdout
    )
    assert stored["spec"]["remediation"]["mode"] == "DryRun"
    assert stored["spec"]["remediation"]["budget"] == {"maxPerCycle": 10, "maxPerHour": 100}
    assert stored["spec"]["pressure"] == {"warningPercent": 70, "criticalPercent": 90}
    assert validate_spec(stored["spec"]).postgres.host == "db"

    # The status subresource takes the operator's status, and the printer columns show it.
    status = {
        "status": {
            "observedGeneration": 1,
            "pressure": "warning",
            "utilizationPercent": 83,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "Observed",
                    "message": "diagnosed",
                    "lastTransitionTime": "2025-01-15T12:00:00Z",
                    "observedGeneration": 1,
                }
            ],
        }
    }
    kube.kubectl(
        "patch",
        "cpol",
        "minimal",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )
    table = kube.kubectl("get", "cpol", "minimal", "-n", namespace).stdout.splitlines()
    assert table[0].split()[:6] == ["NAME", "READY", "PRESSURE", "UTILIZATION", "MODE", "AGE"]
    assert table[1].split()[:5] == ["minimal", "True", "warning", "83", "DryRun"]

    # Invalid policies are refused by the API server itself, each for its reason.
    refusals = {
        "bad-mode": ({"remediation": {"mode": "enforce"}}, "Unsupported value"),
        "negative-limit": (
            {"limits": {"roles": [{"name": "app", "connectionLimit": -2}]}},
            "should be greater than or equal to -1",
        ),
        "bad-duration": (
            {"remediation": {"terminate": {"idleAfter": "5 minutes"}}},
            "should match",
        ),
        "unknown-field": (
            {"remediation": {"terminate": {"idleAftr": "5m"}}},
            "field not declared in schema",
        ),
        "percent-order": (
            {"pressure": {"warningPercent": 95, "criticalPercent": 90}},
            "warningPercent must be lower than criticalPercent",
        ),
        "reserved-key": (
            {"pgbouncer": {"parameters": {"pool_mode": "session"}}},
            "keys pgrelief sets itself cannot be overridden",
        ),
        "duplicate-role": (
            {"limits": {"roles": [{"name": "app"}, {"name": "app"}]}},
            "duplicate entries for key",
        ),
        "reserved-slots": (
            {"limits": {"server": {"maxConnections": 5, "superuserReservedConnections": 5}}},
            "must be lower than maxConnections",
        ),
    }
    for name, (bad_spec, reason) in refusals.items():
        with pytest.raises(PolicyError):
            validate_spec(bad_spec)
        result = _apply(kube, _policy(namespace, name, bad_spec), check=False)
        assert result.returncode != 0, f"{name} was accepted"
        assert reason in result.stderr, f"{name}: {result.stderr}"
