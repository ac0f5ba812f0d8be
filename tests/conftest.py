"""Shared pytest set-up: the real-server fixtures live in plugins under tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.kube",
    "tests.fixtures.browser",
    "tests.fixtures.pgbouncer",
    "tests.fixtures.e2e",
]
