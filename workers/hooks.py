"""Lifecycle hooks that turn one agent run into telemetry events and a turn summary.

Events are collected in memory and written in one batch when the attempt ends (one Redis
round trip per turn, not per hook: measured +0.6 ms a turn against +1.3–2 ms). Parameter
names match ``agents/lifecycle.py`` because the SDK calls hooks with keyword arguments.
Each event follows its kind's payload class (``turnfleet.events``), the contract the consumer
and the replay read it with. The hooks write it straight in its wire form (a dict, as
``TelemetryEvent.export`` would give it): building a pydantic model per event and dumping it
again cost ~35 µs an event, ~0.5 ms a turn (issue 19). ``events`` gives them as the contract's
models, built on demand (tests), and the tests check the two forms are the same JSON. The batch is format version ``turnfleet.versions.BATCH``
(the finish script writes it in the stream entry's ``v``): a change to it that older consumers
would misread is a new batch version (see ``turnfleet.events``).

**Which model.** Each ``llm_start``/``llm_end`` names the model that made that call, so the
consumer prices and counts it at that model's price: the calling agent's own ``model``
(:func:`model_name_of`), else the run's default (``model_name``: ``TURNFLEET_MODEL_NAME``).
A turn-level event names one model: ``turn_started`` the starting agent's;
``turn_completed``, ``attempt_failed`` and ``turn_failed`` the model of the attempt's last
model call (the one in flight when a call failed), else the starting agent's, so a failed
attempt counts against the model it was on when it failed.
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from typing import Any

from agents import Agent, RunContextWrapper, RunHooks, Tool
from agents.items import ModelResponse

from turnfleet import events as ev
from turnfleet import fastjson
from turnfleet.events import EventDetail, TelemetryEvent
from turnfleet.models import ErrorInfo, Handoff, TokenUsage, ToolCall
from turnfleet.redaction import Redactor
from turnfleet.tool_errors import tool_error_of

DETAIL_LIMIT = 2000  # characters of a tool result or message kept in an event


def _clip(text: str, limit: int = DETAIL_LIMIT) -> str:
    return text if len(text) <= limit else text[:limit] + f"…[+{len(text) - limit} chars]"


def usage_of(usage: Any) -> TokenUsage:
    """The SDK's ``Usage`` as our ``TokenUsage``."""
    cached = getattr(getattr(usage, "input_tokens_details", None), "cached_tokens", 0) or 0
    reasoning = getattr(getattr(usage, "output_tokens_details", None), "reasoning_tokens", 0) or 0
    return TokenUsage(
        requests=usage.requests,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_tokens=cached,
        reasoning_tokens=reasoning,
    )


def model_name_of(model: Any, default: str) -> str:
    """The name a call of an agent whose ``model`` is ``model`` is priced and counted by.

    The SDK runs an agent on its own ``model`` when it has one (we set no run-wide
    ``RunConfig.model``, which would override it): a name (``"gpt-4o"``), or a ``Model``
    object, whose name is its ``model`` (the SDK's OpenAI and LiteLLM models) or
    ``model_name`` (``OfflineModel``). ``None`` runs on the run's default: ``default``. A
    ``Model`` that names itself neither way is counted under its class name, which no price
    matches: its cost is unknown, not guessed from another model's price.
    """
    if model is None:
        return default
    if isinstance(model, str):
        return model
    for attribute in ("model", "model_name"):
        name = getattr(model, attribute, None)
        if isinstance(name, str) and name:
            return name
    return type(model).__name__


def decision_of(response: ModelResponse, with_content: bool = True) -> dict[str, Any]:
    """What the model decided in one call (``events.Decision``'s wire form): the tools/handoffs
    it called, or its message. Without content, only the names of what it called (and that it
    answered) are kept."""
    calls: list[dict[str, Any]] = []
    message = []
    for item in response.output:
        kind = getattr(item, "type", None)
        if kind == "function_call":
            calls.append({"name": item.name, "arguments": _clip(item.arguments, 500)} if with_content
                         else {"name": item.name})
        elif kind == "message":
            for part in getattr(item, "content", []) or []:
                text = getattr(part, "text", None)
                if text:
                    message.append(text)
    out: dict[str, Any] = {}
    if calls:
        out["calls"] = calls
    if message:
        out["message"] = _clip("\n".join(message), 500) if with_content else True
    return out


USAGE_FIELDS = ("requests", "input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens")
"""``TokenUsage``'s fields, in its order: an event's ``usage`` in its wire form."""


