"""Telemetry batches for the tests, written by the worker's own hooks.

``AttemptBatch`` drives a real :class:`~turnfleet.workers.hooks.TelemetryHooks` with the SDK's
own objects (``Agent``, ``ModelResponse`` and ``Usage``, ``FunctionTool``, ``ToolContext``), as
a run would, and its batch JSON is the hooks' ``batch_json()``, what a worker writes: a change
of the hooks' output changes these batches too, so no test checks a stale shape.

The test still picks the values it needs to know exactly, and only those: event ``n`` is
stamped ``at`` + ``n`` ms, and a model call's or tool call's duration is the one given (the
hooks would measure it). Nothing here builds an event itself. The hooks run without a
redactor (a worker always has one): these batches carry no personal data, and redaction of
the written batch is tested on its own (test_events, test_redaction_fleet).
"""

from __future__ import annotations

import json
from collections.abc import Coroutine
from datetime import datetime, timedelta, timezone
from typing import Any

from agents import Agent, FunctionTool, RunContextWrapper
from agents.items import ModelResponse
from agents.tool_context import ToolContext
from agents.usage import Usage
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails

from turnfleet import keys, versions
from turnfleet.events import CheckDetail, TelemetryEvent, batch_json, check_event_id, event
from turnfleet.models import TokenUsage
from turnfleet.tool_errors import tool_error_output
from turnfleet.workers.hooks import TelemetryHooks

T0 = datetime(2025, 3, 4, 10, 0, tzinfo=timezone.utc)
OFFLINE = "turnfleet-offline"  # input 0.40, cached 0.10, output 1.60 USD per 1M tokens
RUN: RunContextWrapper[Any] = RunContextWrapper(context=None)


class ToolFailed(Exception):
    """What a tool raised, in a batch where a tool call errs."""


def _hook(call: Coroutine[Any, Any, None]) -> None:
    """Run one of the hooks' SDK callbacks to its end here: they record and never wait, so
    the chain of calls stays usable in sync tests and inside a running event loop alike."""
    try:
        call.send(None)
    except StopIteration:
        return
    call.close()
    raise AssertionError("a telemetry hook waited for something")


async def _never_invoked(context: ToolContext[Any], arguments: str) -> str:
    raise AssertionError("the batch's tools are not run")


