"""``turnfleet.Workflow``: a team's agents as the fleet runs them (issue 16, the public API).

Real Agents SDK objects throughout; the app loader imports real modules (``tests/apps``).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from agents import Agent, ModelSettings, function_tool, handoff

from turnfleet import App, AppLoadError, Workflow, WorkflowError, load_app
from turnfleet.workers.model import OfflineModel
from turnfleet.workers.support_desk import build_support_desk


@function_tool
def reset_password(user: str) -> str:
    """Reset a user's password."""
    return "done"


@function_tool
def reset_password_v2(user: str, notify: bool) -> str:
    """Reset a user's password."""
    return "done"


def helpdesk(instructions: str = "Help with accounts.", tool=reset_password, model=None) -> Agent:
    return Agent(name="Helpdesk", instructions=instructions, tools=[tool], model=model)


def test_a_name_and_an_agent_are_all_a_one_agent_workflow_needs():
    agent = helpdesk()
    wf = Workflow(name="it-helpdesk", agent=agent)
    assert dict(wf.agents) == {"Helpdesk": agent}
    assert wf.starting_agent() is agent and wf.starting_agent("Nobody") is agent
    assert len(wf.fingerprint()) == 16


def test_every_agent_reachable_through_handoffs_is_part_of_the_workflow():
    desk = build_support_desk(OfflineModel())
    triage = desk.starting_agent(None)
    wf = Workflow(name="support-desk", agent=triage)
    assert list(wf.agents) == ["Triage", "Billing", "Orders"]
    assert wf.starting_agent("Billing").name == "Billing"


def test_an_agent_behind_a_handoff_object_is_reached_only_when_listed():
    expert = Agent(name="Expert", instructions="Deep answers.")
    front = Agent(name="Front", instructions="Route.", handoffs=[handoff(expert)])
    assert list(Workflow(name="w", agent=front).agents) == ["Front"]
    assert list(Workflow(name="w", agent=front, extra_agents=[expert]).agents) == ["Front", "Expert"]


def test_the_fingerprint_is_stable_and_changes_with_what_the_agents_do():
    base = Workflow(name="it-helpdesk", agent=helpdesk()).fingerprint()
    assert Workflow(name="it-helpdesk", agent=helpdesk()).fingerprint() == base  # rebuilt: same
    changed = {
        "instructions": Workflow(name="it-helpdesk", agent=helpdesk("Help with accounts!")),
        "tool schema": Workflow(name="it-helpdesk", agent=helpdesk(tool=reset_password_v2)),
        "model": Workflow(name="it-helpdesk", agent=helpdesk(model="gpt-4.1-mini")),
        "declared version": Workflow(name="it-helpdesk", agent=helpdesk(), version="2"),
        "model settings": Workflow(name="it-helpdesk", agent=helpdesk(),
                                   model_settings=ModelSettings(temperature=0.2)),
    }
    prints = {what: wf.fingerprint() for what, wf in changed.items()}
    assert base not in prints.values() and len(set(prints.values())) == len(prints)


def test_two_model_objects_of_one_name_fingerprint_alike():
    a = Workflow(name="w", agent=helpdesk(model=OfflineModel())).fingerprint()
    assert Workflow(name="w", agent=helpdesk(model=OfflineModel())).fingerprint() == a


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "it helpdesk", "agent": Agent(name="A", instructions="x")}, "Workflow name: "),
    ({"name": "", "agent": Agent(name="A", instructions="x")}, "must not be empty"),
    ({"name": "w", "agent": "not an agent"}, "must be an Agents SDK Agent"),
    ({"name": "w", "agent": Agent(name="A", instructions="x"), "version": 2}, "version must be a string"),
])
def test_a_bad_workflow_is_refused_naming_what_is_wrong(kwargs, message):
    with pytest.raises(WorkflowError, match=message):
        Workflow(**kwargs)


def test_two_different_agents_of_one_name_are_refused():
    a1, a2 = Agent(name="Same", instructions="1"), Agent(name="Same", instructions="2")
    a1.handoffs = [a2]
    with pytest.raises(WorkflowError, match="two different agents are named 'Same'"):
        Workflow(name="w", agent=a1)


def test_an_app_refuses_a_workflow_name_used_twice():
    wf = Workflow(name="w", agent=helpdesk())
    with pytest.raises(WorkflowError, match="used twice: w"):
        App([wf, Workflow(name="w", agent=helpdesk())])


@pytest.mark.parametrize("spec, names", [
    ("tests.apps.tiny:workflow", ["it-helpdesk"]),
    ("tests.apps.tiny:app", ["it-helpdesk"]),
    ("tests.apps.tiny:both", ["it-helpdesk", "it-helpdesk-2"]),
])
def test_load_app_takes_a_workflow_a_list_or_an_app(spec, names):
    assert [w.name for w in load_app(spec).workflows] == names


@pytest.mark.parametrize("spec, message", [
    ("tests.apps.tiny", "expected module:attribute"),
    ("tests.apps.nope:app", "no module named 'tests.apps.nope'"),
    ("tests.apps.tiny:missing", "has no attribute 'missing'"),
    ("tests.apps.tiny:not_a_workflow", "is a int; expected a turnfleet Workflow"),
])
def test_load_app_says_what_is_wrong_with_a_bad_spec(spec, message):
    with pytest.raises(AppLoadError, match=message):
        load_app(spec)


def test_load_app_finds_a_module_in_the_app_dir_like_uvicorn(tmp_path):
    (tmp_path / "teamapp_wf_probe.py").write_text(
        "from agents import Agent\nfrom turnfleet import Workflow\n"
        "workflow = Workflow(name='probe-desk', agent=Agent(name='Probe', instructions='x'))\n")
    with pytest.raises(AppLoadError, match="no module named 'teamapp_wf_probe'"):
        load_app("teamapp_wf_probe:workflow", app_dir=None)
    try:
        assert [w.name for w in load_app("teamapp_wf_probe:workflow", app_dir=str(tmp_path)).workflows] == ["probe-desk"]
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("teamapp_wf_probe", None)


def test_a_version_label_is_the_declared_version_at_the_fingerprint():
    bare = Workflow(name="w", agent=helpdesk())
    declared = Workflow(name="w", agent=helpdesk(), version="2.1")
    assert bare.version_label() == bare.fingerprint()
    assert declared.version_label() == f"2.1@{declared.fingerprint()}"
    assert declared.fingerprint() != bare.fingerprint()


def test_importing_turnfleet_and_the_producer_does_not_load_the_sdk():
    code = ("import sys, turnfleet, turnfleet.producer; turnfleet.Workflow; "
            "print('agents' in sys.modules, 'openai' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "False"]
