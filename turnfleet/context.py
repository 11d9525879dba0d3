"""What a turn's agents and tools can see: the ``context`` of the SDK's RunContextWrapper.

Public (``turnfleet.TurnContext``): a team's tool types its first parameter
``RunContextWrapper[TurnContext]`` and reads the turn it runs in. Imports no SDK.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from turnfleet.models import DEFAULT_WORKFLOW


@dataclass
class OnceNote:
    """What the ``once`` calls of one tool call found (the replay shows it)."""

    created: bool = False  # this call stored it
    replayed: bool = False  # a retried attempt got its own turn's earlier value back
    already: bool = False  # another turn had made it (once per key)


@dataclass
class TurnContext:
    """Per-turn state handed to ``Runner.run(context=...)``.

    Tools use ``redis`` for side effects that must happen once (``turnfleet.once``) and key
    them by ``turn_id`` so a retried attempt of the same turn finds what the first did.
    ``attempt`` counts from 1; ``metadata`` is the request's. ``workflow`` is the name of the
    workflow the turn runs in (what ``once(..., key=...)`` records are scoped by).
    """

    turn_id: str
    conversation_id: str
    customer_id: str
    attempt: int
    redis: Any  # redis.asyncio.Redis (typed loosely: importing this module stays cheap)
    metadata: dict[str, str] = field(default_factory=dict)
    workflow: str = DEFAULT_WORKFLOW
    # tool call id -> what its ``once`` calls found; the hooks take it at the tool's end.
    once_notes: dict[str, OnceNote] = field(default_factory=dict, repr=False)

    def note_once(self, call_id: str, *, created: bool, replayed: bool, already: bool) -> None:
        note = self.once_notes.setdefault(call_id, OnceNote())
        note.created |= created
        note.replayed |= replayed
        note.already |= already

    def take_once_note(self, call_id: str) -> OnceNote | None:
        return self.once_notes.pop(call_id, None)
