"""The baseline a user writes from the arq and Agents SDK tutorials, for table 1.

arq with its defaults (``poll_delay`` 0.5 s, ``max_jobs`` 10, pickle jobs), a job that runs
the same Support Desk on the offline model with ``Runner.run`` (SDK tracing on, its default
processor, which exports nowhere here), and ``RunHooks`` that do one awaited ``XADD`` per
event. No memory, no retries of our own, no results of our own: arq keeps the job's return
value. Run as ``arq bench.plain_arq.WorkerSettings --burst``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from agents import Agent, RunContextWrapper, RunHooks, Runner, Tool
from arq.connections import RedisSettings
from redis.asyncio import Redis

from turnfleet.context import TurnContext
from turnfleet.workers.model import OfflineModel
from turnfleet.workers.support_desk import build_support_desk

STREAM = "plain:events"


class XaddHooks(RunHooks[Any]):
    """One awaited XADD per lifecycle event, as the tutorials' hooks do."""

    def __init__(self, redis: Redis, turn: str) -> None:
        self.redis = redis
        self.turn = turn

    async def _emit(self, kind: str, **fields: Any) -> None:
        await self.redis.xadd(STREAM, {"turn": self.turn, "kind": kind, "at": time.time(),
                                       **{k: str(v) for k, v in fields.items()}})

    async def on_agent_start(self, context: RunContextWrapper[Any], agent: Agent[Any]) -> None:
        await self._emit("agent_start", agent=agent.name)

    async def on_agent_end(self, context: RunContextWrapper[Any], agent: Agent[Any], output: Any) -> None:
        await self._emit("agent_end", agent=agent.name)

    async def on_llm_start(self, context: Any, agent: Agent[Any], system_prompt: Any, input_items: Any) -> None:
        await self._emit("llm_start", agent=agent.name)

    async def on_llm_end(self, context: Any, agent: Agent[Any], response: Any) -> None:
        usage = response.usage
        await self._emit("llm_end", agent=agent.name, input_tokens=usage.input_tokens,
                         output_tokens=usage.output_tokens)

    async def on_tool_start(self, context: Any, agent: Agent[Any], tool: Tool) -> None:
        await self._emit("tool_start", tool=tool.name)

    async def on_tool_end(self, context: Any, agent: Agent[Any], tool: Tool, result: str) -> None:
        await self._emit("tool_end", tool=tool.name)

    async def on_handoff(self, context: Any, from_agent: Agent[Any], to_agent: Agent[Any]) -> None:
        await self._emit("handoff", source=from_agent.name, target=to_agent.name)


async def startup(ctx: dict[str, Any]) -> None:
    ctx["desk"] = build_support_desk(OfflineModel())
    ctx["events"] = Redis.from_url(os.environ["REDIS_URL"])


async def shutdown(ctx: dict[str, Any]) -> None:
    await ctx["events"].aclose()


async def plain_turn(ctx: dict[str, Any], i: int, text: str, customer: str) -> tuple[float, float]:
    """One turn; returns (start, end) wall times so the bench can measure from them."""
    start = time.time()
    tc = TurnContext(turn_id=f"plain-{i}", conversation_id=f"plain-c-{i}", customer_id=customer,
                     attempt=1, redis=ctx["events"])
    result = await Runner.run(ctx["desk"].triage, text, context=tc,
                              hooks=XaddHooks(ctx["events"], f"plain-{i}"))
    assert result.final_output
    return start, time.time()


class WorkerSettings:
    functions = [plain_turn]
    on_startup = startup
    on_shutdown = shutdown
    redis_settings = RedisSettings.from_dsn(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
