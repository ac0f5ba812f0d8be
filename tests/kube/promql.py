"""What a PromQL expression refers to, checked against what the operator really exports.

Not a PromQL parser: a reader of the parts that can go stale — metric names, the labels of
matchers and of ``by``/``on`` clauses, and the values of equality matchers — for the
expressions this repository writes (alert rules and dashboard panels). It errs on the side
of reporting: an identifier it cannot place is taken for a metric name, which then must exist.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
    }
)
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^{}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"(?<![\w.$])([A-Za-z_:][\w:]*)(?!\w)(\s*\()?")
_TEMPLATE_LABEL = re.compile(r"\$labels\.(\w+)")


@dataclass
class Exported:
    """The series of one scrape: label names and values seen, per sample name."""

    labels: dict[str, dict[str, set[str]]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Exported:
        seen: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                names = seen[sample.name]
                for key, value in sample.labels.items():
                    names[key].add(value)
        return cls({name: dict(labels) for name, labels in seen.items()})


@dataclass
class References:
    metrics: set[str] = field(default_factory=set)
    matchers: list[tuple[str, str, str, str]] = field(
        default_factory=list
    )  # metric, label, op, value
    grouping: set[str] = field(default_factory=set)


def references(expr: str) -> References:
    found = References()
    text = expr

    def selector(match: re.Match[str]) -> str:
        metric = match.group(1) or ""
        if metric:
            found.metrics.add(metric)
        for label, op, value in _MATCHER.findall(match.group(2)):
            found.matchers.append((metric, label, op, value))
        return " "

    text = _SELECTOR.sub(selector, text)
    text = _RANGE.sub(" ", text)

    def grouping(match: re.Match[str]) -> str:
        found.grouping.update(n.strip() for n in match.group(2).split(",") if n.strip())
        return " "

    text = _GROUPING.sub(grouping, text)
    for name, call in _IDENT.findall(text):
        if not call and name not in KEYWORDS:
            found.metrics.add(name)
    return found


def problems(
    expr: str,
    exported: Exported,
    *,
    extra: dict[str, set[str]] | None = None,
    templates: str = "",
) -> list[str]:
    """Everything ``expr`` (and ``$labels.x`` in ``templates``) names that the scrape lacks.

    ``extra``: series Prometheus itself adds (``up``), with their label names.
    """
    refs = references(expr)
    known = {name: set(labels) for name, labels in exported.labels.items()}
    known.update(extra or {})
    out: list[str] = []
    labels_in_play: set[str] = set()
    for metric in sorted(refs.metrics):
        if metric not in known:
            out.append(f"metric {metric} is not exported")
        else:
            labels_in_play |= known[metric]
    for metric, label, op, value in refs.matchers:
        if metric not in known:
            continue
        if label not in known[metric]:
            out.append(f"{metric} has no label {label}")
        elif op == "=" and "$" not in value and metric in exported.labels:
            values = exported.labels.get(metric, {}).get(label, set())
            if value not in values:
                out.append(f'{metric}{{{label}="{value}"}} matches nothing: seen {sorted(values)}')
    for label in sorted(refs.grouping - labels_in_play - {"le"}):
        out.append(f"by/on label {label} is on none of {sorted(refs.metrics)}")
    output = refs.grouping or labels_in_play
    for label in sorted(set(_TEMPLATE_LABEL.findall(templates)) - output):
        out.append(f"$labels.{label} is not a label of the alert's result")
    return out
