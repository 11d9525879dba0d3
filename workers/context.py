"""What a turn's agents and tools can see: the ``context`` of the SDK's RunContextWrapper."""

from __future__ import annotations

from dataclasses import dataclass, field

from redis.asyncio import Redis


@dataclass
class TurnContext:
    """Per-turn state handed to ``Runner.run(context=...)``.

    Tools use ``redis`` for side effects that must happen once (the refund ledger) and key
    them by ``turn_id`` so a retried attempt of the same turn finds what the first did.
    """

    turn_id: str
    conversation_id: str
    customer_id: str
    attempt: int
    redis: Redis
    metadata: dict[str, str] = field(default_factory=dict)
