"""A sleeping policy worker wakes for what matters, and a wake-up is never lost.

The worker no longer polls: it waits for its next cycle, a new generation of its spec
(``notice``, from kopf's ``on.event``) or a change to the PgBouncer objects it manages
(``nudge``). The wait is pure asyncio, so it is unit-tested here with a stand-in for kopf's
``stopped`` flag; what runs against the API server is in tests/kube/.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, cast

from pgrelief.controller.worker import OperatorContext, PolicyWorker

HANG_S = 5.0  # "did not wake": far longer than a wake-up takes, far shorter than the sleep
LONG_SLEEP_S = 3600.0


class Stopped:
    """kopf's DaemonStopped as the worker uses it: truthy once stopped, ``await wait(t)``."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def __bool__(self) -> bool:
        return self.event.is_set()

    async def wait(self, timeout: float | None = None) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event.wait(), timeout)
        return self.event.is_set()


def _worker(generation: int) -> tuple[PolicyWorker, dict[str, Any]]:
    # No API, pool, metrics or audit: the wait touches none of them.
    nothing = cast(Any, None)
    context = OperatorContext(nothing, nothing, nothing, nothing, "test")
    body: dict[str, Any] = {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u", "generation": generation}
    }
    worker = PolicyWorker(context, body)
    worker.generation = generation  # what ``run`` sets before each step
    return worker, body


def test_a_nudge_that_lands_while_a_step_runs_makes_the_next_sleep_zero() -> None:
    async def scenario() -> None:
        worker, body = _worker(1)
        worker.nudge()  # a managed ConfigMap edited while the cycle ran in the pool
        await asyncio.wait_for(worker._sleep(LONG_SLEEP_S, Stopped(), body), HANG_S)

    asyncio.run(scenario())


def test_a_sleeping_worker_wakes_for_a_nudge_and_for_a_new_generation_only() -> None:
    async def scenario() -> None:
        worker, body = _worker(1)
        stopped = Stopped()

        sleeping = asyncio.create_task(worker._sleep(LONG_SLEEP_S, stopped, body))
        await asyncio.sleep(0.05)
        worker.nudge()
        await asyncio.wait_for(sleeping, HANG_S)

        sleeping = asyncio.create_task(worker._sleep(LONG_SLEEP_S, stopped, body))
        worker.notice(1)  # a status patch: same generation, nothing to do before the schedule
        await asyncio.sleep(0.05)
        assert not sleeping.done()
        body["metadata"]["generation"] = 2
        worker.notice(2)
        await asyncio.wait_for(sleeping, HANG_S)

        worker.generation = 2  # the next step ran the new spec
        sleeping = asyncio.create_task(worker._sleep(LONG_SLEEP_S, stopped, body))
        await asyncio.sleep(0.05)
        assert not sleeping.done()  # the wake-ups above were consumed, not left set
        stopped.event.set()
        await asyncio.wait_for(sleeping, HANG_S)

    asyncio.run(scenario())


def test_a_new_generation_that_arrived_while_a_step_ran_is_taken_without_a_wait() -> None:
    async def scenario() -> None:
        worker, body = _worker(1)
        body["metadata"]["generation"] = 2  # kopf updated the body; the notice came and went
        await asyncio.wait_for(worker._sleep(LONG_SLEEP_S, Stopped(), body), HANG_S)

    asyncio.run(scenario())
