"""Telemetry batches built by hand with the event contract (``turnfleet.events``).

``AttemptBatch`` picks the values (times, durations, token counts) a test needs to know
exactly; the events themselves, their ids, payloads and wire form come from the contract the
worker's hooks write through, so a hand-built batch has the hooks' shape by construction.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from turnfleet import events as ev
from turnfleet import keys
from turnfleet.models import ErrorInfo, TokenUsage

T0 = datetime(2025, 3, 4, 10, 0, tzinfo=timezone.utc)
OFFLINE = "turnfleet-offline"  # input 0.40, cached 0.10, output 1.60 USD per 1M tokens


class AttemptBatch:
    """One turn attempt's events, in the order the worker's hooks emit them; event ``n`` is
    stamped ``at`` + ``n`` ms unless ``ts`` is given."""

    def __init__(self, turn_id: str, conversation_id: str = "c-1", customer_id: str = "cust-1",
                 attempt: int = 1, at: datetime = T0, model: str = OFFLINE) -> None:
        self.turn_id, self.conversation_id, self.customer_id = turn_id, conversation_id, customer_id
        self.attempt, self.at, self.model = attempt, at, model
        self.events: list[ev.TelemetryEvent] = []
        self.usage = TokenUsage()
        self.agents: list[str] = []

    def emit(self, detail: ev.EventDetail, **fields: Any) -> AttemptBatch:
        seq = len(self.events) + 1
        fields.setdefault("ts", self.at + timedelta(milliseconds=seq))
        self.events.append(ev.event(
            detail, turn_id=self.turn_id, attempt=self.attempt, seq=seq,
            conversation_id=self.conversation_id, customer_id=self.customer_id, **fields,
        ))
        return self

    def started(self, queue_wait_ms: float = 12.0) -> AttemptBatch:
        return self.emit(ev.TurnStartedDetail(queue_wait_ms=queue_wait_ms), model=self.model)

    def agent(self, name: str) -> AttemptBatch:
        self.agents.append(name)
        return self.emit(ev.AgentStartDetail(), agent=name)

    def llm(self, agent: str, input_tokens: int, output_tokens: int, cached_tokens: int = 0,
            reasoning_tokens: int = 0, model: str | None = None, duration_ms: float = 100.0) -> AttemptBatch:
        usage = TokenUsage(requests=1, input_tokens=input_tokens, output_tokens=output_tokens,
                           cached_tokens=cached_tokens, reasoning_tokens=reasoning_tokens)
        self.usage = self.usage + usage
        self.emit(ev.LlmStartDetail(), agent=agent, model=model or self.model)
        return self.emit(ev.LlmEndDetail(decision=ev.Decision()), agent=agent,
                         model=model or self.model, usage=usage, duration_ms=duration_ms)

    def tool(self, agent: str, tool: str, duration_ms: float = 5.0, error: str | None = None) -> AttemptBatch:
        self.emit(ev.ToolStartDetail(arguments="{}"), agent=agent, tool=tool)
        return self.emit(ev.ToolEndDetail(arguments="{}", result=error or "ok"), agent=agent,
                         tool=tool, duration_ms=duration_ms,
                         error=ErrorInfo(type="ToolError", message=error) if error else None)

    def handoff(self, from_agent: str, to_agent: str) -> AttemptBatch:
        return self.emit(ev.HandoffDetail(from_agent=from_agent, to_agent=to_agent), agent=from_agent)

    def completed(self, duration_ms: float = 1000.0, queue_wait_ms: float = 12.0) -> AttemptBatch:
        if self.agents:
            self.emit(ev.AgentEndDetail(), agent=self.agents[-1])
        return self.emit(ev.TurnCompletedDetail(queue_wait_ms=queue_wait_ms, agents=list(self.agents)),
                         model=self.model, usage=self.usage, duration_ms=duration_ms)

    def failed(self, error_type: str = "ModelError", message: str = "model unavailable",
               duration_ms: float = 500.0, terminal: bool = True) -> AttemptBatch:
        detail = ev.TurnFailedDetail if terminal else ev.AttemptFailedDetail
        return self.emit(detail(agents=list(self.agents)), model=self.model, usage=self.usage,
                         duration_ms=duration_ms, error=ErrorInfo(type=error_type, message=message))

    def batch_json(self) -> str:
        return ev.batch_json(self.events)

    async def send(self, redis: Any) -> str:
        return await redis.xadd(keys.TELEMETRY_STREAM,
                                {"turn_id": self.turn_id, "batch": self.batch_json()})
