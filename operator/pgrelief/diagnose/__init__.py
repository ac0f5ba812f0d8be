"""What is eating the connection slots: a Snapshot in, a Diagnosis with evidence and fixes out.

This is the troubleshooter's judgement, kept a pure function so that a live server, a pasted
dump and a generated test snapshot all get the same answer, and so the operator can run it
every few seconds on 100k sessions (one pass over the sessions; everything after that works on
aggregates and on the few sessions a finding names).

Counting choices (they matter for the numbers people compare with their own queries):

* Utilization counts ``client backend`` sessions against usable slots (max_connections minus
  both reserves), like PostgreSQL's "too many clients" check does. Other backend types are
  reported beside it: since PostgreSQL 12 autovacuum, background workers and WAL senders draw
  on their own process pools, not on max_connections.
* pgrelief's own session (``snapshot.own_pid``) is in the totals and breakdowns (it holds a
  slot, and the seed queries would count it too) but never in a finding's pids, its terminate
  statements or the counts that size a limit: we do not advise killing ourselves.
* Sessions whose age is unknown (a dump without timestamps) are counted but never judged
  leaked, stuck or long-running: there is no evidence for it.

The package reads as the pipeline: ``options`` (thresholds) -> ``_counting`` (the one pass
over the sessions, the Context) -> the finding builders by theme (``saturation``,
``sessions``, ``load``, ``pooling``, ``memory``, ``reserved``, with ``_shared`` helpers) ->
``pipeline`` (diagnose). ``refusal`` diagnoses a server that would not let us in. Import the
public names from here.
"""

from pgrelief.diagnose._counting import ADDR, APP, DB, LOCAL_SOCKET, STATE, USER
from pgrelief.diagnose.load import (
    MONOPOLY_MIN,
    MONOPOLY_MIN_SLOTS_SHARE,
    MONOPOLY_SHARE,
    TRAFFIC_SPIKE_MIN,
    TRAFFIC_SPIKE_SHARE,
)
from pgrelief.diagnose.memory import MEMORY_MIN_USABLE
from pgrelief.diagnose.options import DEFAULT_OPTIONS, DiagnoseOptions, OptionsError
from pgrelief.diagnose.pipeline import diagnose
from pgrelief.diagnose.pooling import (
    NO_POOLER_ACTIVE_RATIO,
    NO_POOLER_FLOOR,
    NO_POOLER_MIN,
    NO_POOLER_SLOTS_SHARE,
)
from pgrelief.diagnose.refusal import diagnose_refusal

__all__ = [
    "ADDR",
    "APP",
    "DB",
    "DEFAULT_OPTIONS",
    "LOCAL_SOCKET",
    "MEMORY_MIN_USABLE",
    "MONOPOLY_MIN",
    "MONOPOLY_MIN_SLOTS_SHARE",
    "MONOPOLY_SHARE",
    "NO_POOLER_ACTIVE_RATIO",
    "NO_POOLER_FLOOR",
    "NO_POOLER_MIN",
    "NO_POOLER_SLOTS_SHARE",
    "STATE",
    "TRAFFIC_SPIKE_MIN",
    "TRAFFIC_SPIKE_SHARE",
    "USER",
    "DiagnoseOptions",
    "OptionsError",
    "diagnose",
    "diagnose_refusal",
]
