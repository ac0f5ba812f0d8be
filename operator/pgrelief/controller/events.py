"""Posts a policy's Events, folding repeats into one Event's count like Kubernetes does.

An Event with the same reason and message as one posted in the last ``SERIES_WINDOW`` is not
created again: the existing one gets ``count`` + 1 and a new ``lastTimestamp`` (the event
series Kubernetes itself keeps), so a flapping database is one line in ``kubectl get events``,
not hundreds. A failed post is logged and counted, never allowed to stop a cycle.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pgrelief.controller.kube import Kube, KubeError
from pgrelief.manifests.events import EventNote, event_manifest, event_name

log = logging.getLogger(__name__)

SERIES_WINDOW = timedelta(minutes=10)
_REMEMBERED = 256  # distinct notes kept per policy for folding


@dataclass
class _Posted:
    name: str
    count: int
    first: datetime
    last: datetime


class EventRecorder:
    """The Events of one ConnectionPolicy (``policy``: its name, namespace and uid)."""

    def __init__(self, kube: Kube, policy: Mapping[str, Any], instance: str) -> None:
        self.kube = kube
        self.policy = dict(policy)
        self.instance = instance
        self.posted = 0
        self.failed = 0
        self._recent: dict[str, _Posted] = {}

    def record(self, notes: Iterable[EventNote], *, now: datetime | None = None) -> None:
        moment = now or datetime.now(UTC)
        for note in notes:
            try:
                self._record(note, moment)
            except KubeError as error:
                self.failed += 1
                log.warning("could not post Event %s: %s", note.reason, error)

    def _record(self, note: EventNote, now: datetime) -> None:
        namespace = self.policy["namespace"]
        seen = self._recent.get(note.key)
        if seen is not None and now - seen.last < SERIES_WINDOW:
            seen.count += 1
            seen.last = now
            body = event_manifest(
                note,
                policy=self.policy,
                name=seen.name,
                count=seen.count,
                first=seen.first,
                last=now,
                instance=self.instance,
            )
            self.kube.patch_event(
                namespace,
                seen.name,
                {"count": body["count"], "lastTimestamp": body["lastTimestamp"]},
            )
            self.posted += 1
            return
        name = event_name(self.policy["name"], note, now)
        self.kube.create_event(
            namespace,
            event_manifest(
                note,
                policy=self.policy,
                name=name,
                count=1,
                first=now,
                last=now,
                instance=self.instance,
            ),
        )
        self.posted += 1
        self._recent[note.key] = _Posted(name, 1, now, now)
        if len(self._recent) > _REMEMBERED:
            oldest = min(self._recent, key=lambda key: self._recent[key].last)
            del self._recent[oldest]
