"""The Support Desk on an OpenAI-compatible endpoint: a real worker against the local server.

The server (``tests/llm_server.py``) serves the offline model's decisions over HTTP, so a turn
on ``TURNFLEET_MODEL_BASE_URL`` must make the same tool calls as on the offline model, and the
usage the worker records must be what the server reported. The client behaviour the drills
rely on (timeouts, retries, Retry-After, malformed bodies) is checked here in-process against
the same server, one request at a time.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from agents import ModelSettings
from agents.handoffs import handoff
from agents.models.interface import Model, ModelTracing

from turnfleet.producer import Producer
from turnfleet.telemetry.stats import stats, turn_stats
from tests.llm_server import LLMServer, llm_server  # noqa: F401 - the fixture
from tests.processes import run_burst
from turnfleet.connection import connect
from turnfleet.shell.embedded import RedisServer
from turnfleet.settings import DEFAULT_PRICES, WorkerProcessSettings
from turnfleet.workers.llm import MalformedModelResponse, close_models, is_transient_model_error, make_model
from turnfleet.workers.model import OfflineModel
from turnfleet.workers.support_desk import build_support_desk

REFUND = "I'd like a refund of $89.00 for order 1042, the boots are too small."
MODEL = "gpt-4o-mini"  # priced, so cost is known


class ConnectionSink:
    """A TCP port that counts the connections made to it and closes them.

    Pointed to by ``HTTPS_PROXY`` in a worker's environment, it would see any HTTPS request
    that does not go to the local model server (``NO_PROXY``): the SDK's default trace
    exporter posting to api.openai.com, for one.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.connections = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sink() -> Iterator[ConnectionSink]:
    s = ConnectionSink()
    yield s
    s.close()


async def offline_reference(tmp_path: Path, env: dict[str, str], turn_id: str, text: str) -> Any:
    """The same turn (same id, hence the same refund id) on the offline model, own Redis."""
    server = RedisServer(tmp_path / "redis-offline")
    server.start()
    redis = connect(server.url)
    try:
        async with Producer(redis=redis) as producer:
            await producer.enqueue_turn(conversation_id="conv-refund", customer_id="C-100",
                                        text=text, turn_id=turn_id)
            run_burst("worker", {**env, "REDIS_URL": server.url}, tmp_path, name="worker-offline")
            return await producer.result(turn_id)
    finally:
        await redis.aclose()
        server.kill()


async def test_refund_on_an_endpoint_makes_the_offline_models_calls_and_records_its_usage(
    redis, fleet_env, tmp_path, llm_server, sink  # noqa: F811
):
    server = llm_server()
    env = server.worker_env(fleet_env, MODEL,
                            # Trace export, if anything attempted it, would go through the sink.
                            OPENAI_API_KEY="sk-test-dummy", HTTPS_PROXY=sink.url,
                            NO_PROXY="127.0.0.1,localhost")
    async with Producer(redis=redis) as producer:
        turn_id = await producer.enqueue_turn(conversation_id="conv-refund", customer_id="C-100",
                                              text=REFUND, turn_id="t-refund-1042")
        run_burst("worker", env, tmp_path)
        result = await producer.result(turn_id)
    offline = await offline_reference(tmp_path, fleet_env, turn_id, REFUND)

    assert result.status == "completed", (result.error_type, result.error_message)
    assert result.model == MODEL
    assert result.agents == ["Triage", "Billing"]

    def calls(r: Any) -> list[tuple[str, str, str, str | None]]:
        return [(c.agent, c.tool, c.arguments, c.output) for c in r.tool_calls]

    assert calls(result) == calls(offline)
    assert [c.tool for c in result.tool_calls] == ["check_refund_eligibility", "process_refund"]
    assert '"amount":"89.00"' in result.tool_calls[1].arguments
    assert result.final_output == offline.final_output and "$89.00" in result.final_output

    reported = server.usage_served()
    assert server.counts == {"ok": 4}  # triage, eligibility, refund, answer
    recorded = result.usage
    assert (recorded.requests, recorded.input_tokens, recorded.output_tokens,
            recorded.cached_tokens) == (reported["requests"], reported["input_tokens"],
                                        reported["output_tokens"], reported["cached_tokens"])
    # Same text, same formula: the endpoint's usage is the offline model's.
    assert recorded == offline.usage

    run_burst("telemetry", fleet_env, tmp_path)
    per_turn = await turn_stats(redis, turn_id)
    assert (per_turn["input_tokens"], per_turn["output_tokens"], per_turn["llm_calls"]) == (
        reported["input_tokens"], reported["output_tokens"], 4)
    row = {r["model"]: r for r in await stats(redis, "model")}[MODEL]
    price = DEFAULT_PRICES[MODEL]
    cost = ((reported["input_tokens"] - reported["cached_tokens"]) * price.input
            + reported["cached_tokens"] * price.cached_input
            + reported["output_tokens"] * price.output) / 1e6
    assert row["cost_usd"] == pytest.approx(cost, abs=1e-9)
    assert (row["errors"], row["errors_by_type"]) == (0, {})
    assert sink.connections == 0, "something left the machine (trace export?)"


# -- the client against the server, in-process ------------------------------------------------


def endpoint_model(server: LLMServer, api: str = "chat", **settings: Any) -> Model:
    options = {"model_timeout_s": 5.0, "model_max_retries": 2, **settings}
    return make_model(WorkerProcessSettings(
        model_base_url=server.url, model_name=MODEL, model_api_key="sk-test-dummy",
        model_api=api, **options))


