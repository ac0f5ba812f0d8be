"""Pool sizes from a connection budget: the numbers, the refusals, and properties over all inputs.

The property that matters: whatever a policy asks, a budget that ``fits`` never lets the pools
(every replica, every database, every declared user, the auth_query connection) open more
server connections than the usable slots minus the headroom, nor more than a role's or a
database's CONNECTION LIMIT; and one that does not fit says exactly what would.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgrelief.pool_budget import (
    MAX_OPEN_FILES,
    SPARE_OPEN_FILES,
    PoolBudget,
    PoolRequest,
    connection_limits,
    fit_pools,
)
from pgrelief.sizing import POOL_SIZE_CAP, SizeError


def _request(**fields: object) -> PoolRequest:
    base = PoolRequest(
        usable_slots=97,
        replicas=2,
        databases=("shop",),
        users=("shop_app",),
        default_pool_size=25,
        reserve_pool_size=5,
        max_client_conn=2000,
        superuser_sessions=2,
        direct_connections=10,
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def test_a_request_that_fits_keeps_its_sizes() -> None:
    budget = fit_pools(_request())
    assert budget.fits and budget.problems == ()
    assert budget.budget == 97 - 1 - 2 - 10
    assert (budget.default_pool_size, budget.reserve_pool_size) == (25, 5)
    assert budget.max_db_connections == 30
    assert budget.server_connections == 60
    assert budget.open_files == 2000 + 30 + SPARE_OPEN_FILES
    assert budget.reasoning[0] == (
        "server connection budget: 97 usable slots − 1 pgrelief lifeline − 2 superuser "
        "session(s) − 10 declared direct connection(s) = 84"
    )
    assert budget.message() == "60 server connections at most, within the 84 the budget allows"


def test_an_oversubscribed_request_says_by_how_much_and_what_fits() -> None:
    budget = fit_pools(_request(usable_slots=60))
    assert not budget.fits
    assert budget.budget == 47
    assert budget.over_by == 60 - 47
    # 47 // 2 replicas = 23 per pool: 18 + 5 reserve
    assert budget.fitting_default_pool_size == 18
    assert budget.message() == (
        "the pools need 60 server connections (2 replica(s) × 1 database(s) × (1 user pool(s) "
        "× (25 + 5 reserve))) but only 47 fit (60 usable slots − 1 pgrelief lifeline − 2 "
        "superuser session(s) − 10 declared direct connection(s)): 13 too many; what fits: "
        "defaultPoolSize 18 or less with reservePoolSize 5"
    )
    assert fit_pools(_request(usable_slots=60, default_pool_size=18)).fits


def test_an_absent_default_is_computed_and_capped() -> None:
    computed = fit_pools(_request(default_pool_size=None, usable_slots=60))
    assert computed.fits and computed.default_pool_size == 18
    roomy = fit_pools(_request(default_pool_size=None, usable_slots=1000, replicas=1))
    assert roomy.default_pool_size == POOL_SIZE_CAP
    assert "computed, capped at 50" in roomy.reasoning[2]


def test_nothing_fits_when_not_even_one_connection_per_pool_does() -> None:
    budget = fit_pools(_request(default_pool_size=None, usable_slots=14, replicas=3))
    # budget 14 - 13 = 1 < 3 replicas x 1 pool
    assert not budget.fits and budget.fitting_default_pool_size is None
    assert budget.problems[-1].startswith("nothing fits: even one connection per pool needs 3")
    tight = fit_pools(_request(default_pool_size=None, usable_slots=21, replicas=2))
    # budget 8 -> 4 per pool: reserve 5 is too much, 1 + 3 reserve would fit
    assert tight.problems[-1] == (
        "what fits: 4 connection(s) per pool, e.g. defaultPoolSize 1 with reservePoolSize 3"
    )


def test_each_pool_must_fit_its_roles_and_databases_connection_limit() -> None:
    role = fit_pools(_request(role_limits={"shop_app": 50}))
    assert not role.fits and role.over_by == 0
    assert role.problems == (
        "role 'shop_app' CONNECTION LIMIT 50, shared by 2 replica(s) × 1 database(s), leaves "
        "25 per pool, the pools ask 30 (defaultPoolSize 25 + reservePoolSize 5)",
        "what fits: defaultPoolSize 20 or less with reservePoolSize 5",
    )
    assert fit_pools(_request(role_limits={"shop_app": 60})).fits
    assert fit_pools(_request(role_limits={"shop_app": -1})).fits
    database = fit_pools(_request(database_limits={"shop": 40}))
    assert not database.fits
    assert database.problems[0].startswith("database 'shop' CONNECTION LIMIT 40")


def test_the_lookup_role_takes_one_connection_per_database_and_needs_room_for_it() -> None:
    budget = fit_pools(_request(auth_user="pgbouncer_auth"))
    assert budget.max_db_connections == 31
    assert budget.server_connections == 62
    limited = fit_pools(
        _request(auth_user="pgbouncer_auth", role_limits={"pgbouncer_auth": 1}, auth_connections=1)
    )
    assert limited.problems == (
        "lookup role 'pgbouncer_auth' CONNECTION LIMIT 1 is below the 2 connections 2 "
        "replica(s) use for auth_query",
    )


def test_a_max_client_conn_no_container_can_open_files_for_is_refused() -> None:
    budget = fit_pools(_request(max_client_conn=MAX_OPEN_FILES))
    assert not budget.fits and budget.over_by == 0
    assert budget.problems == (
        f"maxClientConn {MAX_OPEN_FILES} needs {MAX_OPEN_FILES + 130} open files per pod, more "
        f"than the {MAX_OPEN_FILES} a container can count on: use at most {MAX_OPEN_FILES - 130}",
    )
    assert fit_pools(_request(max_client_conn=MAX_OPEN_FILES - 130)).fits


def test_a_computed_size_that_still_fits_is_kept_until_a_clearly_larger_one_does() -> None:
    request = _request(default_pool_size=None, usable_slots=60)  # computes 18
    assert fit_pools(replace(request, previous_default_pool_size=17)).default_pool_size == 17
    assert fit_pools(replace(request, previous_default_pool_size=10)).default_pool_size == 18
    # A previous size that no longer fits (here 19 > 18) gives way at once.
    assert fit_pools(replace(request, previous_default_pool_size=19)).default_pool_size == 18


def test_connection_limits_take_the_stricter_of_server_and_policy() -> None:
    assert connection_limits({"a": 50, "b": -1, "c": 10}, {"a": 40, "b": 20, "d": 5}) == {
        "a": 40,
        "b": 20,
        "c": 10,
        "d": 5,
    }
    assert connection_limits({"a": -1}, {}) == {"a": -1}


@pytest.mark.parametrize(
    "fields",
    [{"replicas": 0}, {"databases": ()}, {"reserve_pool_size": -1}, {"usable_slots": -1}],
)
def test_inputs_that_are_not_a_pooler_are_errors(fields: dict[str, object]) -> None:
    with pytest.raises(SizeError):
        fit_pools(_request(**fields))


# --- properties ----------------------------------------------------------------------------

_names = st.lists(st.sampled_from(["a", "b", "c", "d"]), unique=True)


@st.composite
def requests(draw: st.DrawFn) -> PoolRequest:
    databases = draw(_names.filter(bool))
    users = draw(_names)
    auth = draw(st.booleans())
    limit = st.integers(min_value=-1, max_value=400)
    return PoolRequest(
        usable_slots=draw(st.integers(min_value=0, max_value=2000)),
        replicas=draw(st.integers(min_value=1, max_value=8)),
        databases=tuple(databases),
        users=tuple(users),
        default_pool_size=draw(st.none() | st.integers(min_value=1, max_value=200)),
        reserve_pool_size=draw(st.integers(min_value=0, max_value=20)),
        max_client_conn=draw(st.integers(min_value=1, max_value=MAX_OPEN_FILES)),
        superuser_sessions=draw(st.integers(min_value=0, max_value=20)),
        direct_connections=draw(st.integers(min_value=0, max_value=300)),
        role_limits=draw(st.dictionaries(st.sampled_from([*users, "auth", "x"]), limit)),
        database_limits=draw(st.dictionaries(st.sampled_from([*databases, "x"]), limit)),
        auth_user="auth" if auth else None,
        previous_default_pool_size=draw(st.none() | st.integers(min_value=1, max_value=60)),
    )


def _connections_per_pool(budget: PoolBudget) -> int:
    return budget.default_pool_size + budget.reserve_pool_size


@given(requests())
def test_a_budget_that_fits_never_exceeds_the_server_or_any_limit(request: PoolRequest) -> None:
    budget = fit_pools(request)
    replicas, databases = request.replicas, len(request.databases)
    users = max(len(request.users), 1)
    auth = 1 if request.auth_user else 0
    per_pool = _connections_per_pool(budget)
    # max_db_connections is exactly what each replica may open per database, auth included,
    # so roles nobody declared cannot push the total past it.
    assert budget.max_db_connections == users * per_pool + auth
    assert budget.server_connections == replicas * databases * budget.max_db_connections
    assert budget.default_pool_size >= 1
    if not budget.fits:
        assert budget.problems
        return
    assert budget.server_connections <= request.usable_slots - request.headroom
    for user in request.users:
        limit = request.role_limits.get(user, -1)
        assert limit < 0 or replicas * databases * per_pool <= limit
    for database in request.databases:
        limit = request.database_limits.get(database, -1)
        assert limit < 0 or replicas * budget.max_db_connections <= limit
    assert budget.open_files <= MAX_OPEN_FILES
    if request.default_pool_size is None:
        assert budget.default_pool_size <= max(
            POOL_SIZE_CAP, request.previous_default_pool_size or 0
        )


@given(requests())
def test_what_fits_is_the_largest_size_that_fits(request: PoolRequest) -> None:
    budget = fit_pools(request)
    largest = budget.fitting_default_pool_size
    pools_only = replace(
        request,
        max_client_conn=1,
        role_limits={
            name: limit for name, limit in request.role_limits.items() if name != request.auth_user
        },
    )
    if largest is None:
        assert not fit_pools(replace(pools_only, default_pool_size=1)).fits
        return
    assert fit_pools(replace(pools_only, default_pool_size=largest)).fits
    assert not fit_pools(replace(pools_only, default_pool_size=largest + 1)).fits
    if budget.over_by:
        assert budget.over_by == budget.server_connections - request.budget > 0
        assert f"{budget.over_by} too many" in budget.message()


@given(requests(), st.integers(min_value=1, max_value=500))
def test_more_usable_slots_never_turn_a_fitting_request_down(
    request: PoolRequest, more: int
) -> None:
    fixed = replace(request, default_pool_size=request.default_pool_size or 1)
    if fit_pools(fixed).fits:
        assert fit_pools(replace(fixed, usable_slots=fixed.usable_slots + more)).fits


@given(requests())
def test_a_computed_size_fits_whenever_any_size_does(request: PoolRequest) -> None:
    computed = replace(request, default_pool_size=None, max_client_conn=1)
    computed = replace(
        computed,
        role_limits={
            name: limit for name, limit in request.role_limits.items() if name != request.auth_user
        },
    )
    budget = fit_pools(computed)
    assert budget.fits == (budget.fitting_default_pool_size is not None)
