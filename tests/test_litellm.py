"""LiteLLM through the fleet (issue 16, "Models"; the ``turnfleet[litellm]`` extra).

A real worker process serves a workflow whose agents run on the SDK's LiteLLM model, one by
the ``litellm/<provider>/<model>`` name and one as a ``LitellmModel`` object
(``tests/apps/on_litellm.py``). LiteLLM's own client (not the ``openai`` SDK's path the other
endpoint tests take) talks to the tests' local OpenAI-compatible server, which serves the
helpdesk's script; the worker itself runs offline. What the worker records — usage per call,
and the model of each call — must equal what the server answered.
"""

from __future__ import annotations

import importlib

from tests.apps.scripted import HELPDESK_SCRIPT, RESET
from tests.llm_server import llm_server  # noqa: F401 - fixture
from tests.processes import run_burst
from tests.test_call_model import written_events
from turnfleet import registry
from turnfleet.events import EventKind
from turnfleet.queue import TurnQueue


def litellm_env(env: dict[str, str], url: str) -> dict[str, str]:
    """What points LiteLLM at the local server, and keeps it from fetching its price map."""
    return {**env, "TURNFLEET_APP": "tests.apps.on_litellm:app", "TF_TEST_LITELLM_URL": url,
            "OPENAI_BASE_URL": url, "OPENAI_API_KEY": "sk-test-dummy",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


async def test_agents_on_litellm_run_through_the_fleet_with_their_usage_and_models(
        llm_server, producer, redis, fleet_env, tmp_path, monkeypatch):  # noqa: F811 - fixture
    server = llm_server(script=HELPDESK_SCRIPT)
    env = litellm_env(fleet_env, server.url)
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    app = importlib.import_module("tests.apps.on_litellm")  # imports LiteLLM: only here
    # Registered here, as its worker would (one worker start less: LiteLLM is slow to import).
    await registry.register(redis, [registry.Registration(w.name, w.fingerprint(), w.version)
                                    for w in app.app.workflows], "test")
    turn = await producer.enqueue_turn(conversation_id="c-lite", customer_id="C-100",
                                       text="I forgot my password, user dana.w", agent="it-litellm")
    run_burst("worker", env, tmp_path, "serve")

    done = await TurnQueue(redis).get(turn)
    assert done.status == "completed", done.error_message
    assert (done.agents, done.final_output) == (
        ["Front", "Accounts"], "Done: dana.w can log in with tmp-dana.w now.")
    assert [c.tool for c in done.tool_calls] == [RESET]

    # LiteLLM sent the provider's model name (its prefix stripped) to the server.
    served = server.served("ok")
    assert [(s.model, s.decision) for s in served] == [
        ("tf-front", "transfer_to_accounts"), ("tf-back", RESET), ("tf-back", "message")]
    # Each call is recorded under its agent's model, with the server's own usage.
    calls = [(e.agent, e.model, e.usage.input_tokens, e.usage.output_tokens)
             for e in await written_events(redis) if e.kind == EventKind.llm_end]
    assert calls == [(agent, model, s.usage["input_tokens"], s.usage["output_tokens"])
                     for (agent, model), s in zip(
                         [("Front", app.FRONT_MODEL), ("Accounts", app.BACK_MODEL), ("Accounts", app.BACK_MODEL)],
                         served, strict=True)]
    figures = server.usage_served()
    assert (done.usage.requests, done.usage.input_tokens, done.usage.output_tokens) == (
        figures["requests"], figures["input_tokens"], figures["output_tokens"]) == (3, *[
            sum(s.usage[k] for s in served) for k in ("input_tokens", "output_tokens")])
