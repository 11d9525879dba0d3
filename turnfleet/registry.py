"""The workflow registry: which workflows the fleet knows, in which versions.

Workers register the workflows they serve when they start (name, declared version,
fingerprint: ``turnfleet.Workflow``); the registry outlives them, so a turn for a workflow
whose workers are all stopped is still known (it waits for them) while a turn for a workflow
no worker ever served is refused at the edge (``agent``), at the Python API, the CLI and over
HTTP. The built-in workflow (``support-desk``) is always known.

Keys (``turnfleet/keys.py``): ``tf:workflows`` (hash: name -> the latest registration, JSON)
and ``tf:workflow:versions:<name>`` (hash: fingerprint -> that version's registration, JSON:
``version``, ``fingerprint``, ``first_seen``, ``last_seen``, ``worker``, ``redaction_patterns``,
``prices`` when the workflow declares its own).

Redaction patterns (``Workflow.redaction_patterns``) apply fleet-wide: every process redacts
with the union of the registered workflows' patterns on top of ``TURNFLEET_REDACT_PATTERNS``
(:func:`redactor`). Only workers load the app; the telemetry consumer, the CLI, the HTTP
routes and the producer learn the patterns here. Over-redacting another workflow's text is
harmless, and one set keeps one ``Redactor`` per process. A workflow's latest registration
is what counts: a pattern removed in a new version stops applying once it registers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from turnfleet import keys
from turnfleet.models import DEFAULT_WORKFLOW, utcnow
from turnfleet.redaction import RedactionSettings, Redactor, redactor_for


@dataclass(frozen=True)
class Registration:
    """What a worker says about one workflow it serves."""

    name: str
    fingerprint: str
    version: str | None = None
    redaction_patterns: tuple[str, ...] = ()
    prices: dict[str, dict[str, float]] | None = None  # model -> USD per 1M tokens (Price fields)


def registrations(workflows: Iterable[Any]) -> list[Registration]:
    """What a worker registers for its app's workflows (``turnfleet.Workflow``).

    A workflow whose ``redaction_patterns`` is not a list of regexes that compile is refused
    (``WorkflowError``, one line naming it) before anything is registered: a pattern that
    could not apply must not look as if it did.
    """
    from turnfleet.workflow import WorkflowError

    out = []
    for w in workflows:
        patterns = w.redaction_patterns
        if isinstance(patterns, (str, bytes)):
            raise WorkflowError(f"Workflow {w.name!r}: redaction_patterns must be a list of regexes, "
                                f"not one string")
        for p in patterns:
            if not isinstance(p, str):
                raise WorkflowError(f"Workflow {w.name!r}: redaction pattern {p!r} is not a string")
            try:
                re.compile(p)
            except re.error as exc:
                raise WorkflowError(f"Workflow {w.name!r}: redaction pattern {p!r} does not compile: {exc}") from None
        out.append(Registration(w.name, w.fingerprint(), w.version, tuple(patterns), _prices(w)))
    return out


def _prices(workflow: Any) -> dict[str, dict[str, float]] | None:
    """``Workflow.prices`` as plain JSON, each entry checked as a ``turnfleet.settings.Price``
    (a ``Price`` or a mapping with ``input``, ``cached_input``, ``output``: USD per 1M tokens)."""
    from pydantic import ValidationError

    from turnfleet.settings import Price
    from turnfleet.workflow import WorkflowError

    if not workflow.prices:
        return None
    out = {}
    for model, price in dict(workflow.prices).items():
        try:
            checked = price if isinstance(price, Price) else Price.model_validate(price)
        except ValidationError as exc:
            problem = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'price'}: {e['msg']}" for e in exc.errors())
            raise WorkflowError(f"Workflow {workflow.name!r}: price of {model!r}: {problem}") from None
        if min(checked.input, checked.cached_input, checked.output) < 0:
            raise WorkflowError(f"Workflow {workflow.name!r}: price of {model!r}: prices cannot be negative")
        out[str(model)] = checked.model_dump()
    return out


async def register(redis: Redis, served: Iterable[Registration], worker: str) -> None:
    """Record (or refresh) each workflow and its version as served by ``worker``, now."""
    now = utcnow().isoformat()
    served = list(served)
    if not served:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for r in served:
            versions = keys.workflow_versions(r.name)
            pipe.hget(versions, r.fingerprint)
        before = await pipe.execute()
    async with redis.pipeline(transaction=True) as pipe:
        for r, seen in zip(served, before):
            first = _field(seen, "first_seen") or now
            record = json.dumps({"name": r.name, "version": r.version, "fingerprint": r.fingerprint,
                                 "first_seen": first, "last_seen": now, "worker": worker,
                                 "redaction_patterns": list(r.redaction_patterns),
                                 **({"prices": r.prices} if r.prices else {})},
                                separators=(",", ":"))
            pipe.hset(keys.workflow_versions(r.name), r.fingerprint, record)
            pipe.hset(keys.WORKFLOWS, r.name, record)
        await pipe.execute()


def _field(raw: Any, name: str) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw).get(name)
    except (ValueError, AttributeError):
        return None


async def unknown(redis: Redis, names: Iterable[str]) -> set[str]:
    """Those of ``names`` no worker ever registered (the built-in workflow is always known)."""
    wanted = sorted({n for n in names if n != DEFAULT_WORKFLOW})
    if not wanted:
        return set()
    found = await redis.hmget(keys.WORKFLOWS, wanted)
    return {name for name, record in zip(wanted, found) if record is None}


async def workflows(redis: Redis) -> dict[str, dict[str, Any]]:
    """Every registered workflow's latest registration, by name (the built-in one included)."""
    out: dict[str, dict[str, Any]] = {DEFAULT_WORKFLOW: {"name": DEFAULT_WORKFLOW, "builtin": True}}
    for name, raw in (await redis.hgetall(keys.WORKFLOWS)).items():
        try:
            out[name] = {**out.get(name, {}), **json.loads(raw)}
        except ValueError:
            out[name] = {"name": name, "unreadable": True}
    return out


