"""A team's workflow with its own trace processors (``Workflow(trace_processors=[...])``).

Its tool is named like the Desk's ``lookup_order(order_id)`` only so that the offline model,
playing the Desk's script (``offline_script``), calls it; its body makes a custom span whose data holds a
secret, which must reach the processors redacted. ``collector`` keeps what it is handed;
``broken`` raises on every call (it must never fail a turn, nor keep ``collector`` from its
spans).
"""

import json

from agents import RunContextWrapper, custom_span, function_tool
from agents import Agent

from tests.tracing import Collector
from turnfleet import App, TurnContext, Workflow
from turnfleet.workers.support_desk_script import SUPPORT_DESK_SCRIPT

SECRET = "sk-proj-Zx8Kq2Lm9Np4Rt6Vw1Yb3Cd5Ef7Gh9Jk"


class Collecting(Collector):
    """``Collector`` that also keeps the trace objects and whether it was flushed and shut down."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        super().__init__()
        self.started: list = []
        self.ended: list = []
        self.span_starts: list = []
        self.flushed = self.shut = False

    def on_trace_start(self, trace) -> None:
        self.started.append(trace)

    def on_trace_end(self, trace) -> None:
        super().on_trace_end(trace)
        self.ended.append(trace)

    def on_span_start(self, span) -> None:
        self.span_starts.append(span)

    def force_flush(self) -> None:
        self.flushed = True

    def shutdown(self) -> None:
        self.shut = True


class Broken(Collecting):
    def on_trace_start(self, trace) -> None:
        raise RuntimeError("the vendor is down")

    on_trace_end = on_span_start = on_span_end = on_trace_start

    def shutdown(self) -> None:
        raise RuntimeError("the vendor is down")


@function_tool
async def lookup_order(ctx: RunContextWrapper[TurnContext], order_id: str) -> str:
    """Look up an order.

    Args:
        order_id: The order number.
    """
    with custom_span("vendor.lookup", data={"order_id": order_id, "api_key": SECRET}):
        return json.dumps({"order_id": order_id, "found": True, "status": "shipped"})


broken = Broken()
collector = Collecting()
orders = Agent(name="Orders", instructions="Answer questions about orders.", tools=[lookup_order])
workflow = Workflow(name="traced-desk", agent=orders, trace_processors=[broken, collector],
                    offline_script=SUPPORT_DESK_SCRIPT)
# Another workflow of the same app, without processors: its turns reach neither of them.
plain = Workflow(name="plain-desk", agent=Agent(name="Orders", instructions="Orders, plainly.", tools=[lookup_order]),
                 offline_script=SUPPORT_DESK_SCRIPT)
app = App([workflow, plain])
