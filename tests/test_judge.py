"""An LLM-as-judge check (issue 17, turnfleet/judge.py): sampled, graded, its cost apart.

Real Desk turns run in this process on the offline model (real Redis, the real SDK); their
check job runs in this process too, with the worker's model endpoint pointed at
``tests/llm_server.py``, which answers the judge's request with a scripted JSON verdict
(``LLMServer.reply``). The real consumer counts the check events.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from tests.consuming import drain
from tests.processes import run_burst
from tests.llm_server import llm_server  # noqa: F401 - a fixture
from tests.test_check_job import check_entries, finished_turn, stored_checks
from turnfleet import keys, llm_judge
from turnfleet.checks import FinishedTurn, run_checks
from turnfleet.events import parse_events
from turnfleet.judge import is_sampled, run_with_endpoint
from turnfleet.settings import DEFAULT_PRICES
from turnfleet.telemetry.replay import turn_replay
from turnfleet.telemetry.stats import stats, totals, turn_stats
from turnfleet.workers.check_job import run_turn_checks
from turnfleet.workers.model import OfflineModel
from turnfleet.workers.support_desk import builtin_app
from turnfleet.workflow import App

ASKED = "Turn to grade"  # how the judge's request begins: the server's reply matches on it
JUDGE_MODEL = "gpt-4o-mini"  # priced: the judge's cost is known


def desk_with(*checks: Any) -> App:
    desk = builtin_app(OfflineModel()).workflows[0]
    return App([dataclasses.replace(desk, checks=checks)])


def judge_through(ctx: dict[str, Any], server: Any) -> dict[str, Any]:
    """The check job's worker pointed at ``server`` as its model endpoint (no client retries)."""
    rt = ctx["runtime"]
    rt.settings = rt.settings.model_copy(update={
        "model_base_url": server.url, "model_name": JUDGE_MODEL, "model_api_key": "sk-test-dummy",
        "model_max_retries": 0})
    return ctx


def judge_requests(server: Any) -> list[Any]:
    return [s for s in server.log if s.user_text.startswith(ASKED)]


POLITE = llm_judge("polite_and_correct", "The answer is polite and states the refund correctly.",
                   sample_rate=1.0, pass_score=0.7)


@pytest.mark.parametrize(("score", "outcome"), [(0.7, "passed"), (0.69, "failed")])
async def test_a_sampled_turn_is_graded_passing_exactly_at_pass_score(redis, producer, llm_server, score, outcome):
    server = llm_server()
    server.reply(json.dumps({"score": score, "reason": "refund stated"}), match=ASKED)
    ctx, turn_id = await finished_turn(redis, producer, desk_with(POLITE))
    assert await run_turn_checks(judge_through(ctx, server), turn_id, "c-1") == "written"

    stored = (await stored_checks(redis, turn_id))["polite_and_correct"]
    [request] = judge_requests(server)
    served = request.usage
    assert (stored["outcome"], stored["score"], stored["reason"], stored["model"], stored["error"]) == (
        outcome, score, f"score {score:g} (pass at 0.7): refund stated", JUDGE_MODEL, None)
    assert stored["usage"] == {"requests": 1, "input_tokens": served["input_tokens"],
                               "output_tokens": served["output_tokens"], "cached_tokens": 0, "reasoning_tokens": 0}
    assert request.model == JUDGE_MODEL
    # The replay shows it: score, model and the judge's own tokens.
    [shown] = (await turn_replay(redis, turn_id))["checks"]
    assert (shown["outcome"], shown["score"], shown["usage"]["input_tokens"]) == (
        outcome, score, served["input_tokens"])