async def ask(model: Model, text: str, agent: str = "Triage") -> Any:
    """One model call as the runner makes it for ``agent`` of the Support Desk."""
    desk = build_support_desk(model)
    a = desk.agents[agent]
    return await model.get_response(
        a.instructions, text, ModelSettings(), list(a.tools), None,
        [handoff(h) for h in a.handoffs], ModelTracing.DISABLED,
        previous_response_id=None, conversation_id=None, prompt=None,
    )


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_both_apis_serve_the_offline_models_decision_and_usage(llm_server, api):  # noqa: F811
    server = llm_server()
    for text, agent in [(REFUND, "Triage"), (REFUND, "Billing"), ("Hi, I'm Dana.", "Triage")]:
        got = await ask(endpoint_model(server, api), text, agent)
        want = await ask(OfflineModel(), text, agent)
        assert [(i.type, getattr(i, "name", None), getattr(i, "arguments", None))
                for i in got.output] == [(i.type, getattr(i, "name", None),
                                          getattr(i, "arguments", None)) for i in want.output]
        assert (got.usage.input_tokens, got.usage.output_tokens) == (
            want.usage.input_tokens, want.usage.output_tokens)
    assert server.counts == {"ok": 3}


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_the_client_transport_is_a_setting_and_the_worker_closes_its_clients(llm_server, transport):  # noqa: F811
    server = llm_server()
    settings = {} if transport == "aiohttp" else {"model_http": "httpx"}  # aiohttp: the default
    model = endpoint_model(server, **settings)
    response = await ask(model, REFUND)
    assert response.output[0].name == "transfer_to_billing"
    http = model._client._client  # the SDK model's openai client, then its HTTP client
    expected = openai.DefaultAioHttpClient if transport == "aiohttp" else openai.DefaultAsyncHttpxClient
    assert type(http) is expected and not http.is_closed
    await close_models()  # what the worker's shutdown runs
    assert http.is_closed
    with pytest.raises(ValueError, match="TURNFLEET_MODEL_HTTP must be one of aiohttp, httpx, not 'curl'"):
        endpoint_model(server, model_http="curl")


async def test_timeouts_and_5xx_are_retried_by_the_client_within_one_model_call(llm_server):  # noqa: F811
    server = llm_server()
    model = endpoint_model(server, model_timeout_s=0.3, model_max_retries=2)
    server.inject("timeout")
    server.inject("503")
    response = await ask(model, REFUND)
    assert response.output[0].name == "transfer_to_billing"
    assert response.usage.requests == 1  # one model call, whatever was retried under it
    assert [(s.outcome, s.retry_count) for s in sorted(server.log, key=lambda s: s.number)] == [
        ("timeout", 0), ("503", 1), ("ok", 2)]

    server.inject("500", times=3)  # one more than the retries allow
    with pytest.raises(openai.InternalServerError) as failed:
        await ask(model, REFUND)
    assert server.counts["500"] == 3
    assert is_transient_model_error(failed.value) is True


async def test_a_429_waits_for_the_servers_retry_after(llm_server):  # noqa: F811
    server = llm_server()
    # 0.8 s is longer than the client's own first backoff (at most 0.5 s): only honouring the
    # header explains a gap this long.
    server.inject("429", retry_after=0.8)
    await ask(endpoint_model(server, model_max_retries=1), REFUND)
    limited, ok = sorted(server.log, key=lambda s: s.number)
    assert (limited.outcome, ok.outcome, ok.retry_count) == ("429", "ok", 1)
    assert ok.arrived - limited.arrived >= 0.75


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("kind", ["garbage", "schemaless"])
async def test_a_malformed_body_is_a_transient_malformed_model_response(llm_server, api, kind):  # noqa: F811
    server = llm_server()
    server.inject(kind)
    with pytest.raises(MalformedModelResponse) as failed:
        await ask(endpoint_model(server, api), REFUND)
    assert server.counts == {kind: 1}  # a response arrived: the client does not retry it
    assert "answered 200" in str(failed.value)
    assert is_transient_model_error(failed.value) is True
    # The next request is served normally.
    assert (await ask(endpoint_model(server, api), REFUND)).output


async def test_a_4xx_answer_is_deterministic(llm_server):  # noqa: F811
    server = llm_server()
    server.inject("400")
    with pytest.raises(openai.BadRequestError) as failed:
        await ask(endpoint_model(server), REFUND)
    assert server.counts == {"400": 1}
    assert is_transient_model_error(failed.value) is False
    assert is_transient_model_error(ValueError("not a model error")) is None


async def test_held_requests_wait_until_released(llm_server):  # noqa: F811
    server = llm_server()
    server.hold(match="order 1042")
    model = endpoint_model(server)
    held = asyncio.create_task(ask(model, REFUND))
    await server.wait_held(1)
    assert (await ask(model, "Hi, I'm Dana.")).output  # not matching: not held
    assert not held.done() and server.counts == {"ok": 1}
    server.release()
    assert (await held).output[0].name == "transfer_to_billing"
    assert server.counts == {"ok": 2} and server.held == 0


async def test_a_random_error_rate_is_the_same_for_the_same_seed(llm_server):  # noqa: F811
    def outcomes(server: LLMServer) -> list[str]:
        return [s.outcome for s in sorted(server.log, key=lambda s: s.number)]

    request = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}]}
    runs = []
    for _ in range(2):
        server = llm_server(error_rate=0.5, error_kind="503", seed=7)
        async with httpx.AsyncClient(base_url=server.url) as http:
            for _ in range(20):
                await http.post("/chat/completions", json=request)
        runs.append(outcomes(server))
    assert runs[0] == runs[1]
    assert 0 < runs[0].count("503") < 20 and set(runs[0]) == {"ok", "503"}