async def redaction_patterns(redis: Redis) -> tuple[str, ...]:
    """The union of every registered workflow's redaction patterns, sorted (one ``HGETALL``
    of a small hash). A pattern that does not compile here is left out, never an error."""
    found: set[str] = set()
    for raw in (await redis.hgetall(keys.WORKFLOWS)).values():
        patterns = _field(raw, "redaction_patterns")
        if isinstance(patterns, list):
            found.update(p for p in patterns if isinstance(p, str) and _compiles(p))
    return tuple(sorted(found))


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


async def redactor(redis: Redis, settings: RedactionSettings, own: Sequence[str] = ()) -> Redactor:
    """This process's redactor now: ``settings`` (``TURNFLEET_REDACT_*``), the fleet's
    workflows' patterns (:func:`redaction_patterns`) and ``own`` (a worker's app's). Cheap to
    call per request: the ``Redactor`` is rebuilt only when the set changes."""
    return redactor_for(settings, (*await redaction_patterns(redis), *own))


async def workflow_prices(redis: Redis) -> dict[str, dict[str, dict[str, float]]]:
    """Each registered workflow's own prices (``Workflow.prices``, latest registration), by
    workflow name; workflows without any are left out. Read by the telemetry consumer, which
    prices a call of that workflow's turns with them over ``TURNFLEET_PRICES``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, raw in (await redis.hgetall(keys.WORKFLOWS)).items():
        prices = _field(raw, "prices")
        if isinstance(prices, dict) and prices:
            out[name.decode() if isinstance(name, bytes) else name] = prices
    return out


async def versions(redis: Redis, name: str) -> list[dict[str, Any]]:
    """Every version (fingerprint) of a workflow ever registered, oldest first."""
    rows = []
    for raw in (await redis.hgetall(keys.workflow_versions(name))).values():
        try:
            rows.append(json.loads(raw))
        except ValueError:
            continue
    return sorted(rows, key=lambda r: r.get("first_seen") or "")


def unknown_message(name: str, known: Iterable[str]) -> str:
    listed = ", ".join(sorted(known)) or DEFAULT_WORKFLOW
    return f"unknown workflow {name!r}: no worker has served it (known: {listed})"