async def test_the_judges_tokens_are_counted_apart_and_the_turns_do_not_move(redis, producer, llm_server):
    server = llm_server()
    server.reply('{"score": 0.95, "reason": "fine"}', match=ASKED)
    ctx, turn_id = await finished_turn(redis, producer, desk_with(POLITE))
    await drain(redis)
    turn_before = await turn_stats(redis, turn_id)
    fleet_before = await totals(redis)
    assert turn_before["total_tokens"] > 0 and fleet_before["check_tokens"] == 0

    assert await run_turn_checks(judge_through(ctx, server), turn_id, "c-1") == "written"
    [entry] = await check_entries(redis, turn_id)
    [event] = parse_events(entry["batch"])
    served = server.usage_served()
    assert (event.model, event.usage.input_tokens, event.usage.output_tokens) == (
        JUDGE_MODEL, served["input_tokens"], served["output_tokens"])
    await drain(redis)

    judged = served["input_tokens"] + served["output_tokens"]
    price = DEFAULT_PRICES[JUDGE_MODEL]
    cost = (served["input_tokens"] * price.input + served["output_tokens"] * price.output) / 1e6
    fleet = await totals(redis)
    assert (fleet["check_tokens"], fleet["check_cost_usd"]) == (judged, pytest.approx(cost, abs=1e-9))
    assert (fleet["total_tokens"], fleet["cost_usd"]) == (fleet_before["total_tokens"], fleet_before["cost_usd"])
    [version] = [r for r in await stats(redis, "version") if r["check_tokens"]]
    assert version["check_tokens"] == judged
    turn_after = await turn_stats(redis, turn_id)
    assert {k: turn_after[k] for k in ("total_tokens", "input_tokens", "output_tokens", "cost_usd", "llm_calls")} == {
        k: turn_before[k] for k in ("total_tokens", "input_tokens", "output_tokens", "cost_usd", "llm_calls")}


async def test_a_turn_not_sampled_is_not_applicable_and_sends_nothing(redis, producer, llm_server):
    server = llm_server()
    server.reply('{"score": 1, "reason": "ok"}', match=ASKED)
    ctx, turn_id = await finished_turn(redis, producer, desk_with())
    # Half the turns each: a judge that samples this turn and one that does not.
    names = [f"judge_{i}" for i in range(64)]
    skipped = next(n for n in names if not is_sampled(turn_id, n, 0.5))
    taken = next(n for n in names if is_sampled(turn_id, n, 0.5))
    ctx["runtime"].app = desk_with(llm_judge(skipped, "Polite.", sample_rate=0.5),
                                   llm_judge(taken, "Polite.", sample_rate=0.5))
    assert await run_turn_checks(judge_through(ctx, server), turn_id, "c-1") == "written"
    outcomes = await stored_checks(redis, turn_id)
    assert (outcomes[skipped]["outcome"], outcomes[skipped]["reason"]) == ("not_applicable", "not applicable: not sampled")
    assert "usage" not in outcomes[skipped]
    assert outcomes[taken]["outcome"] == "passed"
    assert [r.user_text.startswith(f"{ASKED} (check {taken})") for r in judge_requests(server)] == [True]


def test_sampling_is_deterministic_and_follows_the_rate():
    ids = [f"turn-{i}" for i in range(2000)]
    first = [is_sampled(t, "tone", 0.25) for t in ids]
    assert first == [is_sampled(t, "tone", 0.25) for t in ids]  # a second run decides the same
    assert 400 < sum(first) < 600
    assert all(is_sampled(t, "tone", 1.0) for t in ids) and not any(is_sampled(t, "tone", 0.0) for t in ids)


async def test_an_endpoint_error_is_judge_unavailable_never_a_failed_turn(redis, producer, llm_server):
    server = llm_server()
    server.inject("500", times=None, match=ASKED)
    ctx, turn_id = await finished_turn(redis, producer, desk_with(POLITE))
    assert await run_turn_checks(judge_through(ctx, server), turn_id, "c-1") == "written"
    stored = (await stored_checks(redis, turn_id))["polite_and_correct"]
    assert (stored["outcome"], stored["error"]) == ("not_applicable", "InternalServerError")
    assert stored["reason"].startswith("not applicable: judge unavailable: InternalServerError: ")
    assert "usage" not in stored
    assert server.counts["500"] == 1
    await drain(redis)
    assert (await totals(redis))["check_tokens"] == 0
    assert await redis.hget(keys.turn(turn_id), "status") == "completed"


async def test_an_unparsable_reply_is_judge_unavailable_its_tokens_still_counted(redis, producer, llm_server):
    server = llm_server()
    server.reply("I think it was fine.", match=ASKED)
    ctx, turn_id = await finished_turn(redis, producer, desk_with(POLITE))
    assert await run_turn_checks(judge_through(ctx, server), turn_id, "c-1") == "written"
    stored = (await stored_checks(redis, turn_id))["polite_and_correct"]
    assert (stored["outcome"], stored["error"]) == ("not_applicable", "UnparsableJudgeReply")
    assert stored["reason"].startswith("not applicable: judge unavailable: unparsable reply: no JSON object")
    served = server.usage_served()
    assert stored["usage"]["input_tokens"] == served["input_tokens"] > 0


