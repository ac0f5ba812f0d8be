"""The reader behind the alert and dashboard checks finds what a stale expression names."""
# ruff: noqa: E501 - a scrape line is as long as its labels

from __future__ import annotations

from tests.kube.promql import Exported, problems, references

SCRAPE = """\
# TYPE pgrelief_utilization_ratio gauge
pgrelief_utilization_ratio{namespace="prod",policy="orders"} 0.5
# TYPE pgrelief_actions counter
pgrelief_actions_total{namespace="prod",policy="orders",action="terminate",outcome="done",rule="idleAfter"} 3.0
# TYPE pgrelief_cycle_duration_seconds histogram
pgrelief_cycle_duration_seconds_bucket{namespace="prod",policy="orders",le="0.5"} 1.0
pgrelief_cycle_duration_seconds_bucket{namespace="prod",policy="orders",le="+Inf"} 1.0
pgrelief_cycle_duration_seconds_count{namespace="prod",policy="orders"} 1.0
pgrelief_cycle_duration_seconds_sum{namespace="prod",policy="orders"} 0.1
"""
EXPORTED = Exported.parse(SCRAPE)


def test_references_of_an_aggregation_over_a_selector() -> None:
    refs = references(
        'sum by (namespace, policy) (increase(pgrelief_actions_total{action="terminate"}[1h])) > 5'
    )
    assert refs.metrics == {"pgrelief_actions_total"}
    assert refs.matchers == [("pgrelief_actions_total", "action", "=", "terminate")]
    assert refs.grouping == {"namespace", "policy"}


def test_sound_expressions_have_no_problems() -> None:
    assert (
        problems(
            "max by (namespace, policy) (pgrelief_utilization_ratio) >= 0.9",
            EXPORTED,
            templates="{{ $labels.policy }} {{ $value }}",
        )
        == []
    )
    quantile = (
        "histogram_quantile(0.95, sum by (namespace, policy, le) "
        "(rate(pgrelief_cycle_duration_seconds_bucket[5m])))"
    )
    assert problems(quantile, EXPORTED) == []
    assert problems('absent(up{job="x"} == 1)', EXPORTED, extra={"up": {"job"}}) == []


def test_stale_names_labels_and_values_are_reported() -> None:
    assert problems("max(pgrelief_utilisation_ratio) > 1", EXPORTED) == [
        "metric pgrelief_utilisation_ratio is not exported"
    ]
    assert problems('pgrelief_actions_total{outcome="succeeded"}', EXPORTED) == [
        "pgrelief_actions_total{outcome=\"succeeded\"} matches nothing: seen ['done']"
    ]
    assert problems('pgrelief_actions_total{verdict="done"}', EXPORTED) == [
        "pgrelief_actions_total has no label verdict"
    ]
    assert problems("max by (database) (pgrelief_utilization_ratio)", EXPORTED) == [
        "by/on label database is on none of ['pgrelief_utilization_ratio']"
    ]
    assert problems(
        "max by (policy) (pgrelief_utilization_ratio)",
        EXPORTED,
        templates="{{ $labels.namespace }}",
    ) == ["$labels.namespace is not a label of the alert's result"]
    assert problems("pgrelief_actions > 0", EXPORTED) == ["metric pgrelief_actions is not exported"]
