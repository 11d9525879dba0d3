"""Side effects once: ``turnfleet.once`` for a team's tools, and the mechanism under it.

A turn can run more than once: an attempt that fails after a tool ran (the model server
answered 500, the worker was killed) is retried, and the retry calls the tool again. A tool
whose work must happen once stores it with :func:`once`; what is stored *is* the side effect:

- without ``key``: once per turn per ``name``. The first attempt stores ``value``; a retried
  attempt of the same turn gets that stored value back, ``replayed=True`` (its own ``value``
  is ignored).
- with ``key`` (a business key: an account, an order): once per key, ever, per workflow and
  ``name``. The first turn stores it; its retries get it back ``replayed=True``; any other
  turn gets the first turn's value back, ``already=True``, with ``made_by_turn``.
- ``ledger`` (a stream name, ``tf:ledger:<name>``): one entry is appended, in the same Redis
  script as the record, only when the record is created — an outbox a team's own process
  reads to do the external work exactly once.

The honest limit: the record and its ledger entry happen once; code run *before* ``once``
(a call to an external API) runs again on a retry. Either do the external work from the
ledger (outbox), or pass :attr:`Once.idempotency_key` to an API that dedupes by it (it is the
same on every attempt: per turn and name, or per key): compute it first with
:func:`idempotency_key`, call the API with it, then record the answer with ``once``.

Records: per turn, a field of ``keys.turn_once(turn_id)`` (JSON with the turn, conversation and
customer ids): turn data, purged with the turn (``TURNFLEET_RETENTION_S``) and erased with it
(``turnfleet forget``). Per key, ``keys.once_by_key`` (the key only as a digest): ledger data,
like the refund records, never expired, purged or erased — and so are ledger entries; keep
personal data out of keyed values and ledger entries (pass ``entry=`` to choose what a ledger
entry holds).

The Support Desk's refund and escalation go through :func:`claim`, the same mechanism with a
record key and shape of their own (``keys.order_refund``, ``keys.conversation_escalation``,
unchanged so that records stored before stay valid). Every call makes a custom span
``once:<name>`` (created / replayed / already), and notes its outcome on the ``TurnContext``
by tool call id, so the tool's ``tool_end`` event and the replay show it even when the
tool's arguments and results are kept out of telemetry.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from turnfleet import keys
from turnfleet.context import TurnContext
from turnfleet.models import utcnow
from turnfleet.scripts import load_script

RECORD_ONCE = load_script("record_once")  # turnfleet/lua/record_once.lua
NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # no ':' (it separates key parts)
MAX_KEY_CHARS = 1024


class OnceError(ValueError):
    """A ``once`` call that cannot be stored as asked; the message names the argument."""


@dataclass(frozen=True)
class Once:
    """What :func:`once` found or made."""

    value: Any  # the stored value: this call's, or the one stored first
    created: bool  # this call stored it
    replayed: bool  # stored before by this same turn (a retried attempt)
    already: bool  # stored before by another turn (once per key)
    made_by_turn: str  # the turn that stored it
    idempotency_key: str  # the same on every attempt: per turn and name, or per key


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _turn_of(ctx: Any) -> tuple[TurnContext, str | None]:
    """The TurnContext of a ``RunContextWrapper`` (or itself), and the tool call id if any."""
    turn = getattr(ctx, "context", ctx)
    if not isinstance(turn, TurnContext):
        raise OnceError(f"once: ctx must be the tool's RunContextWrapper[TurnContext] or a TurnContext, "
                        f"not {type(turn).__name__}")
    return turn, getattr(ctx, "tool_call_id", None) or None


def _check_name(what: str, value: Any) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise OnceError(f"once: {what} {value!r} must be 1-64 letters, digits, '_', '.' or '-' "
                        "(starting with a letter or digit)")
    return value


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]


def _where(turn: TurnContext, name: str, key: Any) -> tuple[str, str | None]:
    """The Redis key (and hash field) of the record: per turn, or per business key."""
    if key is None:
        return keys.turn_once(turn.turn_id), name
    if isinstance(key, int) and not isinstance(key, bool):
        key = str(key)
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS:
        raise OnceError(f"once {name!r}: key must be a non-empty string of at most {MAX_KEY_CHARS} characters")
    return keys.once_by_key(turn.workflow, name, _digest(turn.workflow, name, key)), None


def _idempotency_key(record_key: str, field: str | None) -> str:
    return f"tf-once-{_digest(record_key, field or '')}"


def idempotency_key(ctx: Any, name: str, *, key: Any = None) -> str:
    """The :attr:`Once.idempotency_key` a ``once(ctx, name, ..., key=key)`` call returns, known
    before the call: hand it to an external API that dedupes, then record its answer."""
    turn, _ = _turn_of(ctx)
    return _idempotency_key(*_where(turn, _check_name("name", name), key))


async def once(ctx: Any, name: str, value: Any, *, key: Any = None, ledger: str | None = None,
               entry: Mapping[str, Any] | None = None) -> Once:
    """Store ``value`` as the side effect ``name`` of this turn (or of business ``key``), once.

    ``ctx``: the tool's ``RunContextWrapper[TurnContext]`` (pass the wrapper, not its
    ``.context``, so the replay can show the outcome on the tool call) or a ``TurnContext``.
    ``value``: JSON (a ``OnceError`` otherwise, before anything is written). ``ledger``: a
    stream name (``tf:ledger:<ledger>``) that gets one entry when the record is created:
    ``entry`` (field -> value, as text), by default the value and the turn's ids. See the
    module doc for what happens once and what does not.
    """
    turn, _ = _turn_of(ctx)
    _check_name("name", name)
    try:
        text = _dumps(value)
    except (TypeError, ValueError) as exc:
        raise OnceError(f"once {name!r}: value must be JSON (dicts, lists, strings, numbers, "
                        f"booleans, None): {exc}") from None
    stream = keys.once_ledger(_check_name("ledger", ledger)) if ledger is not None else None
    if entry is not None and (stream is None or not isinstance(entry, Mapping) or not entry
                              or not all(isinstance(k, str) for k in entry)):
        raise OnceError(f"once {name!r}: entry must be a non-empty mapping of field names, with a ledger")
    record_key, field = _where(turn, name, key)
    record = {
        "name": name,
        "value": value,
        "turn_id": turn.turn_id,
        "conversation_id": turn.conversation_id,
        "customer_id": turn.customer_id,
        "attempt": turn.attempt,
        "at": utcnow().isoformat(timespec="seconds"),
    }
    if stream is not None and entry is None:
        entry = {"name": name, "turn_id": turn.turn_id, "conversation_id": turn.conversation_id,
                 "customer_id": turn.customer_id, "attempt": turn.attempt, "at": record["at"],
                 "idempotency_key": _idempotency_key(record_key, field), "value": text}
    return await claim(ctx, name, record_key, record, field=field, ledger=stream, entry=entry,
                       value_of=lambda stored: stored.get("value"))


async def claim(
    ctx: Any,
    name: str,
    record_key: str,
    record: dict[str, Any],
    *,
    field: str | None = None,
    ledger: str | None = None,
    entry: Mapping[str, Any] | None = None,
    value_of: Callable[[dict[str, Any]], Any] = lambda stored: stored,
) -> Once:
    """The mechanism: store ``record`` (which names its ``turn_id``) at ``record_key`` (or its
    hash ``field``) unless one is there, with the ledger entry, and say what happened.

    For callers whose record key and shape are fixed (the Desk's refund and escalation); a
    team's tool uses :func:`once`."""
    from agents import custom_span  # here: importing turnfleet must not load the SDK

    turn, call_id = _turn_of(ctx)
    with custom_span(f"once:{name}", data={"name": name}) as span:
        created, stored = await record_once(turn.redis, record_key, record, ledger,
                                            {k: str(v) for k, v in (entry or {}).items()}, field=field)
        made_by = str(stored.get("turn_id"))
        ours = made_by == turn.turn_id
        made = Once(value=value_of(stored), created=created, replayed=ours and not created,
                    already=not ours, made_by_turn=made_by,
                    idempotency_key=_idempotency_key(record_key, field))
        span.span_data.data.update(created=made.created, replayed=made.replayed, already=made.already,
                                   made_by_turn=made_by)
    if call_id is not None:
        turn.note_once(call_id, created=made.created, replayed=made.replayed, already=made.already)
    return made


async def record_once(
    redis: Any,
    key: str,
    record: dict[str, Any],
    stream: str | None = None,
    entry: Mapping[str, str] | None = None,
    *,
    field: str | None = None,
) -> tuple[bool, dict[str, Any]]:
    """Store ``record`` at ``key`` (or its hash ``field``) unless something is there; on first
    store also XADD ``entry`` to ``stream``. Returns (created, the stored record). One script,
    so the record and the ledger entry are written together or not at all."""
    fields: list[str] = []
    for name, value in (entry or {}).items():
        fields += [name, value]
    created, stored = await RECORD_ONCE.bind(redis)(
        keys={"record": key, "stream": [stream] if stream else []},
        args={"value": _dumps(record), "field": field or "", "entry": fields})
    return bool(created), json.loads(stored)
