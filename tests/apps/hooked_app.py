"""A team's workflow with its own run hooks (``Workflow(hooks=...)``) and agent hooks
(``Agent(hooks=...)``): both must be called as the SDK calls them, beside turnfleet's own.

The tool is named like the Desk's ``lookup_order(order_id)`` so the Desk's script drives it.
``Recorder.fail_on`` makes one callback raise, as a team's buggy hook would.
"""

import json

from agents import Agent, AgentHooks, RunContextWrapper, RunHooks, function_tool

from turnfleet import TurnContext, Workflow
from turnfleet.workers.support_desk_script import SUPPORT_DESK_SCRIPT


class Recorder(RunHooks):
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail_on: str | None = None

    def _note(self, name: str, what: str) -> None:
        self.calls.append((name, what))
        if name == self.fail_on:
            raise RuntimeError(f"the team's {name} hook failed")

    async def on_agent_start(self, context, agent) -> None:
        self._note("on_agent_start", agent.name)

    async def on_llm_end(self, context, agent, response) -> None:
        self._note("on_llm_end", agent.name)

    async def on_tool_start(self, context, agent, tool) -> None:
        self._note("on_tool_start", f"{tool.name}:{context.context.turn_id}")

    async def on_tool_end(self, context, agent, tool, result) -> None:
        self._note("on_tool_end", tool.name)

    async def on_agent_end(self, context, agent, output) -> None:
        self._note("on_agent_end", agent.name)


class AgentRecorder(AgentHooks):
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def on_start(self, context, agent) -> None:
        self.calls.append(f"start:{agent.name}")

    async def on_tool_end(self, context, agent, tool, result) -> None:
        self.calls.append(f"tool_end:{tool.name}")


@function_tool
async def lookup_order(ctx: RunContextWrapper[TurnContext], order_id: str) -> str:
    """Look up an order.

    Args:
        order_id: The order number.
    """
    return json.dumps({"order_id": order_id, "found": True, "status": "shipped"})


run_hooks = Recorder()
agent_hooks = AgentRecorder()
orders = Agent(name="Orders", instructions="Answer questions about orders.", tools=[lookup_order], hooks=agent_hooks)
workflow = Workflow(name="hooked-desk", agent=orders, hooks=run_hooks, offline_script=SUPPORT_DESK_SCRIPT)
