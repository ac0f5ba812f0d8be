"""Sizing arithmetic: sizes as users type them, the memory formula, PgBouncer pool sizes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgrelief.sizing import (
    GB,
    KB,
    MB,
    TB,
    MemoryModel,
    SizeError,
    fair_share,
    format_size,
    headroom_slots,
    os_reserve,
    parse_size,
    pg_memory_setting,
    pgbouncer_pool_sizes,
    pool_per_instance,
    recommended_max_connections,
    size_server,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16GB", 16 * GB),
        ("16gb", 16 * GB),
        ("16G", 16 * GB),
        ("16 GB", 16 * GB),
        (" 16GiB ", 16 * GB),
        ("1.5GB", 1536 * MB),
        ("64kB", 64 * KB),
        ("64KB", 64 * KB),
        ("64k", 64 * KB),
        ("512mb", 512 * MB),
        ("1TB", TB),
        ("100B", 100),
        ("100b", 100),
    ],
)
def test_parse_size_reads_units_case_insensitively(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["16", "", "GB", "abc", "16XB", "-1GB", "1.2.3GB", "16 G B"])
def test_parse_size_refuses_bad_input_with_a_clear_message(text: str) -> None:
    with pytest.raises(SizeError) as raised:
        parse_size(text)
    assert isinstance(raised.value, ValueError)
    assert repr(text) in str(raised.value)
    assert "e.g. 512MB, 16GB" in str(raised.value)


def test_format_size_and_setting_values() -> None:
    assert format_size(16 * GB) == "16GB"
    assert format_size(1536 * MB) == "1.5GB"
    assert format_size(640 * KB) == "640kB"
    assert format_size(100) == "100B"
    assert pg_memory_setting(4 * GB) == "4GB"
    assert pg_memory_setting(1536 * MB) == "1536MB"
    assert pg_memory_setting(1000 * KB) == "1000kB"


def test_reserve_headroom_and_shares() -> None:
    assert os_reserve(16 * GB) == 16 * GB // 10
    assert os_reserve(2 * GB) == 512 * MB
    assert headroom_slots(97) == 10
    assert headroom_slots(17) == 3
    assert headroom_slots(4) == 2  # never more than half the slots
    assert headroom_slots(0) == 0
    assert fair_share(97, 3) == 29  # (97 - 10) // 3
    assert fair_share(97, 3, role_limit=20) == 20
    assert fair_share(97, 3, role_limit=-1) == 29
    assert pool_per_instance(29, 4) == 7
    assert pool_per_instance(3, 10) == 1


def test_memory_model_formula_spells_out_the_numbers() -> None:
    model = MemoryModel(shared_buffers=4 * GB, work_mem=4 * MB)
    assert model.per_connection == 26 * MB  # 10MB + 2 x 4MB + 8MB
    assert model.fixed == 4 * GB + 3 * 64 * MB
    assert model.worst_case(100) == 4 * GB + 192 * MB + 2600 * MB
    assert model.formula(100) == (
        "shared_buffers 4GB + max_connections 100 × (per-backend 10MB + 2 × work_mem 4MB + "
        "temp_buffers 8MB) + maintenance_work_mem 64MB × autovacuum_max_workers 3 = 6.7GB"
    )
    assert model.connections_within(4 * GB) == 0


def test_recommended_max_connections_is_capped_to_100_300() -> None:
    assert recommended_max_connections(1228) == 300
    assert recommended_max_connections(257) == 250
    assert recommended_max_connections(91) == 91


def test_size_16gb_matches_the_domain_reference() -> None:
    sizing = size_server(16 * GB)
    # The reference: 16GB RAM, 4GB shared_buffers, ~10MB per backend -> "around 400".
    assert sizing.memory.shared_buffers == 4 * GB
    assert sizing.memory_ceiling == 402
    assert sizing.max_connections == 300
    assert sizing.superuser_reserved_connections == 5
    assert sizing.usable_slots == 295
    assert sizing.pgbouncer.default_pool_size == 50
    assert sizing.pgbouncer.reserve_pool_size == 10
    assert sizing.pgbouncer.max_db_connections == 265
    assert not sizing.needs_pgbouncer
    assert "memory allows (16GB − 1.6GB − 4.2GB) / 26MB = 402 connections" in sizing.reasoning
    assert sizing.settings_sql().splitlines()[:3] == [
        "alter system set max_connections = '300';",
        "alter system set superuser_reserved_connections = '5';",
        "alter system set shared_buffers = '4GB';",
    ]


def test_size_small_server_is_limited_by_memory() -> None:
    sizing = size_server(4 * GB)
    # (4096MB - 512MB reserve - 1024MB shared_buffers - 192MB autovacuum) / 26MB = 91
    assert sizing.memory_ceiling == 91
    assert sizing.max_connections == 91
    assert sizing.usable_slots == 86
    assert any("memory is the limit here" in line for line in sizing.reasoning)


def test_size_a_small_server_lowers_what_was_not_given_instead_of_failing() -> None:
    sizing = size_server(1 * GB)
    # 1GB - 512MB reserve: shared_buffers 256MB -> 128MB, work_mem 4MB -> 1MB, 3 reserved:
    # (512MB - 128MB - 192MB autovacuum) / (10 + 2 + 8 = 20MB) = 9
    assert (sizing.memory.shared_buffers, sizing.memory.work_mem) == (128 * MB, 1 * MB)
    assert sizing.max_connections == 9
    assert sizing.superuser_reserved_connections == 3
    assert sizing.usable_slots == 6
    assert sizing.needs_pgbouncer
    assert sizing.memory.worst_case(sizing.max_connections) <= sizing.ram - sizing.os_reserve
    assert "alter system set work_mem = '1MB';" in sizing.settings_sql()
    assert [line for line in sizing.reasoning if line.startswith("small server:")] == [
        "small server: shared_buffers lowered from 256MB to 128MB so connections fit",
        "small server: work_mem lowered from 4MB to 1MB (give the few queries that need more "
        "their own: alter role <role> set work_mem)",
        "small server: superuser_reserved_connections kept at PostgreSQL's 3",
    ]
    # What the user set is theirs: a given work_mem is not lowered.
    pinned = size_server(2 * GB, work_mem=4 * MB)
    assert pinned.memory.work_mem == 4 * MB


def test_size_with_application_demand() -> None:
    sizing = size_server(
        16 * GB,
        shared_buffers=4 * GB,
        work_mem=8 * MB,
        app_instances=10,
        pool_per_instance=40,
        pgbouncer_replicas=2,
    )
    # per connection 10 + 16 + 8 = 34MB: (16384 - 1638.4 - 4288) / 34 = 307
    assert sizing.memory_ceiling == 307
    assert sizing.max_connections == 300
    assert sizing.demand == 400
    assert sizing.needs_pgbouncer
    assert sizing.pool_per_instance_direct == (295 - 30) // 10
    assert sizing.pgbouncer.replicas == 2
    assert sizing.pgbouncer.max_db_connections == 132  # (295 - 30) // 2
    assert any("400 connections, which exceeds the 265 slots" in r for r in sizing.reasoning)


def test_size_demand_that_fits() -> None:
    sizing = size_server(16 * GB, app_instances=4, pool_per_instance=20)
    assert sizing.demand == 80
    assert not sizing.needs_pgbouncer


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ram": 0}, "--ram must be a positive size"),
        ({"ram": 1 * GB, "shared_buffers": 0}, "--shared-buffers"),
        ({"ram": 16 * GB, "app_instances": 0}, "--app-instances"),
        ({"ram": 16 * GB, "pool_per_instance": 5}, "goes with --app-instances"),
        ({"ram": 16 * GB, "pgbouncer_replicas": 0}, "--pgbouncer-replicas"),
        ({"ram": 16 * GB, "work_mem": -1}, "--work-mem"),
        ({"ram": 600 * MB}, "leaves room for only"),
    ],
)
def test_size_refuses_impossible_inputs(kwargs: dict[str, int], message: str) -> None:
    ram = kwargs.pop("ram")
    with pytest.raises(SizeError, match=message):
        size_server(ram, **kwargs)  # type: ignore[arg-type]


def test_pgbouncer_pool_sizes_default_server() -> None:
    sizes = pgbouncer_pool_sizes(97)
    assert (sizes.default_pool_size, sizes.reserve_pool_size) == (50, 10)
    assert sizes.server_connection_budget == 87
    assert sizes.direct_slots == 10
    assert sizes.max_db_connections == 87
    assert sizes.max_client_conn == 1000


def test_pgbouncer_pool_sizes_split_between_replicas_and_pools() -> None:
    sizes = pgbouncer_pool_sizes(97, 2, pools=3, databases=2, client_connections=3000)
    # budget 87 -> 43 per replica -> 14 per pool: 12 + 2 reserve; 21 per database
    assert (sizes.default_pool_size, sizes.reserve_pool_size) == (12, 2)
    assert sizes.max_db_connections == 21
    assert sizes.max_client_conn == 3000  # 2 x 3000 / 2 replicas


def test_pgbouncer_pool_sizes_warns_when_it_cannot_fit() -> None:
    sizes = pgbouncer_pool_sizes(7, 4, pools=3)
    assert sizes.default_pool_size == 1
    assert sizes.reserve_pool_size == 0
    assert sizes.reasoning[-1].startswith("warning: 4 server connections cannot give")


def test_pgbouncer_pool_sizes_refuses_nonsense() -> None:
    with pytest.raises(SizeError):
        pgbouncer_pool_sizes(97, 0)
    with pytest.raises(SizeError):
        pgbouncer_pool_sizes(-1)


@given(
    usable=st.integers(min_value=0, max_value=5000),
    replicas=st.integers(min_value=1, max_value=8),
    pools=st.integers(min_value=1, max_value=40),
    databases=st.integers(min_value=1, max_value=10),
)
def test_pgbouncer_pools_never_exceed_the_budget(
    usable: int, replicas: int, pools: int, databases: int
) -> None:
    sizes = pgbouncer_pool_sizes(usable, replicas, pools=pools, databases=databases)
    assert sizes.server_connection_budget + sizes.direct_slots == usable
    assert sizes.default_pool_size >= 1
    assert sizes.reserve_pool_size >= 0
    per_replica = sizes.server_connection_budget // replicas
    if per_replica >= pools:
        # Every pool at full size, reserve included, still fits each replica's share.
        assert pools * (sizes.default_pool_size + sizes.reserve_pool_size) <= per_replica
    if per_replica >= databases:
        assert replicas * databases * sizes.max_db_connections <= sizes.server_connection_budget


@given(ram_gb=st.integers(min_value=2, max_value=1024))
def test_sized_server_fits_its_memory(ram_gb: int) -> None:
    sizing = size_server(ram_gb * GB)
    assert sizing.memory.worst_case(sizing.max_connections) <= sizing.ram - sizing.os_reserve
    assert 10 <= sizing.max_connections <= 300
    assert sizing.usable_slots == sizing.max_connections - 5
