"""``turnfleet worker``: arq under a supervisor that adds what arq 0.28 lacks.

- **Survives Redis restarts.** arq's poll loop ends on a connection error (arq #435, #498).
  The supervisor logs it (``worker.redis_lost``), lets the turns in flight finish (or fail)
  within the drain grace, backs off (0.5 s doubling to 15 s) and starts a new arq ``Worker``
  with the same settings and ctx, until SIGTERM/SIGINT. ``--burst`` keeps its meaning: the
  supervised worker drains the queue, then the process exits; a burst run must end, so it
  waits for Redis (at start, and after losing it) at most ``connect_timeout_s``, then raises
  ``RedisUnavailable`` (the CLI prints one line, exit 1).
- **Drains on SIGTERM/SIGINT.** No new turns are taken; running turns get
  ``drain_grace_s`` to finish (arq's ``job_completion_wait``, done here because signal
  handling must outlive one arq ``Worker``); those still running are then cancelled — each
  records a ``WorkerStopped`` attempt error and arq puts its job back for another worker
  (``retry_jobs``). A second signal skips what is left of the grace.
- **Leases instead of arq's in-progress timeout** (``workers/job.py``): a SIGKILLed worker's
  turn runs again on another worker within ``turn_lease_s`` + ``poll_delay_s`` (plus, on a
  saturated fleet, the wait for a free slot), and
  ``TurnWorker`` leaves the job alone when an attempt was fenced out by a newer one.
- **Two lanes per workflow served** (``workers/isolation.py``): the shared one (the workflow's
  queue, ``arq:queue`` for the built-in one; every shared lane of the process shares
  ``max_jobs``) and the isolated one (``arq:queue:isolated`` for the built-in one; one turn in
  the process, only while no shared lane runs one), where turns lost with a worker run again
  alone; drained and closed together. A worker reads only the queues of what it serves.
- **A checks lane per workflow with checks** (``workers/isolation.py``, ``workers/check_job.py``):
  a finished turn's check job runs there, ``TURNFLEET_CHECK_JOBS`` at a time, never in a turn's slot.
- **A reconciler** on every worker (``workers/reconcile.py``, every ``reconcile_every_s``).

The arq settings, startup and shutdown it runs are ``workers/settings.py``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
from typing import Any

import structlog
from arq.utils import timestamp_ms
from arq.worker import Worker, get_kwargs
from redis.exceptions import RedisError, ResponseError

from turnfleet import keys
from turnfleet.connection import connect, wait_for_redis
from turnfleet.models import DEFAULT_WORKFLOW
from turnfleet.scripts import BoundScript, load_script
from turnfleet.settings import WorkerProcessSettings
from turnfleet.workflow import load_app
from turnfleet.workers.isolation import CLAIM_LEASES, Lanes
from turnfleet.workers.settings import WorkerSettings, redis_settings

log = structlog.get_logger(__name__)

CLAIM_JOB = load_script("claim_job", "turnfleet.workers")


class TurnWorker(Worker):
    """arq's ``Worker`` with these changes: after an attempt that was fenced out (a newer attempt
    of the turn, on another worker, owns it now) or a job handed to the isolated lane, arq's
    clean-up is skipped — it would delete the in-progress key (the newer attempt's lease) and,
    for a returned job, the job itself — and after a finish script did it already
    (``Runtime.cleaned``); a job is claimed in one script call (``start_jobs``); and
    ``picking`` says when a poll may be taking jobs (the lane switch,
    ``workers/isolation.py``, waits for it to end)."""

    picking = False

    async def _poll_iteration(self) -> None:
        self.picking = self.allow_pick_jobs
        try:
            await super()._poll_iteration()
        finally:
            self.picking = False

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's, stopping once the lanes that share ``max_jobs`` (``slots``: the shared lanes
        of every workflow served, ``workers/isolation.py``) run that many turns (arq alone
        counts this lane's only), and claiming each job in one script call
        (``workers/lua/claim_job.lua``: arq's WATCH/EXISTS/ZSCORE/MULTI/PSETEX/EXEC, the same
        check-and-set in one round trip instead of four)."""
        slots: list[Worker] = getattr(self, "slots", None) or [self]
        claim = self._claim_script()
        for job_id_b in job_ids:
            if sum(w.job_counter for w in slots) >= self.max_jobs:
                return
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                return
            self.job_counter += 1
            job_id = job_id_b.decode()
            running = self.tasks.get(job_id)
            if running is not None and not running.done():
                # This lane runs it now (its in-progress key is ours): arq asks Redis again at
                # every poll while it runs, and is told no; no round trip is needed for that.
                self.job_counter -= 1
                self.sem.release()
                continue
            try:
                score = await claim(keys={"in_progress": keys.ARQ_IN_PROGRESS_PREFIX + job_id, "queue": self.queue_name},
                                    args={"job_id": job_id, "now_ms": timestamp_ms(),
                                          "timeout_ms": self._claim_timeout_ms()})
            except ResponseError:
                score = None  # as arq: the job is left to whoever holds it
            except BaseException:
                self.job_counter -= 1
                self.sem.release()
                raise
            if score is None:
                # Running elsewhere, finished, or due later (re-queued with a delay).
                self.job_counter -= 1
                self.sem.release()
                continue
            task = self.loop.create_task(self.run_job(job_id, int(float(score))))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    def _claim_timeout_ms(self) -> int:
        """How long the claim holds the job: one lease on a lane whose jobs renew it
        (``CLAIM_LEASES``: the checks lanes), else arq's job timeout + 10 s, as arq."""
        rt = self.ctx.get("runtime")
        if self.ctx.get(CLAIM_LEASES) and rt is not None and rt.settings.turn_lease_s > 0:
            return int(rt.settings.turn_lease_s * 1000)
        return int(self.in_progress_timeout_s * 1000)

    def _claim_script(self) -> BoundScript:
        bound = getattr(self, "_claim", None)
        if bound is None or bound.registered.registered_client is not self.pool:
            bound = self._claim = CLAIM_JOB.bind(self.pool)
        return bound

    async def finish_job(self, job_id: str, finish: bool, *args: Any, **kwargs: Any) -> None:
        rt = self.ctx.get("runtime")
        if rt is not None and job_id in rt.cleaned:
            rt.cleaned.discard(job_id)  # the finish script did arq's clean-up already
            return
        if rt is not None and job_id in rt.fenced:
            rt.fenced.discard(job_id)
            log.info("turn.arq_cleanup_skipped", turn_id=job_id, reason="a newer attempt owns the job")
            return
        await super().finish_job(job_id, finish, *args, **kwargs)


RECONNECT_FIRST_S = 0.5  # first wait before a new arq Worker after Redis was lost
RECONNECT_MAX_S = 15.0  # longest wait; a Worker that ran this long resets the backoff
CANCELLED_CLEANUP_S = 10.0  # how long cancelled turns get to record their attempt
# A poll loop that ends with one of these lost Redis (or Redis refused it: LOADING after a
# restart, READONLY after a failover, a WATCH cut by a dropped connection): start a new
# Worker after a backoff. Anything else is a bug: the process exits with it.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)


def run(redis_url: str | None, *, burst: bool = False) -> int:
    """``turnfleet worker``: ``supervise`` in a fresh event loop. Exit status 0, or 1 if
    any job failed inside arq (an exception our job did not turn into an outcome)."""
    return asyncio.run(supervise(redis_url, burst=burst))


async def supervise(redis_url: str | None, *, burst: bool = False, ctx: dict[str, Any] | None = None) -> int:
    """Run arq ``Worker``s one after another until SIGTERM/SIGINT (or, with ``burst``, until
    the queue is drained); see the module docstring. ``ctx`` is added to every Worker's ctx."""
    settings = WorkerProcessSettings()
    if burst:
        # A burst run must end: wait for Redis a bounded time, then give up (one line, exit 1).
        await _redis_within(redis_url, settings.connect_timeout_s)
    loop = asyncio.get_running_loop()
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            hurry.set()
            log.warning("worker.stop_now", signal=sig.name)
            return
        log.info("worker.stopping", signal=sig.name, drain_grace_s=settings.drain_grace_s)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    shared_ctx: dict[str, Any] = {"redis_url": redis_url, **(ctx or {})}
    workflows = served_workflows(settings)
    kwargs = {
        **get_kwargs(WorkerSettings),
        # No retries inside arq's pool creation: the loop below retries, logging each one.
        "redis_settings": dataclasses.replace(redis_settings(redis_url), conn_retries=0),
        "burst": burst,
        "ctx": shared_ctx,
        "handle_signals": False,  # ours, above: they must outlive one Worker
    }
    jobs_failed = 0
    backoff = RECONNECT_FIRST_S
    try:
        while not stop.is_set():
            lanes = Lanes(TurnWorker, kwargs, burst=burst, workflows=workflows,
                          checked=checked_workflows(settings), check_jobs=settings.check_jobs)
            began = loop.time()
            main = asyncio.create_task(lanes.main(), name="arq-lanes")
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({main, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not main.done():  # a stop signal
                await _drain(lanes, settings.drain_grace_s, hurry)
                await _close(lanes, main)
                jobs_failed += _jobs_failed(lanes)
                break
            error = None if main.cancelled() else main.exception()
            if error is None:  # burst: the queue is drained
                await _close(lanes, main)
                jobs_failed += _jobs_failed(lanes)
                break
            if not isinstance(error, CONNECTION_ERRORS):
                await _drain(lanes, settings.drain_grace_s, hurry)
                await _close(lanes, main)
                raise error
            if loop.time() - began >= RECONNECT_MAX_S:
                backoff = RECONNECT_FIRST_S
            log.error("worker.redis_lost", error=f"{type(error).__name__}: {error}",
                      restart_in_s=None if burst else backoff)
            await _drain(lanes, settings.drain_grace_s, hurry)
            await _close(lanes, main)
            jobs_failed += _jobs_failed(lanes)
            if burst:
                await _redis_within(redis_url, settings.connect_timeout_s)
                continue
            try:
                await asyncio.wait_for(stop.wait(), backoff)
            except asyncio.TimeoutError:
                pass
            backoff = min(backoff * 2, RECONNECT_MAX_S)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("worker.stopped", jobs_failed=jobs_failed)
    return 0 if not jobs_failed else 1


def served_workflows(settings: WorkerProcessSettings) -> tuple[str, ...]:
    """The names of the workflows this worker serves (``--app``, or the built-in one): each
    gets its own lanes, on its own queues. (Loading the app here imports it once; startup's
    ``load_app`` gets the same module's objects.)"""
    if not settings.app:
        return (DEFAULT_WORKFLOW,)
    return tuple(w.name for w in load_app(settings.app).workflows)


def checked_workflows(settings: WorkerProcessSettings) -> tuple[str, ...]:
    """The served workflows that declare checks: each gets a checks lane (``workers/isolation.py``)."""
    if not settings.app:
        from turnfleet.workers.support_desk_checks import SUPPORT_DESK_CHECKS

        return (DEFAULT_WORKFLOW,) if SUPPORT_DESK_CHECKS else ()
    return tuple(w.name for w in load_app(settings.app).workflows if w.checks)


async def _redis_within(redis_url: str | None, timeout_s: float) -> None:
    """Return once Redis answers; ``RedisUnavailable`` after ``timeout_s`` (burst runs)."""
    probe = connect(redis_url or "redis://localhost:6379/0")
    try:
        await wait_for_redis(probe, timeout_s, "worker", redis_url)
    finally:
        with contextlib.suppress(RedisError, OSError):
            await probe.aclose()


def _jobs_failed(lanes: Lanes) -> int:
    return sum(w.jobs_failed for w in lanes.workers)


async def _drain(lanes: Lanes, grace_s: float, hurry: asyncio.Event) -> None:
    """Take no new turns; give running ones ``grace_s`` (less if ``hurry`` is set) to end,
    then cancel the rest and give them ``CANCELLED_CLEANUP_S`` to record their attempt."""
    lanes.stop_picking()
    rt = lanes.shared.ctx.get("runtime")
    if rt is not None:
        rt.stopping = True

    def running() -> list[asyncio.Task[Any]]:
        return [t for w in lanes.workers for t in w.tasks.values() if not t.done()]

    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    in_flight = running()
    if in_flight:
        log.info("worker.draining", in_flight=len(in_flight), grace_s=grace_s)
    hurried = asyncio.create_task(hurry.wait())
    try:
        while not hurry.is_set():
            pending = set(running())
            remaining = deadline - loop.time()
            if not pending or remaining <= 0:
                break
            await asyncio.wait(pending | {hurried}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hurried.cancel()
    left = running()
    if left:
        log.warning("worker.drain_grace_over", cancelling=len(left), action="turns requeued")
        for task in left:
            task.cancel()
        await asyncio.wait(left, timeout=CANCELLED_CLEANUP_S)
    elif in_flight:
        log.info("worker.drained", turns=len(in_flight))


async def _close(lanes: Lanes, main: asyncio.Task[None]) -> None:
    """Stop the poll loops and close both Workers (the isolated lane first: the shared one's
    ``on_shutdown`` closes the runtime they share), also when Redis is gone (arq's own
    ``close`` gives up at its first Redis error and would skip ``on_shutdown``)."""
    if not main.done():
        main.cancel()
        await asyncio.wait([main])
    for worker in lanes.workers:
        await _close_worker(worker)


async def _close_worker(worker: Worker) -> None:
    main = worker.main_task
    if main is not None and not main.done():
        main.cancel()
        await asyncio.wait([main])
    for task in list(worker.tasks.values()):
        if not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=CANCELLED_CLEANUP_S)
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.warning("worker.job_task_error", error=repr(task.exception()))
    pool = worker._pool  # arq has no public "is connected"
    if pool is None:
        return
    if worker.on_shutdown is not None:
        try:
            await worker.on_shutdown(worker.ctx)
        except Exception as exc:  # noqa: BLE001 - closing must go on
            log.warning("worker.shutdown_failed", error=f"{type(exc).__name__}: {exc}")
    with contextlib.suppress(RedisError, OSError):
        await pool.delete(worker.health_check_key)
    with contextlib.suppress(RedisError, OSError):
        await pool.close(close_connection_pool=True)
    worker._pool = None
