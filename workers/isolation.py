"""The isolated lane: a turn lost with its worker runs again alone, so a poison turn fails alone.

A turn whose model call or tool kills its worker process (SIGKILL, OOM, ``os._exit``) takes
every turn running beside it down too. If every lost attempt were charged alike, one poison
turn among ``max_jobs`` 50 would fail dozens of innocent turns (``AttemptsExhausted``) as it
killed worker after worker. Instead (``START`` in ``turnfleet/queue.py``, "Worker losses"):

1. every attempt records the lane it runs in; a turn found lost (still ``running`` when its
   lease lapsed and another worker claimed its job) that ran *shared* is a **suspect**: its
   lost attempt is not charged, and its job moves to the isolated lane's queue
   (``keys.ISOLATED_QUEUE``);
2. a suspect runs **alone on its worker process**: if it completes, it was innocent (it
   spent no ordinary attempt on the loss); if its worker is lost again while it runs alone,
   it is the cause: after ``TURNFLEET_ISOLATED_LOSSES`` such losses (default 1) it ends
   ``failed`` with ``WorkerLost`` (the ``turn_failed`` alert names it, with that error type),
   and its conversation moves on.

So a poison turn takes down at most ``1 + isolated_losses`` processes (2 by default): the one
it shared, and the one it ran alone on. Its neighbours each run once more, alone, within
their ordinary attempts.

**Alone means no neighbours in the process.** A process-wide exclusive run is what makes the
second loss cost nothing else, so ``Lanes`` runs two arq ``Worker``s on one event loop — the
shared lane (``arq:queue``, ``max_jobs``) and the isolated lane (``ISOLATED_QUEUE``,
``max_jobs`` 1) — and a switch that never lets both hold turns at once: while a suspect is due
and held by no worker (or runs in this process's isolated lane), the shared lane takes no new
turn; once its running turns have ended, the isolated lane may take one. When no suspect
waits, the isolated lane stops taking and the shared lane resumes. As many workers serve the
isolated lane as suspects wait (``keys.WORKERS_ISOLATING``; one waiting suspect pauses one
worker, not the fleet), so suspects run one per process in parallel; the price is that a
serving worker's shared lane pauses (after finishing what it runs): after a loss of k turns
the fleet spends about k turn-times / workers running them alone. (A separate quarantine
process per worker would keep the shared lane going, at the cost of a second interpreter and
SDK per worker; not done.)

**A turn that hangs its worker's event loop** (a CPU-bound tool) is covered the same way: the
loop cannot renew the leases or write the heartbeat, so all its turns' leases lapse, other
workers claim them and find them lost; the suspects run alone, the hanging turn hangs its
isolated worker and is then failed ``WorkerLost`` by whichever worker claims it next. The
hung processes' attempts are stale: when their loop runs again, their lease renewals and
outcome writes are refused (fencing), and they write nothing.

**The checks lane** (issue 17, ``workers/check_job.py``). Per served workflow that declares
checks, a third arq ``Worker`` reads the workflow's checks queue (``keys.workflow_checks_queue``)
with its own ``max_jobs`` (``TURNFLEET_CHECK_JOBS``, shared by the checks lanes of the
process), outside the switch: check jobs never take a turn's slot, never pause for the
isolated lane and never make a turn wait. (A check job may run beside an isolated turn: it is
no turn, and a check that kills its worker is the team's own check, run again elsewhere.) Its
jobs are not counted as turns in flight. Its poll (``workers/checks_lane.py``, every 50 ms)
takes the due jobs as one batch (issue 19).

A worker run by arq directly (``arq workers.settings.WorkerSettings``) has one plain lane: a
loss is an ordinary attempt there, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from arq.utils import to_seconds
from arq.worker import Worker
from redis.exceptions import RedisError

from turnfleet import keys
from turnfleet.models import DEFAULT_WORKFLOW
from turnfleet.queue import Lane, TurnQueue
from turnfleet.workers.checks_lane import POLL_DELAY_S as CHECKS_POLL_DELAY_S
from turnfleet.workers.checks_lane import checks_lane_class

log = structlog.get_logger(__name__)

CLAIM_LEASES = "claim_leases"
"""ctx flag of a lane whose claim sets the job's lease (``turn_lease_s``) on arq's in-progress
key instead of arq's job timeout (``TurnWorker.start_jobs``): the checks lanes, whose jobs
would otherwise cut it to one lease in a round trip of their own first."""
SWITCH_EVERY_S = 0.05  # how often a process looks for suspects waiting for the isolated lane


def busy(worker: Worker) -> bool:
    """The lane is reading its queue or has a turn running (its turns are not over)."""
    return bool(getattr(worker, "picking", False)) or any(not t.done() for t in worker.tasks.values())


class Lanes:
    """The shared and the isolated lane of one worker process, for each workflow it serves,
    and the switch between them.

    Routing (issue 16): a workflow's turns are queued only in its own queues
    (``keys.workflow_queue`` / ``keys.workflow_isolated_queue``), so per workflow served there
    is one shared-lane and one isolated-lane arq ``Worker``; a worker never reads another
    workflow's queue. The shared lanes *share* ``max_jobs`` (``TurnWorker.slots``): a busy
    workflow may use every slot while the others are idle, and the process never runs more
    than ``max_jobs`` turns; dividing it would leave slots idle under uneven load. The
    isolated lanes are one lane: at most one of them takes a turn, and only while no shared
    lane runs one ("alone means no neighbours in the process").

    ``main`` runs until one lane's poll loop fails (the error is raised: the supervisor
    handles it) or, with ``burst``, until every queue is empty and no turn runs.
    """

    def __init__(self, worker_cls: type[Worker], kwargs: dict[str, Any], *, burst: bool,
                 workflows: tuple[str, ...] = (DEFAULT_WORKFLOW,), checked: tuple[str, ...] = (),
                 check_jobs: int = 100) -> None:
        self.burst = burst
        self.workflows = tuple(dict.fromkeys(workflows)) or (DEFAULT_WORKFLOW,)
        self.ready = asyncio.Event()
        startup = kwargs.get("on_startup")

        async def on_startup(ctx: dict[str, Any]) -> None:
            if startup is not None:
                await startup(ctx)
            self.ready.set()

        base_ctx = kwargs.get("ctx", {})
        self.shared_lanes: list[Worker] = []
        self.isolated_lanes: list[Worker] = []
        for i, workflow in enumerate(self.workflows):
            # The first shared lane starts and stops the runtime every lane shares.
            owner = {"on_startup": on_startup} if i == 0 else {"on_startup": None, "on_shutdown": None}
            self.shared_lanes.append(worker_cls(**{
                **kwargs, **owner, "burst": False, "queue_name": keys.workflow_queue(workflow),
                "ctx": {**base_ctx, "lane": Lane.SHARED.value, "queue": keys.workflow_queue(workflow)}}))
            self.isolated_lanes.append(worker_cls(**{
                **kwargs, "burst": False, "queue_name": keys.workflow_isolated_queue(workflow), "max_jobs": 1,
                "on_startup": None, "on_shutdown": None,
                "ctx": {"lane": Lane.ISOLATED.value, "queue": keys.workflow_isolated_queue(workflow)},
            }))
        # The checks lanes: one per served workflow with checks, sharing ``check_jobs``.
        checks_cls = checks_lane_class(worker_cls)  # many check jobs per poll, one batch
        self.checks_lanes: list[Worker] = [
            checks_cls(**{
                **kwargs, "burst": False, "queue_name": keys.workflow_checks_queue(workflow),
                "max_jobs": check_jobs, "on_startup": None, "on_shutdown": None,
                "poll_delay": max(to_seconds(kwargs.get("poll_delay")) or 0.0, CHECKS_POLL_DELAY_S),
                "on_job_start": None, "on_job_end": None,  # not turns: not in the in-flight count
                # The claim sets the check jobs' lease (``claim_checks.lua``): no first renewal.
                "ctx": {"queue": keys.workflow_checks_queue(workflow), CLAIM_LEASES: True},
            })
            for workflow in dict.fromkeys(checked) if workflow in self.workflows
        ]
        for worker in self.checks_lanes:
            worker.slots = self.checks_lanes  # type: ignore[attr-defined]  # check_jobs is shared
        for worker in self.shared_lanes:
            worker.slots = self.shared_lanes  # type: ignore[attr-defined]  # max_jobs is shared
        for worker in self.isolated_lanes:
            worker.allow_pick_jobs = False
        self.stopping = False

    @property
    def shared(self) -> Worker:
        """The shared lane that owns the runtime (its ``on_startup`` built it)."""
        return self.shared_lanes[0]

    @property
    def workers(self) -> list[Worker]:
        """Every lane, in closing order: the runtime's owner last (its ``on_shutdown`` closes
        what the others use)."""
        return [*self.checks_lanes, *self.isolated_lanes, *self.shared_lanes[1:], self.shared]

    def stop_picking(self) -> None:
        """No lane takes a new turn from now on (the drain)."""
        self.stopping = True
        for worker in self.workers:
            worker.allow_pick_jobs = False

    async def main(self) -> None:
        tasks = [asyncio.create_task(self.shared.main(), name="arq-shared")]
        for worker in self.workers[:-1]:
            tasks.append(asyncio.create_task(self._after_startup(worker), name=f"arq-{worker.queue_name}"))
        tasks.append(asyncio.create_task(self._switch(), name="lane-switch"))
        self.shared.main_task = tasks[0]
        for worker, task in zip(self.workers[:-1], tasks[1:-1]):
            worker.main_task = task
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _after_startup(self, worker: Worker) -> None:
        await self.ready.wait()
        worker.ctx.update(runtime=self.shared.ctx["runtime"], in_flight=self.shared.ctx.get("in_flight"))
        await worker.main()

    def _shared_busy(self) -> bool:
        return any(busy(w) for w in self.shared_lanes)

    def _isolated_busy(self) -> bool:
        return any(busy(w) for w in self.isolated_lanes)

    def _shared_picking(self, allow: bool) -> None:
        for worker in self.shared_lanes:
            worker.allow_pick_jobs = allow

    async def _switch(self) -> None:
        await self.ready.wait()
        rt = self.shared.ctx["runtime"]
        queue: TurnQueue = rt.queue
        serving = False  # this worker serves the isolated lane (its shared lanes are paused)
        try:
            while True:
                await asyncio.sleep(SWITCH_EVERY_S)
                if self.stopping:
                    continue
                try:
                    waiting, serve, lane = await queue.isolated_lanes(rt.worker_name, self._isolated_busy(),
                                                                     workflows=self.workflows)
                except RedisError as exc:
                    log.warning("worker.lane_switch_failed", error=str(exc))
                    continue
                if serve:
                    if not serving:
                        log.info("worker.lane_isolated", suspects_waiting=waiting)
                    serving = True
                    self._shared_picking(False)
                    # Only once no turn runs (and none is being taken) may a suspect start, in
                    # one isolated lane: the one whose workflow has a suspect waiting.
                    if not self._isolated_busy():
                        for i, isolated in enumerate(self.isolated_lanes):
                            isolated.allow_pick_jobs = i == lane and not self._shared_busy() and not self.stopping
                    continue
                for isolated in self.isolated_lanes:
                    isolated.allow_pick_jobs = False
                if self._isolated_busy() or self.stopping:
                    continue  # (its turn ended between the look and now: next look)
                if serving:
                    log.info("worker.lane_shared")
                    serving = False
                self._shared_picking(True)
                if (self.burst and not waiting and not self._shared_busy()
                        and not any(busy(w) for w in self.checks_lanes) and await self._queues_empty(queue)):
                    return
        finally:
            if serving:
                with contextlib.suppress(RedisError, OSError):
                    await queue.leave_isolated_lane(rt.worker_name)

    async def _queues_empty(self, queue: TurnQueue) -> bool:
        async with queue.redis.pipeline(transaction=False) as pipe:
            for workflow in self.workflows:
                pipe.zcard(keys.workflow_queue(workflow))
                pipe.zcard(keys.workflow_isolated_queue(workflow))
            for worker in self.checks_lanes:
                pipe.zcard(worker.queue_name)
            counts = await pipe.execute()
        return not any(counts)
