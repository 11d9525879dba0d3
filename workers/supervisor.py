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
import logging
import signal
from collections.abc import Callable
from typing import Any

import structlog
from arq import Retry
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, keep_cronjob_progress, retry_key_prefix
from arq.jobs import SerializationError, deserialize_job_raw, serialize_result
from arq.utils import args_to_string, ms_to_datetime, timestamp_ms, truncate
from arq.worker import JobExecutionFailed, RetryJob, Worker, get_kwargs, no_result
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

CLAIM_JOBS = load_script("claim_jobs", "turnfleet.workers")
RETRY_TTL_S = 88400  # how long arq keeps a job's try counter (arq.worker.run_job's EXPIRE)
arq_log = logging.getLogger("arq.worker")  # what arq's run_job logs to: the same lines from ours


@dataclasses.dataclass(frozen=True)
class Claimed:
    """What the claim script read for a job it claimed: what arq's ``run_job`` reads first."""

    payload: bytes | None  # the job as stored (None: its key expired)
    job_try: int  # arq's try counter after this claim
    aborted: bool  # it was in arq's abort set (asked to abort before it started)



class TurnWorker(Worker):
    """arq's ``Worker`` with these changes: after an attempt that was fenced out (a newer attempt
    of the turn, on another worker, owns it now) or a job handed to the isolated lane, arq's
    clean-up is skipped — it would delete the in-progress key (the newer attempt's lease) and,
    for a returned job, the job itself — and after a finish script did it already
    (``Runtime.cleaned``); a poll reads, claims and starts its jobs in one script call
    (``_poll_iteration``, ``start_jobs``); and ``picking`` says when a poll may be taking jobs
    (the lane switch, ``workers/isolation.py``, waits for it to end)."""

    picking = False

    async def _poll_iteration(self) -> None:
        """arq's, with its queue read (ZRANGEBYSCORE) and its per-job claim and start folded
        into one script call (``workers/lua/claim_jobs.lua``): one round trip a poll, whatever
        it takes, instead of one plus two a job."""
        self.picking = self.allow_pick_jobs
        try:
            count = self.queue_read_limit
            if self.burst and self.max_burst_jobs >= 0:
                burst_jobs_remaining = self.max_burst_jobs - self._jobs_started()
                if burst_jobs_remaining < 1:
                    return
                count = min(burst_jobs_remaining, count)
            if self.allow_pick_jobs and self.job_counter < self.max_jobs:
                await self._claim_and_start([], count)
            if self.allow_abort_jobs:
                await self._cancel_aborted_jobs()
            for job_id, t in list(self.tasks.items()):
                if t.done():
                    del self.tasks[job_id]
                    t.result()  # as arq: errors in run_job propagate
            await self.heart_beat()
        finally:
            self.picking = False

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's for these job ids (read from the queue by the caller): each claimed and
        started as ``_poll_iteration`` does its own, in one script call for all of them."""
        ids = []
        for job_id_b in job_ids:
            job_id = job_id_b.decode()
            running = self.tasks.get(job_id)
            if running is not None and not running.done():
                # This lane runs it now (its in-progress key is ours): arq asks Redis again at
                # every poll while it runs, and is told no; no round trip is needed for that.
                continue
            ids.append(job_id)
        if ids:
            await self._claim_and_start(ids, len(ids))

    def _free_slots(self) -> int:
        """How many more jobs this lane may start now: the lanes that share ``max_jobs``
        (``slots``: the shared lanes of every workflow served, ``workers/isolation.py``) run
        at most that many (arq alone counts this lane's only)."""
        slots: list[Worker] = getattr(self, "slots", None) or [self]
        return max(0, min(self.max_jobs - sum(w.job_counter for w in slots), self.max_jobs - self.job_counter))

    async def _claim_and_start(self, job_ids: list[str], read_limit: int) -> None:
        """Claim up to the free slots' worth of ``job_ids`` (none: the due jobs of the queue)
        in one script call, and run each claimed job in a task, as arq's ``start_jobs`` and
        ``run_job`` would (the try count and the payload come with the claim)."""
        free = self._free_slots()
        if free <= 0:
            return
        try:
            claimed = await self._claim_script()(
                keys={"queue": self.queue_name, "abort": abort_jobs_ss},
                args={"now_ms": timestamp_ms(), "offset": self._queue_read_offset, "read_limit": read_limit,
                      "free": free, "timeout_ms": self._claim_timeout_ms(),
                      "in_progress_prefix": in_progress_key_prefix, "job_prefix": job_key_prefix,
                      "retry_prefix": retry_key_prefix, "retry_ttl_s": RETRY_TTL_S,
                      "check_abort": "1" if self.allow_abort_jobs else "", "job_ids": job_ids})
        except ResponseError:
            return  # as arq: the jobs are left to whoever holds them
        for job_id_b, score, payload, job_try, aborted in claimed:
            await self.sem.acquire()  # free now (``_free_slots``): never waits
            self.job_counter += 1
            job_id = job_id_b.decode()
            claim = Claimed(payload, int(job_try), bool(aborted))
            task = self.loop.create_task(self.run_job(job_id, int(float(score)), claim))
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
            bound = self._claim = CLAIM_JOBS.bind(self.pool)
        return bound

    async def run_job(self, job_id: str, score: int, claim: Claimed | None = None) -> None:  # noqa: C901
        """arq 0.28's ``run_job`` from after its first transaction (GET job, INCR try, EXPIRE
        try, ZREM abort), whose answers come with the claim (``claim``; without one, arq's own
        runs): the same try counting, ``max_tries``, abort, timeout, retry and clean-up."""
        if claim is None:
            return await super().run_job(job_id, score)
        start_ms = timestamp_ms()
        v, job_try, abort_job = claim.payload, claim.job_try, claim.aborted
        function_name, enqueue_time_ms = "<unknown>", 0
        args: tuple[Any, ...] = ()
        kwargs: dict[Any, Any] = {}

        async def job_failed(exc: BaseException) -> None:
            self.jobs_failed += 1
            result_data_ = serialize_result(
                function=function_name, args=args, kwargs=kwargs, job_try=job_try,
                enqueue_time_ms=enqueue_time_ms, success=False, result=exc, start_ms=start_ms,
                finished_ms=timestamp_ms(), ref=f"{job_id}:{function_name}", serializer=self.job_serializer,
                queue_name=self.queue_name, job_id=job_id,
            )
            await asyncio.shield(self.finish_failed_job(job_id, result_data_))

        if not v:
            arq_log.warning("job %s expired", job_id)
            return await job_failed(JobExecutionFailed("job expired"))
        try:
            function_name, args, kwargs, enqueue_job_try, enqueue_time_ms = deserialize_job_raw(
                v, deserializer=self.job_deserializer)
        except SerializationError as e:
            arq_log.exception("deserializing job %s failed", job_id)
            return await job_failed(e)
        if abort_job:
            t = (timestamp_ms() - enqueue_time_ms) / 1000
            arq_log.info("%6.2fs ⊘ %s:%s aborted before start", t, job_id, function_name)
            return await job_failed(asyncio.CancelledError())
        try:
            function = self.functions[function_name]
        except KeyError:
            arq_log.warning("job %s, function %r not found", job_id, function_name)
            return await job_failed(JobExecutionFailed(f"function {function_name!r} not found"))
        if hasattr(function, "next_run"):  # a cron job
            ref: str = function_name
            keep_in_progress: float | None = keep_cronjob_progress
        else:
            ref = f"{job_id}:{function_name}"
            keep_in_progress = None
        if enqueue_job_try and enqueue_job_try > job_try:
            job_try = enqueue_job_try
            await self.pool.setex(retry_key_prefix + job_id, RETRY_TTL_S, str(job_try))
        max_tries = self.max_tries if function.max_tries is None else function.max_tries
        if job_try > max_tries:
            t = (timestamp_ms() - enqueue_time_ms) / 1000
            arq_log.warning("%6.2fs ! %s max retries %d exceeded", t, ref, max_tries)
            self.jobs_failed += 1
            result_data = serialize_result(
                function_name, args, kwargs, job_try, enqueue_time_ms, False,
                JobExecutionFailed(f"max {max_tries} retries exceeded"), start_ms, timestamp_ms(), ref,
                self.queue_name, job_id=job_id, serializer=self.job_serializer,
            )
            return await asyncio.shield(self.finish_failed_job(job_id, result_data))

        result: Any = no_result
        exc_extra = None
        finish = False
        timeout_s = self.job_timeout_s if function.timeout_s is None else function.timeout_s
        incr_score: int | None = None
        job_ctx = {"job_id": job_id, "job_try": job_try, "enqueue_time": ms_to_datetime(enqueue_time_ms),
                   "score": score}
        ctx = {**self.ctx, **job_ctx}
        if self.on_job_start:
            await self.on_job_start(ctx)
        start_ms = timestamp_ms()
        success = False
        try:
            s = args_to_string(args, kwargs)
            extra = f" try={job_try}" if job_try > 1 else ""
            if (start_ms - score) > 1200:
                extra += f" delayed={(start_ms - score) / 1000:0.2f}s"
            arq_log.info("%6.2fs → %s(%s)%s", (start_ms - enqueue_time_ms) / 1000, ref, s, extra)
            self.job_tasks[job_id] = task = self.loop.create_task(function.coroutine(ctx, *args, **kwargs))
            try:
                result = await asyncio.wait_for(task, timeout_s)
            except (Exception, asyncio.CancelledError) as e:
                exc_extra = getattr(e, "extra", None)
                if callable(exc_extra):
                    exc_extra = exc_extra()
                raise
            else:
                result_str = "" if result is None or not self.log_results else truncate(repr(result))
            finally:
                del self.job_tasks[job_id]
        except (Exception, asyncio.CancelledError) as e:
            finished_ms = timestamp_ms()
            t = (finished_ms - start_ms) / 1000
            if self.retry_jobs and isinstance(e, Retry):
                incr_score = e.defer_score
                arq_log.info("%6.2fs ↻ %s retrying job in %0.2fs", t, ref, (e.defer_score or 0) / 1000)
                if e.defer_score:
                    incr_score = e.defer_score + (timestamp_ms() - score)
                self.jobs_retried += 1
            elif job_id in self.aborting_tasks and isinstance(e, asyncio.CancelledError):
                arq_log.info("%6.2fs ⊘ %s aborted", t, ref)
                result = e
                finish = True
                self.aborting_tasks.remove(job_id)
                self.jobs_failed += 1
            elif self.retry_jobs and isinstance(e, (asyncio.CancelledError, RetryJob)):
                arq_log.info("%6.2fs ↻ %s cancelled, will be run again", t, ref)
                self.jobs_retried += 1
            else:
                arq_log.exception("%6.2fs ! %s failed, %s: %s", t, ref, e.__class__.__name__, e,
                                  extra={"extra": exc_extra})
                result = e
                finish = True
                self.jobs_failed += 1
        else:
            success = True
            finished_ms = timestamp_ms()
            arq_log.info("%6.2fs ← %s ● %s", (finished_ms - start_ms) / 1000, ref, result_str)
            finish = True
            self.jobs_complete += 1

        keep_result_forever = (
            self.keep_result_forever if function.keep_result_forever is None else function.keep_result_forever)
        result_timeout_s = self.keep_result_s if function.keep_result_s is None else function.keep_result_s
        result_data = None
        if result is not no_result and (keep_result_forever or result_timeout_s > 0):
            result_data = serialize_result(
                function_name, args, kwargs, job_try, enqueue_time_ms, success, result, start_ms, finished_ms,
                ref, self.queue_name, job_id=job_id, serializer=self.job_serializer,
            )
        if self.on_job_end:
            await self.on_job_end(ctx)
        await asyncio.shield(self.finish_job(job_id, finish, result_data, result_timeout_s, keep_result_forever,
                                             incr_score, keep_in_progress))
        if self.after_job_end:
            await self.after_job_end(ctx)

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
    """``turnfleet worker``: ``supervise`` in a fresh event loop (``event_loop_factory``'s).
    Exit status 0, or 1 if any job failed inside arq (an exception our job did not turn
    into an outcome)."""
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(supervise(redis_url, burst=burst))


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The worker's event loop: uvloop's where it is installed (a dependency except on
    Windows), else asyncio's own (None). A worker's turns are many small Redis round trips
    and task switches around the SDK run; uvloop's loop and socket transports (libuv, C)
    cost less CPU per switch and per write than asyncio's (``make bench``, section 1c)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


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
