"""What belongs to one conversation, and erasing it.

``purge_plan`` names every key of a conversation and its turns, and every index entry that
names them: the retention purge (``telemetry/retention.py``) and erasure share it, so a kind of
data added later is forgotten by both or neither. The financial ledger (``keys.LEDGER_PREFIX``)
is never part of it.
"""

from __future__ import annotations

from turnfleet import keys


def purge_plan(conversation_id: str, turns: list[str], customer_id: str | None,
               facets: list[str]) -> tuple[list[str], list[str]]:
    """What purging one conversation deletes (keys) and removes from indexes (pairs)."""
    doomed: list[str] = []
    zrem: list[str] = []
    for t in turns:
        doomed += [keys.turn(t), keys.turn_quarantine(t), keys.turn_errors(t), keys.trace(t), keys.turn_events(t),
                   keys.event_seen(t), keys.aggregate("turn", t),
                   keys.ARQ_JOB_PREFIX + t, keys.ARQ_IN_PROGRESS_PREFIX + t, keys.ARQ_RETRY_PREFIX + t]
        zrem += [keys.aggregate_index("turn"), t, keys.SLOWEST_TURNS, t, keys.RAW_TEXT, t]
    sid = keys.session_id(conversation_id)
    doomed += [keys.conversation_active(conversation_id), keys.conversation_state(conversation_id),
               keys.conversation_turns(conversation_id), keys.conversation_facets(conversation_id),
               keys.aggregate("conversation", conversation_id), keys.session_messages(conversation_id),
               f"{keys.SESSION_PREFIX}:{sid}", keys.conversation_escalation(conversation_id)]
    zrem += [keys.CONVERSATIONS, conversation_id]
    if customer_id:
        zrem += [keys.customer_conversations(customer_id), conversation_id]
    for fv in facets:
        facet, _, value = fv.partition(":")
        if facet in keys.FACETS:
            zrem += [keys.facet_conversations(facet, value), conversation_id]
    ledger = [k for k in doomed if k.startswith(keys.LEDGER_PREFIX)]
    if ledger:  # an id that makes a key of the ledger: never delete a financial record
        raise ValueError(f"purge of {conversation_id!r} would delete ledger keys {ledger}")
    return doomed, zrem