async def test_an_offline_fleet_has_no_judge_endpoint(redis, producer):
    ctx, turn_id = await finished_turn(redis, producer, desk_with(POLITE))
    assert await run_turn_checks(ctx, turn_id, "c-1") == "written"
    stored = (await stored_checks(redis, turn_id))["polite_and_correct"]
    assert (stored["outcome"], stored["reason"], stored["error"]) == (
        "not_applicable", "not applicable: no judge endpoint", None)


CARD, EMAIL = "4111 1111 1111 1111", "jane.doe@example.com"


async def test_the_judges_request_carries_the_turn_redacted(redis, producer, llm_server):
    server = llm_server()
    server.reply('{"score": 1, "reason": "ok"}', match=ASKED)
    ctx, turn_id = await finished_turn(
        redis, producer, desk_with(POLITE),
        text=f"Please refund order 1042 to card {CARD}, receipt to {EMAIL}")
    record = await producer.result(turn_id)
    assert record.tool_calls  # the turn called tools: they are in the transcript
    assert await run_turn_checks(judge_through(ctx, server), turn_id, "c-1") == "written"
    [request] = judge_requests(server)
    sent = request.user_text
    assert CARD not in sent and CARD.replace(" ", "") not in sent and EMAIL not in sent
    assert "[REDACTED:card]" in sent and "[REDACTED:email]" in sent
    transcript = json.loads(sent.split("\n", 1)[1])
    assert transcript["request"].startswith("Please refund order 1042 to card [REDACTED:card]")
    assert [c["tool"] for c in transcript["tool_calls"]] == [c.tool for c in record.tool_calls]
    assert transcript["final_answer"] == record.final_output


def test_a_judge_outside_the_check_job_needs_its_own_base_url(llm_server):
    server = llm_server()
    server.reply('{"score": 0.2, "reason": "rude"}', match=ASKED)
    turn = FinishedTurn(turn_id="t-1", conversation_id="c", customer_id="C-1", status="completed",
                        text="hi", final_output="go away")
    assert run_checks([POLITE], turn)[0].reason == "not applicable: no judge endpoint"
    own = llm_judge("tone", "Polite.", base_url=server.url, model=JUDGE_MODEL)
    [outcome] = run_with_endpoint(None, run_checks, [own], turn)
    assert (outcome.passed, outcome.score, outcome.reason) == (False, 0.2, "score 0.2 (pass at 0.7): rude")


@pytest.mark.parametrize(("field", "value"), [("sample_rate", 1.5), ("pass_score", -0.1), ("sample_rate", True)])
def test_bad_judge_arguments_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"llm_judge 'tone': {field} must be a number from 0 to 1"):
        llm_judge("tone", "Polite.", **{field: value})


async def test_a_real_worker_judges_each_turn_once_its_tokens_apart(redis, producer, llm_server, fleet_env, tmp_path):
    server = llm_server()
    server.reply('{"score": 0.8, "reason": "polite, amounts as returned"}', match=ASKED)
    turn_ids = [await producer.enqueue_turn(conversation_id=f"c-{i}", customer_id="C-100", text=text)
                for i, text in enumerate(("Please refund order 1042", "Where is my order 1042?"))]
    run_burst("worker", server.worker_env(fleet_env, TURNFLEET_APP="tests.apps.judged_desk:app",
                                          TURNFLEET_MODEL_MAX_RETRIES="0"), tmp_path)
    await drain(redis)

    judged = judge_requests(server)
    assert sorted(r.user_text.split("\n", 1)[0] for r in judged) == [f"{ASKED} (check polite_and_accurate):"] * 2
    spent = [r.usage["input_tokens"] + r.usage["output_tokens"] for r in judged]
    turns = 0
    for turn_id in turn_ids:
        stored = (await stored_checks(redis, turn_id))["polite_and_accurate"]
        assert (stored["outcome"], stored["score"], stored["model"]) == ("passed", 0.8, JUDGE_MODEL)
        assert stored["usage"]["input_tokens"] + stored["usage"]["output_tokens"] in spent
        row = await turn_stats(redis, turn_id)
        assert row["check_tokens"] == 0
        turns += row["total_tokens"]
    fleet = await totals(redis)
    assert (fleet["check_tokens"], fleet["total_tokens"]) == (sum(spent), turns)
    assert fleet["checks_passed"] >= 2
