"""The one pgbouncer.ini renderer against the one list of reserved keys.

Every key the renderer writes into [pgbouncer] is either reserved (a policy parameter naming it
is refused, by the policy and by the renderer) or a tunable default that a parameter replaces
on its own line. Nothing in between: a parameter can never add a second line for a key the
renderer writes, which PgBouncer would resolve silently (the last one wins).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from pgrelief import advice
from pgrelief.pgbouncer_ini import (
    POOL_MODES,
    RESERVED_PGBOUNCER_KEYS,
    TUNABLE_DEFAULTS,
    parameter_problem,
    pgbouncer_ini,
)
from pgrelief.policy import PolicyError, validate_spec


def _render(**overrides: Any) -> str:
    arguments: dict[str, Any] = {
        "pool_mode": "transaction",
        "default_pool_size": 20,
        "reserve_pool_size": 5,
        "max_client_conn": 1000,
        "max_db_connections": 80,
        "databases": ["appdb"],
        "session_pools": {"appdb": 3},
    }
    arguments.update(overrides)
    return pgbouncer_ini(**arguments)


def _settings(text: str) -> list[tuple[str, str]]:
    """The [pgbouncer] section's ``key = value`` lines, in order, duplicates kept."""
    lines = text.splitlines()
    found = []
    for line in lines[lines.index("[pgbouncer]") + 1 :]:
        if line and not line.startswith(";"):
            key, _, value = line.partition(" = ")
            found.append((key, value))
    return found


def _variants() -> list[str]:
    return [
        _render(pool_mode=mode, max_db_connections=cap, session_pools=pools)
        for mode, cap, pools in itertools.product(POOL_MODES, (None, 80), (None, {"appdb": 3}))
    ]


def test_every_key_the_renderer_writes_is_reserved_or_a_declared_tunable_default() -> None:
    written = {key for text in _variants() for key, _ in _settings(text)}
    assert written - RESERVED_PGBOUNCER_KEYS == TUNABLE_DEFAULTS
    assert not TUNABLE_DEFAULTS & RESERVED_PGBOUNCER_KEYS
    # The keys the dedicated spec fields and the container wiring set are among the written.
    assert {"pool_mode", "default_pool_size", "reserve_pool_size", "max_client_conn"} <= written
    assert {"listen_addr", "listen_port", "auth_type", "auth_file"} <= written


def test_the_renderer_writes_each_key_once() -> None:
    for text in _variants():
        keys = [key for key, _ in _settings(text)]
        assert len(keys) == len(set(keys)), keys


@pytest.mark.parametrize("key", sorted(TUNABLE_DEFAULTS))
def test_a_parameter_replaces_a_tunable_default_on_its_own_line(key: str) -> None:
    default = _settings(_render())
    changed = _settings(_render(parameters={key: "7"}))
    position = [k for k, _ in default].index(key)
    assert [k for k, _ in changed] == [k for k, _ in default]
    assert changed[position] == (key, "7")
    assert (
        changed[:position] + changed[position + 1 :] == default[:position] + default[position + 1 :]
    )


def test_other_parameters_follow_the_rendered_settings_once_each() -> None:
    text = _render(
        parameters={
            "server_reset_query": "DISCARD ALL",
            "ignore_startup_parameters": "extra_float_digits",
        }
    )
    settings = _settings(text)
    assert settings[-2:] == [
        ("server_reset_query", "DISCARD ALL"),
        ("ignore_startup_parameters", "extra_float_digits"),
    ]
    assert "; From the policy's pgbouncer.parameters" in text.splitlines()
    assert _settings(_render()) == settings[:-2]


@pytest.mark.parametrize("key", sorted(RESERVED_PGBOUNCER_KEYS))
def test_a_reserved_key_is_refused_by_the_renderer_and_the_policy_alike(key: str) -> None:
    problem = parameter_problem(key, "1")
    assert problem is not None and problem.startswith(f"{key!r} is set by pgrelief")
    with pytest.raises(ValueError) as rendered:
        _render(parameters={key: "1"})
    assert str(rendered.value) == problem
    with pytest.raises(PolicyError) as validated:
        validate_spec({"pgbouncer": {"parameters": {key: "1"}}})
    assert str(validated.value) == f"invalid policy: spec.pgbouncer.parameters: {problem}"


def test_a_multi_line_value_or_a_bad_name_is_refused_by_the_renderer() -> None:
    with pytest.raises(ValueError, match="must be a single line"):
        _render(parameters={"server_lifetime": "1\nauth_type = trust"})
    with pytest.raises(ValueError, match=r"not a pgbouncer\.ini setting name"):
        _render(parameters={"Bad Key": "1"})


def test_a_policys_parameters_render_into_the_ini() -> None:
    spec = validate_spec(
        {
            "pgbouncer": {
                "parameters": {"server_idle_timeout": "600", "server_reset_query": "DISCARD ALL"}
            }
        }
    )
    pgbouncer = spec.pgbouncer
    text = pgbouncer_ini(
        pool_mode=pgbouncer.pool_mode,
        default_pool_size=pgbouncer.default_pool_size or 10,
        reserve_pool_size=pgbouncer.reserve_pool_size,
        max_client_conn=pgbouncer.max_client_conn,
        parameters=pgbouncer.parameters,
    )
    settings = _settings(text)
    assert [value for key, value in settings if key == "server_idle_timeout"] == ["600"]
    assert ("server_reset_query", "DISCARD ALL") in settings
    assert ("pool_mode", "transaction") in settings


def test_advice_shows_the_same_renderer() -> None:
    assert advice.pgbouncer_ini is pgbouncer_ini
