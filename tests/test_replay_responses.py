"""A model call on the Responses API replays as one on Chat Completions does: a generation node
with its model, tokens and decision (``turnfleet turn``, the console's model time, the story),
not an anonymous ``response`` span. Real SDK turns against the local OpenAI-compatible server."""

from __future__ import annotations

from typing import Any

import pytest

from tests.llm_server import llm_server  # noqa: F401 - the fixture
from tests.test_otlp import receiver  # noqa: F401 - the fixture
from tests.test_otlp_conventions import ENDPOINT_MODEL, endpoint_turn, sink  # noqa: F401 - the fixture
from turnfleet.telemetry.replay import turn_replay


def nodes(tree: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    found, todo = [], list(tree)
    while todo:
        node = todo.pop(0)
        found += [node] if node["kind"] == kind else []
        todo = node["children"] + todo
    return found


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_a_model_call_on_either_api_replays_as_a_generation_with_model_tokens_and_decision(
    redis, receiver, sink, llm_server, api: str  # noqa: F811
) -> None:
    server = llm_server()
    result, _ = await endpoint_turn(redis, receiver, sink, server, api,
                                    "I'd like a refund of $89.00 for order 1042")
    assert result.status == "completed"
    replay = await turn_replay(redis, result.turn_id)
    assert replay is not None
    [attempt] = replay["attempts"]
    calls = nodes(attempt["tree"], "generation")
    served = sorted((s for s in server.log if s.outcome == "ok"), key=lambda s: s.number)
    assert len(calls) == len(served) == 4
    for call, answered in zip(calls, served, strict=True):
        assert call["name"] == ENDPOINT_MODEL
        assert call["duration_ms"] is not None
        detail = call["detail"]
        assert (detail["input_tokens"], detail["output_tokens"]) == (
            answered.usage["input_tokens"], answered.usage["output_tokens"])
        decision = detail["decision"]
        if answered.decision == "message":
            assert decision["message"] == result.final_output
        else:
            assert [c["name"] for c in decision["calls"]] == [answered.decision]
    assert not nodes(attempt["tree"], "response")
