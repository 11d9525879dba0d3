"""The checks lane: many check jobs per poll, run as one batch (issue 19).

A finished turn's check job (``workers/check_job.py``) run by arq alone costs a poll, a claim,
arq's ``run_job`` pipeline (GET, INCR, EXPIRE), its own read and write, a thread hop and arq's
bookkeeping: about as much CPU as a turn's whole telemetry, and ``max_jobs`` per poll caps the
lane below what the turn lanes finish. Here the lane's arq ``Worker`` keeps arq's poll loop,
health and close, but each poll

1. **claims a batch** in one script call (``workers/lua/claim_checks.lua``): up to the lane's
   free slots (``TURNFLEET_CHECK_JOBS``, shared by the process's checks lanes) among the due
   jobs, each one's in-progress key set to one lease (``turn_lease_s``), its try counter
   incremented and its payload returned — arq's ZRANGEBYSCORE, claim and ``run_job``
   pipeline for every job at once;
   The lane polls every ``POLL_DELAY_S`` (0.05 s; the turn lanes' ``poll_delay_s`` if longer):
   a check may wait that long, a turn never waits for it, and a fleet finishing 150 turns/s
   gives each poll ~7 jobs instead of ~1.5 at the turn lanes' 10 ms;
2. **runs the batch** in one task (:func:`~turnfleet.workers.check_job.run_check_jobs`: one
   read, the checks, one write that also does arq's clean-up of every job), renewing every
   job's lease in one pipeline while it runs.

What arq did per job is kept per job: a job whose payload is gone, undecodable or names
another turn is dead-lettered (logged, cleaned up, no outcome); a job of a newer format is put
back for a newer worker (its try undone); a job taken more than arq's ``max_tries`` times (its
workers were lost while it ran) is dead-lettered; a batch that fails on Redis puts each job
back ``retry_delay_s`` × tries later, and dead-letters it after ``CHECK_JOB_TRIES`` tries; a
drained (cancelled) batch releases its claims at once, the jobs staying queued for any worker;
a batch that raises anything else (a bug) is logged ``checks.batch_failed`` and its jobs are
retried as after a Redis error: the lane's poll loop goes on.
A check job never takes a turn's slot: the lane's slots are its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from typing import Any

import structlog
from arq.utils import timestamp_ms
from arq.worker import Worker
from redis.exceptions import RedisError

from turnfleet import keys, versions
from turnfleet.queue import CHECKS_FUNCTION
from turnfleet.scripts import BoundScript, load_script
from turnfleet.workers.check_job import CHECK_JOB_TRIES, CheckJob, keep_leases, run_check_jobs

__all__ = ["POLL_DELAY_S", "ChecksLane", "checks_lane_class"]

log = structlog.get_logger(__name__)

CLAIM_CHECKS = load_script("claim_checks", "turnfleet.workers")
POLL_DELAY_S = 0.05  # the lane's poll interval: checks wait, turns don't; a slower poll batches more
SCAN_FACTOR = 4  # a claim looks at up to this many due ids per free slot (others' held ones are skipped)
CHECK_PREFIX = keys.checks_job_id("")


class ChecksLane:
    """The checks lane's poll (module docstring); mixed into the process's arq ``Worker``
    class by :func:`checks_lane_class`, so the lane keeps arq's loop, pool and close."""

    _batches = itertools.count(1)

    async def _poll_iteration(self: Any) -> None:
        self.picking = self.allow_pick_jobs
        try:
            if self.allow_pick_jobs:
                slots = getattr(self, "slots", None) or [self]
                free = self.max_jobs - sum(w.job_counter for w in slots)
                if free > 0:
                    jobs = await self._claim(free)
                    if jobs:
                        self._start(jobs)
        finally:
            self.picking = False
        for name, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[name]
                task.result()  # a batch's error is the lane's (as arq: its poll loop ends)
        await self.heart_beat()

    def _claim_script(self: Any) -> BoundScript:
        bound = getattr(self, "_claim_checks", None)
        if bound is None or bound.registered.registered_client is not self.pool:
            bound = self._claim_checks = CLAIM_CHECKS.bind(self.pool)
        return bound

    def _lease_ms(self: Any) -> int:
        rt = self.ctx.get("runtime")
        if rt is not None and rt.settings.turn_lease_s > 0:
            return int(rt.settings.turn_lease_s * 1000)
        return int(self.in_progress_timeout_s * 1000)

    async def _claim(self: Any, free: int) -> list[tuple[str, int, bytes]]:
        reply = await self._claim_script()(
            keys={"queue": self.queue_name},
            args={"now_ms": timestamp_ms(), "lease_ms": self._lease_ms(), "limit": free,
                  "scan": free * SCAN_FACTOR, "job_prefix": keys.ARQ_JOB_PREFIX,
                  "in_progress_prefix": keys.ARQ_IN_PROGRESS_PREFIX, "retry_prefix": keys.ARQ_RETRY_PREFIX})
        return [(_text(reply[i]), int(reply[i + 1]), reply[i + 2]) for i in range(0, len(reply), 3)]

    def _start(self: Any, claimed: list[tuple[str, int, bytes]]) -> None:
        self.job_counter += len(claimed)
        task = self.loop.create_task(self._batch(claimed))

        def ended(_: asyncio.Task[None], n: int = len(claimed)) -> None:
            self.job_counter -= n

        task.add_done_callback(ended)
        self.tasks[f"checks-batch:{next(self._batches)}"] = task

    async def _batch(self: Any, claimed: list[tuple[str, int, bytes]]) -> None:
        rt = self.ctx["runtime"]
        jobs: list[CheckJob] = []
        newer: list[str] = []
        for job_id, tries, payload in claimed:
            job, is_newer = _job(job_id, tries, payload, self.max_tries)
            if is_newer:
                newer.append(job_id)
            else:
                jobs.append(job)
        if newer:
            await self._leave(rt, newer)
        if not jobs:
            return
        lease = asyncio.create_task(keep_leases(rt, [j.job_id for j in jobs], claimed=True))
        try:
            verdicts = await run_check_jobs(rt, jobs, self.queue_name, timeout_s=self.job_timeout_s)
            self.jobs_complete += len(verdicts)
        except RedisError as exc:
            await self._retry(rt, jobs, exc)
        except Exception as exc:  # noqa: BLE001 - a bug in one batch must not end the lane's poll loop
            log.exception("checks.batch_failed", jobs=len(jobs), error=f"{type(exc).__name__}: {exc}")
            self.jobs_failed += len(jobs)  # as arq counts a job that raised (a burst worker exits 1)
            await self._retry(rt, jobs, exc)
        except asyncio.CancelledError:
            # Drained: the jobs stay queued; their claims end now, for any worker (arq's retry_jobs).
            with contextlib.suppress(RedisError, OSError):
                await rt.redis.delete(*(keys.ARQ_IN_PROGRESS_PREFIX + j.job_id for j in jobs))
            raise
        finally:
            lease.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lease

    async def _retry(self: Any, rt: Any, jobs: list[CheckJob], exc: Exception) -> None:
        """After a Redis error (or a bug): each job back in the queue ``retry_delay_s`` × tries
        later, or dead-lettered after ``CHECK_JOB_TRIES`` tries (cleaned up: the turn is untouched)."""
        delay_s = rt.settings.retry_delay_s
        dead = [j for j in jobs if j.tries >= CHECK_JOB_TRIES]
        back = [j for j in jobs if j.tries < CHECK_JOB_TRIES]
        for job in dead:
            log.error("checks.dead_lettered", turn_id=job.turn_id, tries=job.tries,
                      reason=f"{type(exc).__name__}: {exc}", turn_outcome="untouched")
        if back:
            log.warning("checks.redis_unavailable", jobs=len(back), error=str(exc), retry_in_s=delay_s)
        now = timestamp_ms()
        try:
            async with rt.redis.pipeline(transaction=False) as pipe:
                for job in back:
                    pipe.zadd(self.queue_name, {job.job_id: now + int(delay_s * 1000 * job.tries)}, xx=True)
                    pipe.delete(keys.ARQ_IN_PROGRESS_PREFIX + job.job_id)
                for job in dead:
                    pipe.zrem(self.queue_name, job.job_id)
                    pipe.delete(keys.ARQ_IN_PROGRESS_PREFIX + job.job_id, keys.ARQ_RETRY_PREFIX + job.job_id,
                                keys.ARQ_JOB_PREFIX + job.job_id)
                await pipe.execute()
        except RedisError as again:  # still down: the claims lapse within a lease, the jobs run again
            log.warning("checks.retry_not_recorded", jobs=len(jobs), error=str(again))

    async def _leave(self: Any, rt: Any, job_ids: list[str]) -> None:
        """Jobs of a newer format: back in the queue ``retry_delay_s`` from now for a newer
        worker, this claim's try undone (as ``workers/job.py``'s ``leave_newer_job``)."""
        due = timestamp_ms() + int(rt.settings.retry_delay_s * 1000)
        async with rt.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                log.warning("checks.left_for_a_newer_worker", job_id=job_id)
                pipe.zadd(self.queue_name, {job_id: due}, xx=True)
                pipe.delete(keys.ARQ_IN_PROGRESS_PREFIX + job_id)
                pipe.decr(keys.ARQ_RETRY_PREFIX + job_id)
            await pipe.execute()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _job(job_id: str, tries: int, payload: Any, max_tries: int) -> tuple[CheckJob, bool]:
    """The claimed job as a :class:`CheckJob` (``dead`` set when it must not run), and whether
    it is of a newer format than this worker reads (left for a newer one)."""
    turn_id = job_id.removeprefix(CHECK_PREFIX)

    def dead(why: str) -> tuple[CheckJob, bool]:
        return CheckJob(turn_id, "", tries, dead=why), False

    if not payload:
        return dead("its job is gone (expired or erased)")
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        return dead(f"its job is not JSON ({type(exc).__name__})")
    if not isinstance(data, dict):
        return dead("its job is not a JSON object")
    version = versions.version_of(data.get(versions.FIELD))
    if version is not None and version > versions.JOB:
        return CheckJob(turn_id, "", tries), True
    args = data.get("a")
    if (version is None or data.get("f") != CHECKS_FUNCTION or not isinstance(args, list) or len(args) != 2
            or not all(isinstance(a, str) for a in args)):
        return dead(f"its job is not a check job of this format ({CHECKS_FUNCTION}, two ids)")
    if job_id != keys.checks_job_id(args[0]):
        return dead("its arguments name another turn than its job id")
    if tries > max_tries:
        return dead(f"taken {tries} times (max {max_tries}): its workers were lost while it ran")
    return CheckJob(args[0], args[1], tries), False


def checks_lane_class(worker_cls: type[Worker]) -> type[Worker]:
    """``worker_cls`` (the process's arq ``Worker`` class) with the checks lane's poll."""
    return type(f"Checks{worker_cls.__name__}", (ChecksLane, worker_cls), {})
