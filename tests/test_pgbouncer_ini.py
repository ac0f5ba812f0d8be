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
    DEFAULT_IMAGE,
    OLDEST_VERSION,
    POOL_MODES,
    RESERVED_PGBOUNCER_KEYS,
    SETTING_SINCE,
    TUNABLE_DEFAULTS,
    IniAuth,
    database_keys,
    image_version,
    parameter_problem,
    parse_version,
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
        "version": (1, 24),
        "ignore_startup_parameters": "extra_float_digits",
    }
    arguments.update(overrides)
    return pgbouncer_ini(**arguments)


def _settings(text: str) -> list[tuple[str, str]]:
    """The [pgbouncer] section's ``key = value`` lines, in order, duplicates kept."""
    lines = text.splitlines()
    found = []
    for line in lines[lines.index("[pgbouncer]") + 1 :]:
        if line and not line.startswith(";"):
            key, _, value = line.partition("=")
            found.append((key.strip(), value.strip()))
    return found


_AUTH_QUERY = IniAuth(
    auth_type="scram-sha-256",
    auth_file="/var/run/pgbouncer/userlist.txt",
    auth_user="pgbouncer_auth",
    auth_query="SELECT usename, passwd FROM pgbouncer.get_auth($1)",
    auth_dbname="appdb",
)


def _variants() -> list[str]:
    return [
        _render(
            pool_mode=mode,
            max_db_connections=cap,
            session_pools=pools,
            version=version,
            auth=auth if version >= (1, 20) else None,
            unix_socket_dir="",
            server_tls_sslmode="verify-full",
            server_tls_ca_file="/etc/pgbouncer/ca.crt",
        )
        for mode, cap, pools, version, auth in itertools.product(
            POOL_MODES,
            (None, 80),
            (None, {"appdb": 3}),
            (OLDEST_VERSION, (1, 24)),
            (None, _AUTH_QUERY),
        )
    ]


def test_every_key_the_renderer_writes_is_reserved_or_a_declared_tunable_default() -> None:
    written = {key for text in _variants() for key, _ in _settings(text)}
    assert written - RESERVED_PGBOUNCER_KEYS == TUNABLE_DEFAULTS
    assert not TUNABLE_DEFAULTS & RESERVED_PGBOUNCER_KEYS
    # The keys the dedicated spec fields and the container wiring set are among the written.
    assert {"pool_mode", "default_pool_size", "reserve_pool_size", "max_client_conn"} <= written
    assert {"listen_addr", "listen_port", "auth_type", "auth_file"} <= written
    assert {"auth_user", "auth_query", "auth_dbname", "server_tls_sslmode"} <= written


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
            "application_name_add_host": "1",
        }
    )
    settings = _settings(text)
    assert settings[-2:] == [
        ("server_reset_query", "DISCARD ALL"),
        ("application_name_add_host", "1"),
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


# --- how PgBouncer reads the file ------------------------------------------------------------


def test_settings_newer_than_the_version_are_written_only_for_releases_that_have_them() -> None:
    old = dict(_settings(_render(version=OLDEST_VERSION)))
    new = dict(_settings(_render(version=(1, 24))))
    assert "max_prepared_statements" not in old
    assert new["max_prepared_statements"] == "200"
    assert set(new) - set(old) == {"max_prepared_statements"}
    assert all(since > OLDEST_VERSION for since in SETTING_SINCE.values())


def test_a_parameter_newer_than_the_version_is_refused() -> None:
    problem = parameter_problem("max_prepared_statements", "100", (1, 18))
    assert problem == (
        "'max_prepared_statements' needs PgBouncer 1.21 or later; the image runs 1.18"
    )
    assert parameter_problem("max_prepared_statements", "100", (1, 21)) is None
    assert parameter_problem("max_prepared_statements", "100") is None  # no version: no gate
    with pytest.raises(ValueError, match=r"needs PgBouncer 1\.21"):
        _render(version=(1, 18), parameters={"max_prepared_statements": "100"})
    with pytest.raises(ValueError, match=r"auth_dbname needs PgBouncer 1\.20"):
        _render(version=(1, 18), auth=_AUTH_QUERY)


def test_values_are_written_verbatim_and_the_unix_socket_can_be_turned_off() -> None:
    text = _render(parameters={"server_reset_query": "DISCARD ALL"}, unix_socket_dir="")
    lines = text.splitlines()
    assert "server_reset_query = DISCARD ALL" in lines
    assert "unix_socket_dir =" in lines
    assert parameter_problem("server_reset_query", " DISCARD ALL") is not None


def test_database_names_pgbouncer_cannot_read_as_keys_get_unique_aliases() -> None:
    keys = database_keys(["app", "Prod DB", "Prod_DB", "naïve", "x\ny"])
    assert keys == {"app": "app", "Prod DB": "Prod_DB", "Prod_DB": "Prod_DB_2", "naïve": "na_ve"}
    text = _render(databases=["Prod_DB", "Prod DB", "it's"], session_pools={"Prod DB": 2})
    lines = text.splitlines()
    assert "Prod_DB = host=127.0.0.1 port=5432 dbname=Prod_DB" in lines
    assert "Prod_DB_2 = host=127.0.0.1 port=5432 dbname='Prod DB'" in lines
    assert "it_s = host=127.0.0.1 port=5432 dbname='it''s'" in lines
    assert (
        "Prod_DB_2_session = host=127.0.0.1 port=5432 dbname='Prod DB' pool_mode=session "
        "pool_size=2"
    ) in lines
    newline = _render(databases=["a\nb = x"], session_pools={})
    assert "; database 'a\\nb = x' has a line break: PgBouncer cannot serve it" in newline
    assert not any(line.startswith("b = x") for line in newline.splitlines())


def test_versions_from_text_and_image_tags() -> None:
    assert parse_version("1.24.1") == (1, 24)
    assert parse_version("v1.18") == (1, 18)
    with pytest.raises(ValueError, match="not a PgBouncer version"):
        parse_version("latest")
    assert image_version(DEFAULT_IMAGE) is not None
    assert image_version(DEFAULT_IMAGE) >= (1, 23)  # type: ignore[operator]
    assert image_version("registry:5000/pgbouncer:1.22.1-p0") == (1, 22)
    assert image_version("registry:5000/pgbouncer") is None
    assert image_version("pgbouncer:latest@sha256:abc") is None
    assert image_version("pgbouncer:1.21@sha256:abc") == (1, 21)
