"""Kubernetes objects pgrelief wants to exist, built as plain dicts from a policy.

Builders only: no API call, no cluster, no I/O, so every object is unit-tested as data and the
controller's reconcile is a compare-and-apply of what these return (CloudNativePG keeps
``pkg/specs/pgbouncer`` apart from its reconcilers for the same reason).
"""
