"""The reconciler: finds conversations left without a way forward and wakes them again.

The queue scripts keep a conversation's unfinished turns, its ``active`` marker and its
head's arq job consistent in every step they take; the reconciler covers what happens
*between* or *outside* those steps:

- a head turn with no arq job (in neither ``arq:queue`` nor the isolated lane's queue, or no
  ``arq:job:<id>``) that is not
  finished — an enqueue or wake-up interrupted half-way (Redis restarted from an AOF that
  lost its last second), a job that expired, a job arq itself marked failed (its own retry
  limit, its job timeout): the job is written again, atomically and only if still missing,
  and never while a worker holds the turn (its in-progress key exists);
- unfinished turns whose conversation has no ``active`` marker (or a marker naming another
  turn): the marker is set to the head and its job written if missing;
- finished turns still at a queue's head are dropped, and a marker left on an empty queue is
  removed;
- an in-progress key that outlives a lease (a worker killed between arq's claim, which sets
  the key for ``job_timeout`` + 10 s, and our ``START``, which sets the lease) is cut down to
  ``turn_lease_s``, so that turn too is picked up again within ``reconcile_every_s`` +
  ``turn_lease_s``.

Each conversation is repaired by one Lua script (``TurnQueue.reconcile_conversation``), so a
pass is idempotent and safe to run on every worker at once: a healthy conversation is left
exactly as it was. A conversation whose script fails (a key of the wrong type, written by
hand) is logged (``reconcile.conversation_failed``) and the pass goes on with the others.
(A turn record that cannot be decoded, or is no hash, counts as an unfinished head: its
job ends it ``CorruptTurnRecord`` when it starts, see ``workers/job.py``.) Every worker runs ``reconcile_forever`` (every ``reconcile_every_s``, first
pass at start-up); tests and tools call ``reconcile`` directly. What a pass changed is logged
per conversation (``reconcile.repaired``) and summed (``reconcile.pass``).

A pass walks every conversation ever seen (``tf:conversations``) in pages of ``page_size``:
two cheap reads per conversation (queue length, active marker) in one round trip a page, and
the repair script only for conversations with unfinished turns or a marker. That is still
O(conversations ever seen) per pass per worker; an index of open conversations (added by the
enqueue script, removed by finish when a queue empties) would make it O(open ones).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from turnfleet import keys
from turnfleet.queue import Reconciled, TurnQueue

log = structlog.get_logger(__name__)

PAGE_SIZE = 500


@dataclass
class ReconcileReport:
    """What one pass saw: conversations per action (``clamped`` included), and the repairs
    it made (conversations that could not have moved on by themselves)."""

    actions: Counter[str] = field(default_factory=Counter)
    repaired: list[Reconciled] = field(default_factory=list)

    @property
    def conversations(self) -> int:
        return sum(self.actions.values())

    def woken(self) -> list[str]:
        """Turn ids that got their arq job (or active marker) back in this pass."""
        return [r.turn_id for r in self.repaired if r.action in ("woke", "rewoke")]


async def reconcile(redis: Redis, *, lease_s: float = 0.0, page_size: int = PAGE_SIZE) -> ReconcileReport:
    """One pass over every conversation; see the module docstring for what is repaired.

    ``lease_s`` > 0 also cuts in-progress keys that outlive a lease down to one.
    """
    queue = TurnQueue(redis)
    report = ReconcileReport()
    cursor = 0
    while True:
        cursor, page = await redis.zscan(keys.CONVERSATIONS, cursor, count=page_size)
        open_ids = await _open_conversations([cid for cid, _score in page], redis)
        if len(open_ids) < len(page):
            report.actions["idle"] += len(page) - len(open_ids)
        for found in await queue.reconcile_many(open_ids, lease_s=lease_s):
            report.actions[found.action] += 1
            if found.action == "error":
                log.error("reconcile.conversation_failed", conversation_id=found.conversation_id,
                          error=found.error, action="skipped; the other conversations are repaired")
            elif found.action == "clamped":
                log.debug("reconcile.lease_clamped", conversation_id=found.conversation_id,
                          turn_id=found.turn_id)
            if found.changed:
                report.repaired.append(found)
                log.warning(
                    "reconcile.repaired",
                    conversation_id=found.conversation_id,
                    action=found.action,
                    turn_id=found.turn_id or None,
                    finished_turns_dropped=found.dropped,
                )
        if cursor == 0:
            break
    (log.info if report.repaired else log.debug)(
        "reconcile.pass", conversations=report.conversations, repaired=len(report.repaired),
        **{f"n_{k}": v for k, v in report.actions.items()},
    )
    return report


async def _open_conversations(conversation_ids: list[str], redis: Redis) -> list[str]:
    """Those with unfinished turns or an active marker (two cheap reads each, one round
    trip): a conversation with neither is idle and has nothing to repair."""
    if not conversation_ids:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for cid in conversation_ids:
            pipe.llen(keys.conversation_queue(cid))
            pipe.exists(keys.conversation_active(cid))
        # An error (a queue key of the wrong type) counts as open: its repair reports it.
        replies = await pipe.execute(raise_on_error=False)
    return [cid for i, cid in enumerate(conversation_ids) if replies[2 * i] or replies[2 * i + 1]]


async def reconcile_forever(redis: Redis, every_s: float, lease_s: float) -> None:
    """A worker's reconcile loop: a pass at start-up, then every ``every_s`` (±20 % jitter,
    so that workers started together do not pass together). Redis errors are logged and the
    next pass tries again; the loop ends only when cancelled."""
    while True:
        try:
            await reconcile(redis, lease_s=lease_s)
        except RedisError as exc:
            log.warning("reconcile.failed", error=str(exc))
        except Exception as exc:  # noqa: BLE001 - the loop must outlive one bad pass
            log.error("reconcile.failed", error=f"{type(exc).__name__}: {exc}", exc_info=True)
        await asyncio.sleep(every_s * random.uniform(0.8, 1.2))