def usage_counts(usage: Any) -> dict[str, int]:
    """The SDK's ``Usage`` as ``TokenUsage``'s wire form (what :func:`usage_of` dumps to),
    without building the model: two per model call on the hot path was ~4 µs (issue 19)."""
    cached = getattr(getattr(usage, "input_tokens_details", None), "cached_tokens", 0) or 0
    reasoning = getattr(getattr(usage, "output_tokens_details", None), "reasoning_tokens", 0) or 0
    return {"requests": int(usage.requests), "input_tokens": int(usage.input_tokens),
            "output_tokens": int(usage.output_tokens), "cached_tokens": int(cached),
            "reasoning_tokens": int(reasoning)}


def _usage(usage: TokenUsage | None) -> dict[str, int] | None:
    if usage is None:
        return None
    return {"requests": usage.requests, "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens, "cached_tokens": usage.cached_tokens,
            "reasoning_tokens": usage.reasoning_tokens}


def _now() -> str:
    """``utcnow()`` as pydantic writes it (``...+00:00`` as ``Z``)."""
    return iso_z(time.time_ns())


_second: tuple[int, str] = (-1, "")  # the latest second written, and its "YYYY-MM-DDTHH:MM:SS"


def iso_z(ns: int) -> str:
    """``ns`` since the epoch as ``datetime.isoformat`` writes it in UTC (microseconds floored,
    left out when 0), with ``Z``: the second's text is made once a second, not per event."""
    global _second
    seconds, micros = divmod(ns // 1000, 1_000_000)
    done = _second
    if done[0] != seconds:
        done = _second = (seconds, datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{done[1]}.{micros:06d}Z" if micros else f"{done[1]}Z"


_NUMBERS = frozenset({int, float, bool, type(None)})  # a detail value redaction returns as it is

JSON_FIELDS: dict[str, tuple[str, ...]] = {k.value: cls.json_fields for k, cls in ev.PAYLOADS.items()}
"""Per kind: the detail fields holding JSON text (redacted as JSON)."""


class TelemetryHooks(RunHooks[Any]):
    """Collects one attempt's events; ``events`` is what the job writes at the end."""

    def __init__(
        self,
        *,
        turn_id: str,
        attempt: int,
        conversation_id: str,
        customer_id: str,
        model_name: str,
        redactor: Redactor | None = None,
        include_data: bool = True,
    ) -> None:
        """``include_data=False`` keeps arguments, results and messages out of events, as
        ``trace_include_sensitive_data=False`` keeps them out of spans."""
        self.redactor = redactor
        self.include_data = include_data
        self.turn_id = turn_id
        self.attempt = attempt
        self.conversation_id = conversation_id
        self.customer_id = customer_id
        self.model_name = model_name  # the run's default model, for agents without their own
        self.current_model = model_name  # the turn's model so far (see the module doc)
        # Each event in its wire form (a dict), or as its model once ``events`` was read.
        self._events: list[Any] = []
        self.agents: list[str] = []
        self.tool_calls: list[ToolCall] = []
        self.handoffs: list[Handoff] = []
        self._usage_sum: dict[str, int] | None = None  # the attempt's usage so far (``usage``)
        self._llm_started: dict[str, tuple[float, str]] = {}  # agent -> (start, model)
        self._tool_started: dict[str, float] = {}
        self._seq = 0
        self._id_prefix = f"{turn_id}:{attempt}:"  # an event's id: this and its seq
        self._nonfinite = False  # a NaN or infinite number in an event (batch_json)

    @property
    def usage(self) -> TokenUsage:
        """The attempt's token usage so far (summed per model call as plain counts; the model
        is built when read)."""
        done = self._usage_sum
        return TokenUsage() if done is None else TokenUsage(**done)

    @usage.setter
    def usage(self, value: TokenUsage) -> None:
        self._usage_sum = _usage(value)

    def _usage_total(self) -> dict[str, int]:
        done = self._usage_sum
        return {name: 0 for name in USAGE_FIELDS} if done is None else dict(done)

    # -- emitting --------------------------------------------------------------------

    @property
    def events(self) -> list[TelemetryEvent]:
        """The attempt's events as the contract's models (built here, on demand: the hooks
        keep the wire form). The list is the hooks' own: a change to it or to its events is
        what ``batch_json`` writes."""
        for i, e in enumerate(self._events):
            if isinstance(e, dict):
                self._events[i] = ev.validate_events([e])[0]
        return self._events

    @events.setter
    def events(self, value: list[TelemetryEvent]) -> None:
        self._events = value

    def emit(self, detail: EventDetail, **fields: Any) -> None:
        """Record the event of ``detail``'s kind; ``fields`` are the envelope's optional ones."""
        self._seq += 1
        self._events.append(ev.event(detail, turn_id=self.turn_id, attempt=self.attempt, seq=self._seq,
                                     conversation_id=self.conversation_id, customer_id=self.customer_id,
                                     **fields))

    def _record(self, kind: str, detail: dict[str, Any], *, agent: str | None = None, model: str | None = None,
                tool: str | None = None, usage: dict[str, int] | None = None, duration_ms: float | None = None,
                error: ErrorInfo | None = None) -> None:
        """Record an event in its wire form: what ``emit`` of the kind's payload with these
        fields writes (the same keys, in the same order), without building the models."""
        self._seq += 1
        self._events.append({
            "event_id": f"{self._id_prefix}{self._seq}", "kind": kind, "seq": self._seq,
            "turn_id": self.turn_id, "attempt": self.attempt, "conversation_id": self.conversation_id,
            "customer_id": self.customer_id, "agent": agent, "model": model, "tool": tool, "ts": _now(),
            "usage": usage, "duration_ms": self._number(duration_ms),
            "error": None if error is None else {"type": error.type, "message": error.message},
            "detail": detail,
        })

    def batch_json(self) -> str:
        """The attempt's events as one JSON array, redacted: this is what leaves the process.

        orjson (``fastjson``: ~10× faster here) when every event is still the hooks' own wire
        form and none of their numbers is NaN or infinite; else ``json``, which writes those as
        ``NaN`` / ``Infinity`` where orjson would write null: a NaN a hook passed through must
        stay NaN (the consumer's poison path, tests/test_dead_letter.py). The two decode to the
        same value."""
        exported = []
        plain = not self._nonfinite
        for e in self._events:
            if isinstance(e, dict):
                exported.append(self._export(e))
            else:  # read (and maybe changed) as a model: its numbers are not the hooks' own
                plain = False
                exported.append(self._export(e.export()))
        if plain:
            return fastjson.dumps(exported)
        return json.dumps(exported, separators=(",", ":"))

    def _number(self, value: float | None) -> float | None:
        """A duration as the events carry it (a float), noting one that is NaN or infinite."""
        if value is None:
            return None
        value = float(value)
        if not math.isfinite(value):
            self._nonfinite = True
        return value

    def _export(self, data: dict[str, Any]) -> dict[str, Any]:
        r = self.redactor
        if r is None:
            return data
        if data.get("error") is None and _NUMBERS.issuperset(map(type, data["detail"].values())):
            return data  # nothing to redact (agent_start, llm_start, turn_started...): not copied
        json_fields = JSON_FIELDS.get(data["kind"], ())
        detail = {}
        for key, value in data["detail"].items():
            if key in json_fields and isinstance(value, str):
                detail[key] = r.json_text(value)
            else:
                detail[key] = r.value(value)
        out = {**data, "detail": detail}
        if data.get("error"):
            out["error"] = {**data["error"], "message": r.text(data["error"]["message"])}
        return out

    def _data(self, **fields: Any) -> dict[str, Any]:
        """Detail fields that carry conversation content: only when data may be included."""
        return fields if self.include_data else {}

    def model_of(self, agent: Agent[Any]) -> str:
        """The model ``agent``'s calls run on (:func:`model_name_of`)."""
        return model_name_of(agent.model, self.model_name)

    def turn_started(self, queue_wait_ms: float | None, agent: str, model: str | None = None) -> None:
        """The attempt began at ``agent``, on ``model`` (default: the run's default model)."""
        self.current_model = model or self.model_name
        self._record("turn_started", {"queue_wait_ms": self._number(queue_wait_ms)}, agent=agent,
                     model=self.current_model)

    def turn_completed(self, duration_ms: float, queue_wait_ms: float | None, final: str) -> None:
        self._record(
            "turn_completed",
            {"queue_wait_ms": self._number(queue_wait_ms), "agents": list(self.agents),
             **self._data(final_output=_clip(final, 500))},
            agent=self.agents[-1] if self.agents else None,
            model=self.current_model,
            usage=self._usage_total(),
            duration_ms=duration_ms,
        )

    def guardrail_tripped(self, guardrail: str, agent: str | None, kind: str = "input") -> None:
        """A guardrail's tripwire fired: an outcome of the turn, not an error."""
        self._record("guardrail", {"guardrail": guardrail, "kind": kind, "triggered": True}, agent=agent)

    def spans_dropped(self, count: int) -> None:
        if count:
            self._record("spans_dropped", {"count": int(count)})

    def turn_errored(self, *, terminal: bool, duration_ms: float, error_type: str, message: str) -> None:
        self._record(
            "turn_failed" if terminal else "attempt_failed",
            {"agents": list(self.agents)},
            agent=self.agents[-1] if self.agents else None,
            model=self.current_model,
            usage=self._usage_total(),
            duration_ms=duration_ms,
            error=ErrorInfo(type=error_type, message=_clip(message, 1000)),
        )

    # -- SDK hooks -------------------------------------------------------------------

    async def on_agent_start(self, context: RunContextWrapper[Any], agent: Agent[Any]) -> None:
        self.agents.append(agent.name)
        self._record("agent_start", {}, agent=agent.name)

    async def on_agent_end(self, context: RunContextWrapper[Any], agent: Agent[Any], output: Any) -> None:
        self._record("agent_end", self._data(output=_clip(str(output), 500)), agent=agent.name)

    async def on_llm_start(
        self,
        context: RunContextWrapper[Any],
        agent: Agent[Any],
        system_prompt: str | None,
        input_items: list[Any],
    ) -> None:
        model = self.current_model = model_name_of(agent.model, self.model_name)
        self._llm_started[agent.name] = (time.perf_counter(), model)
        self._record("llm_start", {"input_items": len(input_items)}, agent=agent.name, model=model)

    async def on_llm_end(
        self, context: RunContextWrapper[Any], agent: Agent[Any], response: ModelResponse
    ) -> None:
        started = self._llm_started.pop(agent.name, None)
        if started is None:  # no llm_start seen for it: resolve the model here
            model, began = self.model_of(agent), None
        else:
            began, model = started
        usage = usage_counts(response.usage)
        total = self._usage_sum
        if total is None:
            self._usage_sum = dict(usage)
        else:
            for name, count in usage.items():
                total[name] += count
        self._record(
            "llm_end",
            {"decision": decision_of(response, with_content=self.include_data),
             "response_id": response.response_id},
            agent=agent.name,
            model=model,
            usage=usage,
            duration_ms=(time.perf_counter() - began) * 1000 if began is not None else None,
        )

    async def on_tool_start(self, context: RunContextWrapper[Any], agent: Agent[Any], tool: Tool) -> None:
        call_id = getattr(context, "tool_call_id", None) or tool.name
        self._tool_started[call_id] = time.perf_counter()
        arguments = _clip(str(getattr(context, "tool_arguments", "") or ""))
        self._record("tool_start", {"call_id": call_id, **self._data(arguments=arguments)},
                     agent=agent.name, tool=tool.name)

    async def on_tool_end(
        self, context: RunContextWrapper[Any], agent: Agent[Any], tool: Tool, result: object
    ) -> None:
        call_id = getattr(context, "tool_call_id", None) or tool.name
        started = self._tool_started.pop(call_id, None)
        duration = (time.perf_counter() - started) * 1000 if started else None
        arguments = str(getattr(context, "tool_arguments", "") or "")
        output = result if isinstance(result, str) else str(result)
        self.tool_calls.append(
            ToolCall(
                agent=agent.name, tool=tool.name, call_id=call_id, arguments=arguments,
                output=output, duration_ms=duration,
            )
        )
        error = tool_error_of(output)  # a business answer ("not eligible") is not an error
        if error is not None:
            error.message = _clip(error.message, 500)
        note = getattr(context.context, "take_once_note", None)
        once = note(call_id) if note is not None else None  # what its turnfleet.once calls found
        detail: dict[str, Any] = {"call_id": call_id,
                                  **self._data(arguments=_clip(arguments), result=_clip(output))}
        if once is not None:  # last: the payload's field order
            detail["once"] = ev.OnceOutcome(**vars(once)).model_dump(mode="json", exclude_unset=True)
        self._record(
            "tool_end", detail,
            agent=agent.name, tool=tool.name, duration_ms=duration, error=error,
        )

    async def on_handoff(
        self, context: RunContextWrapper[Any], from_agent: Agent[Any], to_agent: Agent[Any]
    ) -> None:
        self.handoffs.append(Handoff(from_agent=from_agent.name, to_agent=to_agent.name))
        self._record("handoff", {"from_agent": from_agent.name, "to_agent": to_agent.name},
                     agent=from_agent.name)


class ChainedHooks(RunHooks[Any]):
    """turnfleet's hooks, then a workflow's own (``Workflow(hooks=...)``), for every callback.

    The team's hooks keep their SDK meaning: called with the same arguments at the same points,
    and an exception they raise fails the run as it would under ``Runner.run(hooks=...)``
    (turnfleet's hooks have already recorded the event by then).
    """

    def __init__(self, ours: RunHooks[Any], theirs: Any) -> None:
        self.ours = ours
        self.theirs = theirs


def _chain(name: str) -> Any:
    async def call(self: ChainedHooks, *args: Any, **kwargs: Any) -> None:
        await getattr(self.ours, name)(*args, **kwargs)
        await getattr(self.theirs, name)(*args, **kwargs)

    call.__name__ = name
    return call


for _name in ("on_llm_start", "on_llm_end", "on_agent_start", "on_agent_end", "on_handoff",
              "on_tool_start", "on_tool_end"):
    setattr(ChainedHooks, _name, _chain(_name))