class AttemptBatch:
    """One turn attempt's events, in the order a run calls the worker's hooks."""

    def __init__(self, turn_id: str, conversation_id: str = "c-1", customer_id: str = "cust-1",
                 attempt: int = 1, at: datetime = T0, model: str = OFFLINE) -> None:
        self.turn_id, self.conversation_id, self.customer_id = turn_id, conversation_id, customer_id
        self.at = at
        self.hooks = TelemetryHooks(turn_id=turn_id, attempt=attempt, conversation_id=conversation_id,
                                    customer_id=customer_id, model_name=model)
        self._calls = 0

    @property
    def events(self) -> list[TelemetryEvent]:
        return self.hooks.events

    def _stamped(self, written: int, duration_ms: float | None = None) -> AttemptBatch:
        """Stamp the events the hooks wrote since ``written``: ``at`` + seq ms, and the
        test's ``duration_ms`` on the last one (it ends a call the hooks timed)."""
        for e in self.events[written:]:
            e.ts = self.at + timedelta(milliseconds=e.seq)
        if duration_ms is not None:
            self.events[-1].duration_ms = duration_ms
        return self

    def started(self, queue_wait_ms: float = 12.0, agent: str = "Triage") -> AttemptBatch:
        """The attempt began; ``agent`` is the one the turn starts with (the Support Desk's)."""
        written = len(self.events)
        self.hooks.turn_started(queue_wait_ms, agent)
        return self._stamped(written)

    def agent(self, name: str) -> AttemptBatch:
        written = len(self.events)
        _hook(self.hooks.on_agent_start(RUN, Agent(name=name)))
        return self._stamped(written)

    def llm(self, agent: str, input_tokens: int, output_tokens: int, cached_tokens: int = 0,
            reasoning_tokens: int = 0, model: str | None = None, duration_ms: float = 100.0) -> AttemptBatch:
        """One model call of ``agent`` (on ``model``, else the batch's) answering with nothing
        the hooks read but its usage."""
        written, caller, default_model = len(self.events), Agent(name=agent), self.hooks.model_name
        usage = Usage(requests=1, input_tokens=input_tokens, output_tokens=output_tokens,
                      total_tokens=input_tokens + output_tokens,
                      input_tokens_details=InputTokensDetails(cached_tokens=cached_tokens,
                                                              cache_write_tokens=0),
                      output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning_tokens))
        self.hooks.model_name = model or default_model
        try:
            _hook(self.hooks.on_llm_start(RUN, caller, None, []))
            _hook(self.hooks.on_llm_end(RUN, caller, ModelResponse(output=[], usage=usage,
                                                                   response_id=None)))
        finally:
            self.hooks.model_name = default_model
        return self._stamped(written, duration_ms)

    def tool(self, agent: str, tool: str, duration_ms: float = 5.0, error: str | None = None) -> AttemptBatch:
        """One tool call; with ``error``, the tool raised it and answered as turnfleet's tools
        do (``tool_error_output``), which the hooks count as a tool error."""
        written, caller = len(self.events), Agent(name=agent)
        self._calls += 1
        context = ToolContext(context=None, tool_name=tool, tool_call_id=f"call-{self._calls}",
                              tool_arguments="{}")
        function = FunctionTool(name=tool, description=tool, params_json_schema={},
                                on_invoke_tool=_never_invoked)
        result = tool_error_output(tool, ToolFailed(error)) if error else "ok"
        _hook(self.hooks.on_tool_start(context, caller, function))
        _hook(self.hooks.on_tool_end(context, caller, function, result))
        return self._stamped(written, duration_ms)

    def handoff(self, from_agent: str, to_agent: str) -> AttemptBatch:
        written = len(self.events)
        _hook(self.hooks.on_handoff(RUN, Agent(name=from_agent), Agent(name=to_agent)))
        return self._stamped(written)

    def guardrail(self, guardrail: str, agent: str, kind: str = "input") -> AttemptBatch:
        written = len(self.events)
        self.hooks.guardrail_tripped(guardrail, agent, kind)
        return self._stamped(written)

    def spans_dropped(self, count: int) -> AttemptBatch:
        written = len(self.events)
        self.hooks.spans_dropped(count)
        return self._stamped(written)

    def completed(self, duration_ms: float = 1000.0, queue_wait_ms: float = 12.0,
                  final: str = "Done.") -> AttemptBatch:
        written = len(self.events)
        if self.hooks.agents:
            _hook(self.hooks.on_agent_end(RUN, Agent(name=self.hooks.agents[-1]), final))
        self.hooks.turn_completed(duration_ms, queue_wait_ms, final)
        return self._stamped(written)

    def failed(self, error_type: str = "ModelError", message: str = "model unavailable",
               duration_ms: float = 500.0, terminal: bool = True) -> AttemptBatch:
        written = len(self.events)
        self.hooks.turn_errored(terminal=terminal, duration_ms=duration_ms, error_type=error_type,
                                message=message)
        return self._stamped(written)

    def batch_json(self) -> str:
        """The batch as the worker writes it: the hooks' own ``batch_json()``."""
        return self.hooks.batch_json()

    async def send(self, redis: Any) -> str:
        return await redis.xadd(keys.TELEMETRY_STREAM,
                                {"turn_id": self.turn_id, "batch": self.batch_json()})


def support_turn(turn_id: str, conversation_id: str = "c-1", customer_id: str = "cust-1",
                 at: datetime = T0, model: str = OFFLINE, duration_ms: float = 1000.0) -> AttemptBatch:
    """Triage → handoff → Billing → tool → answer: 3 model calls costing 430 000 n$ offline.

    Calls (input, cached, output): (120, 0, 20) 80 000 n$; (300, 100, 40) 154 000 n$;
    (400, 200, 60 with 10 reasoning) 196 000 n$.
    """
    return (
        AttemptBatch(turn_id, conversation_id, customer_id, at=at, model=model)
        .started().agent("Triage").llm("Triage", 120, 20)
        .handoff("Triage", "Billing").agent("Billing")
        .llm("Billing", 300, 40, cached_tokens=100)
        .tool("Billing", "lookup_order", duration_ms=7.5)
        .llm("Billing", 400, 60, cached_tokens=200, reasoning_tokens=10)
        .completed(duration_ms=duration_ms)
    )


