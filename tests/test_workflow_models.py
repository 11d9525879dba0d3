"""Models per workflow and per agent (issue 16, "Models"; "The offline model becomes generic").

On an endpoint, the tests' local OpenAI-compatible server serves the workflow's own script
(``llm_server(script=...)``), chat and responses, to a real worker.

Offline, a workflow's agents that name no model run the ``OfflineModel`` following THAT
workflow's ``offline_script``, under the workflow's ``model`` name: one real worker process
(``--app tests.apps.scripted:with_desk``) serves a helpdesk and a copy of the Desk whose agents
both name no model, and each calls its own tools. A workflow that would run offline without a
script is refused when the worker starts. Real worker subprocesses, real Redis, the real SDK.
"""

from __future__ import annotations

from agents import Agent

import pytest

from tests.apps.scripted import HELPDESK_MODEL, HELPDESK_SCRIPT, RESET, helpdesk, workflow
from tests.llm_server import llm_server  # noqa: F401 - fixture
from tests.processes import run_burst, tf
from tests.test_call_model import written_events
from turnfleet import Workflow
from turnfleet.events import EventKind
from turnfleet.queue import TurnQueue
from turnfleet.settings import WorkerProcessSettings
from turnfleet.workers.llm import OFFLINE_MODEL, WorkerModels, app_models, check_offline_scripts
from turnfleet.workers.model import OfflineModel
from turnfleet.workflow import App, WorkflowError

APP = "tests.apps.scripted:with_desk"


async def test_each_workflows_agents_run_offline_on_its_own_script_and_model(producer, redis, fleet_env, tmp_path):
    env = {**fleet_env, "TURNFLEET_APP": APP}
    run_burst("worker", env, tmp_path, "register")  # registers both workflows
    reset = await producer.enqueue_turn(conversation_id="c-it", customer_id="C-100",
                                        text="I forgot my password, user dana.w", agent="it-scripted")
    order = await producer.enqueue_turn(conversation_id="c-dn", customer_id="C-100",
                                        text="Where is order 1042?", agent="desk-n")
    run_burst("worker", env, tmp_path, "serve")

    queue = TurnQueue(redis)
    done = await queue.get(reset)
    assert done.status == "completed", done.error_message
    assert done.final_output == "Done: dana.w can log in with tmp-dana.w now."  # its script's reply
    assert [c.tool for c in done.tool_calls] == [RESET]  # its own tool, its script's arguments
    desk = await queue.get(order)
    assert (desk.status, desk.agents) == ("completed", ["Triage", "Orders"])
    assert [c.tool for c in desk.tool_calls] == ["lookup_order"] and "1042" in desk.final_output

    # Each call is counted under the model it ran on: the helpdesk's default, the worker's.
    models = {(e.turn_id, e.model) for e in await written_events(redis) if e.kind == EventKind.llm_end}
    assert models == {(reset, HELPDESK_MODEL), (order, OFFLINE_MODEL)}


def test_a_workflow_on_the_offline_model_without_a_script_is_refused_at_start(fleet_env):
    proc = tf("worker", "--burst", "--app", "tests.apps.scripted:noscript", env=fleet_env)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "'it-noscript'" in line and "offline_script" in line and "Traceback" not in proc.stderr


def test_only_agents_that_would_run_offline_need_a_script():
    offline = WorkerProcessSettings()
    bare = Agent(name="Bare", instructions="x")
    own = Agent(name="Own", instructions="x", model=OfflineModel(model_name="own"))
    check_offline_scripts(App([Workflow(name="w-own", agent=own)]), offline)  # holds its Model
    check_offline_scripts(App([Workflow(name="w-obj", agent=bare, model=OfflineModel())]), offline)
    endpoint = WorkerProcessSettings(model_base_url="http://127.0.0.1:9/v1", model_name="m")
    check_offline_scripts(App([Workflow(name="w-ep", agent=bare)]), endpoint)  # not offline
    named = Agent(name="Named", instructions="x", model="other-name")
    try:
        check_offline_scripts(App([Workflow(name="w-named", agent=named, model=OfflineModel())]), offline)
    except WorkflowError as exc:
        assert "'w-named'" in str(exc) and "Named" in str(exc)
    else:
        raise AssertionError("an agent naming a model runs offline too: it needs the script")


def test_the_workflow_model_is_the_default_of_agents_naming_none_and_objects_are_kept():
    settings = WorkerProcessSettings()
    models = app_models(App([workflow]), settings, OfflineModel())[workflow.name]
    default = models.get_model(None)
    assert (default.model_name, default.script) == (HELPDESK_MODEL, HELPDESK_SCRIPT)
    assert models.default_name == HELPDESK_MODEL
    other = models.get_model("tf-other")  # a name: the offline model under it, same script
    assert (other.model_name, other.script) == ("tf-other", HELPDESK_SCRIPT)
    assert models.get_model("tf-other") is other  # built once
    held = OfflineModel(model_name="held")
    on_object = WorkerModels(settings, script=HELPDESK_SCRIPT, workflow_model=held)
    assert on_object.get_model(None) is held and on_object.default_name == "held"
    assert helpdesk.model is None  # nothing is written into a team's agents


def test_the_workflow_model_is_in_the_fingerprint_and_the_script_is_not():
    agent = Agent(name="A", instructions="x")
    bare = Workflow(name="w", agent=agent)
    assert Workflow(name="w", agent=agent, offline_script=HELPDESK_SCRIPT).fingerprint() == bare.fingerprint()
    on_a = Workflow(name="w", agent=agent, model="model-a")
    assert on_a.fingerprint() != bare.fingerprint()
    assert Workflow(name="w", agent=agent, model="model-b").fingerprint() != on_a.fingerprint()
    assert Workflow(name="w", agent=agent, model=OfflineModel(model_name="model-a")).fingerprint() == on_a.fingerprint()


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_the_local_server_serves_a_workflows_own_script_to_a_real_worker(
        api, llm_server, producer, redis, fleet_env, tmp_path):  # noqa: F811 - fixture
    server = llm_server(script=HELPDESK_SCRIPT)
    env = server.worker_env({**fleet_env, "TURNFLEET_APP": "tests.apps.scripted:app"},
                            TURNFLEET_MODEL_API=api)
    run_burst("worker", env, tmp_path, "register")
    turn = await producer.enqueue_turn(conversation_id=f"c-{api}", customer_id="C-100",
                                       text="I forgot my password, user dana.w", agent="it-scripted")
    run_burst("worker", env, tmp_path, "serve")

    done = await TurnQueue(redis).get(turn)
    assert done.status == "completed", done.error_message
    assert done.final_output == "Done: dana.w can log in with tmp-dana.w now."
    assert [c.tool for c in done.tool_calls] == [RESET]
    served = server.served("ok")
    assert [(s.decision, s.model, s.path) for s in served] == [
        (RESET, HELPDESK_MODEL, f"/v1/{'chat/completions' if api == 'chat' else 'responses'}"),
        ("message", HELPDESK_MODEL, f"/v1/{'chat/completions' if api == 'chat' else 'responses'}")]
    figures = server.usage_served()
    assert (done.usage.requests, done.usage.input_tokens, done.usage.output_tokens) == (
        figures["requests"], figures["input_tokens"], figures["output_tokens"])
