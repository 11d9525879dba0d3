"""A one-agent workflow, and a few things ``--app`` must refuse."""

from agents import Agent, function_tool

from turnfleet import App, Workflow


@function_tool
def lookup_account(user: str) -> str:
    """Find an account by user name."""
    return f"account of {user}"


helpdesk = Agent(name="Helpdesk", instructions="Help with accounts.", tools=[lookup_account])
workflow = Workflow(name="it-helpdesk", agent=helpdesk)
app = App([workflow])
both = [workflow, Workflow(name="it-helpdesk-2", agent=Agent(name="Other", instructions="x"))]
not_a_workflow = 42