def failed_turn(turn_id: str, at_s: int = 0, attempt: int = 1) -> AttemptBatch:
    """One model call, then the turn fails (``ModelError``), ``at_s`` seconds after ``T0``."""
    batch = AttemptBatch(turn_id, "c-f", "cust-f", attempt=attempt, at=T0 + timedelta(seconds=at_s))
    return batch.started().agent("Triage").llm("Triage", 10, 2).failed()


def poison_turn(turn_id: str = "t-poison") -> AttemptBatch:
    """Valid JSON and valid events, but a turn duration the planner cannot place in a latency
    bucket: ``NaN`` ms, ``math.ceil(nan)`` raises ValueError on every delivery. (A payload that
    does not fit its kind, such as a ``spans_dropped`` count ``"lots"``, is no poison: the event
    contract refuses it when the entry is read, so it is malformed.)"""
    return AttemptBatch(turn_id).started().completed(duration_ms=float("nan"))


# What one support_turn spends (usage and calls), and its cost offline.
TURN_TOKENS = {"requests": 3, "input_tokens": 820, "cached_tokens": 300, "output_tokens": 120,
               "reasoning_tokens": 10, "total_tokens": 940, "llm_calls": 3}
TURN_COST_NUSD = 430_000


# -- a turn's check results (issue 17), as the worker's check job writes them -------------------


class CheckEntry:
    """One turn's ``check`` events: the telemetry entry of batch version ``versions.BATCH_CHECK``
    the check job writes (fields ``turn_id``, ``v``, ``workflow``, ``version``, ``batch``: the
    ``telemetry_entry`` shape of finish.lua) and the turn's outcomes list (``keys.turn_checks``,
    ``SET NX``), built from the event contract so these tests need not wait for the worker side.

    ``check(name, outcome, ...)`` adds one check; ``judge`` usage makes it an LLM judge's."""

    def __init__(self, turn_id: str, conversation_id: str = "c-1", customer_id: str = "cust-1",
                 workflow: str = "support-desk", version: str = "1.0@f00d", at: datetime = T0) -> None:
        self.turn_id, self.conversation_id, self.customer_id = turn_id, conversation_id, customer_id
        self.workflow, self.version, self.at = workflow, version, at
        self.events: list[TelemetryEvent] = []
        self.outcomes: list[dict[str, Any]] = []

    def check(self, name: str, outcome: str = "passed", money_path: bool = False, reason: str = "",
              error: str | None = None, duration_us: float = 12.5, model: str | None = None,
              input_tokens: int = 0, output_tokens: int = 0) -> CheckEntry:
        seq = len(self.events)
        fields: dict[str, Any] = {"ts": self.at + timedelta(milliseconds=seq)}
        if model is not None:
            fields["model"] = model
            fields["usage"] = TokenUsage(requests=1, input_tokens=input_tokens, output_tokens=output_tokens)
        self.events.append(event(
            CheckDetail(check=name, outcome=outcome, money_path=money_path, reason=reason or None,
                        error=error, duration_us=duration_us),  # type: ignore[arg-type]
            turn_id=self.turn_id, attempt=0, seq=seq, conversation_id=self.conversation_id,
            customer_id=self.customer_id, event_id=check_event_id(self.turn_id, name), **fields))
        self.outcomes.append({"check": name, "money_path": money_path, "passed": outcome != "failed",
                              "reason": reason, "applicable": outcome != "not_applicable",
                              "duration_us": duration_us, "error": error, "outcome": outcome})
        return self

    def fields(self) -> dict[str, str]:
        return {"turn_id": self.turn_id, versions.FIELD: str(versions.BATCH_CHECK),
                "workflow": self.workflow, "version": self.version, "batch": batch_json(self.events)}

    async def send(self, redis: Any, outcomes: bool = True) -> str:
        """Write what the check job writes: the outcomes (once; not with ``outcomes=False``)
        and the entry."""
        if outcomes:
            await redis.set(keys.turn_checks(self.turn_id), json.dumps(self.outcomes), nx=True)
        return await redis.xadd(keys.TELEMETRY_STREAM, self.fields())
