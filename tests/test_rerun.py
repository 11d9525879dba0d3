"""``turnfleet rerun`` (issue 17, "Re-run a stored turn against a candidate"): real Desk turns
run through the turn job (real SDK, real tools, real Redis) on the flawed or the fixed offline
model, then re-run in-process against a candidate: recorded tool answers, live read-only
calls, side effects never made, nothing written to production but the rerun's own record.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.test_flawed_model import ORDERS_OF, REQUESTS, expected_calls
from tests.llm_server import llm_server  # noqa: F401 - a fixture
from tests.worker_runtime import runtime
from turnfleet import keys
from turnfleet.erasure import forget
from turnfleet.queue import TurnQueue
from turnfleet.settings import TelemetrySettings, WorkerProcessSettings
from turnfleet.telemetry.pricing import PriceTable
from turnfleet.workers.job import run_turn
from turnfleet.workers.llm import FLAWED_OFFLINE_MODEL, OFFLINE_MODEL, make_model
from turnfleet.workers.orderbook import copy_orders, load_order_book
from turnfleet.workers.support_desk_script import flawed_turn
from turnfleet.workers.rerun import (
    LIVE,
    NOT_MADE,
    RECORDED,
    Candidates,
    CandidateSpec,
    RerunError,
    check_changes,
    judged,
    rerun_turn,
    side,
)
from turnfleet.workflow import Workflow, WorkflowError

RAW_S = 3600
NAMED_CHECK = "refund_order_named_by_customer"


async def desk_turn(redis: Any, producer: Any, model_name: str, text: str, *, conversation: str = "conv-r",
                    customer: str = "C-100", trace: bool = True) -> str:
    """One real Desk turn through the job on the offline model ``model_name``; its id."""
    ctx = runtime(redis, make_model(WorkerProcessSettings(model_name=model_name)), model_name=model_name)
    turn_id = await producer.enqueue_turn(conversation_id=conversation, customer_id=customer, text=text,
                                          trace=trace)
    assert await run_turn(ctx, turn_id, conversation) == "completed"
    return turn_id


def flawed_ask(order: str) -> str:
    """A request to refund ``order`` in words the flaw picks (it picks by the message)."""
    return next(t for _, _, ask in REQUESTS if flawed_turn(t := ask.format(order)))


async def refund_turn(redis: Any, producer: Any, model_name: str, **kw: Any) -> tuple[str, dict[str, str]]:
    """A refund of order 1042 (a fresh copy: refunds are once per order) in words the flaw
    picks: the flawed model refunds 1043 instead, the fixed one 1042."""
    renamed = await copy_orders(redis, ORDERS_OF["C-100"])
    return await desk_turn(redis, producer, model_name, flawed_ask(renamed["1042"]), **kw), renamed


async def production_state(redis: Any) -> dict[str, Any]:
    """Everything a rerun must not touch: the ledger, aggregates, streams, memory, traces."""
    names = sorted(await redis.keys("*"))
    out: dict[str, Any] = {}
    for name in names:
        if name.startswith(keys.turn_reruns("")):
            continue
        kind = await redis.type(name)
        if kind == "stream":
            out[name] = await redis.xrange(name)
        elif kind == "hash":
            out[name] = await redis.hgetall(name)
        elif kind == "list":
            out[name] = await redis.lrange(name, 0, -1)
        elif kind == "zset":
            out[name] = await redis.zrange(name, 0, -1, withscores=True)
        elif kind == "set":
            out[name] = sorted(await redis.smembers(name))
        else:
            out[name] = await redis.get(name)
    return out


PRICES = PriceTable.from_settings(TelemetrySettings())


async def rerun(redis: Any, turn_id: str, raw_s: int = RAW_S, **spec: Any) -> dict[str, Any]:
    """``rerun_turn`` against ``CandidateSpec(**spec)``, priced as the fleet prices."""
    return await rerun_turn(redis, turn_id, Candidates(CandidateSpec(**spec)), raw_retention_s=raw_s,
                            pricing=PRICES.cost_usd)


async def test_rerun_on_the_unchanged_candidate_changes_nothing(redis, producer):
    turn_id, renamed = await refund_turn(redis, producer, OFFLINE_MODEL)
    report = await rerun(redis, turn_id)
    assert report["changed"] is False and report["differences"] == []
    cand, orig = report["candidate"], report["original"]
    assert (cand["workflow"], cand["model"]) == ("support-desk", OFFLINE_MODEL)
    assert [c["source"] for c in cand["tool_calls"]] == [RECORDED, RECORDED]
    assert cand["final_output"] == orig["final_output"]
    assert cand["usage"] == orig["usage"]  # the offline model's usage is deterministic
    assert report["usage"]["cost_delta_usd"] == 0
    assert orig["decisions_source"] == "events"
    assert [d.get("calls", [{}])[0].get("name") for d in orig["decisions"]] == \
        [d.get("calls", [{}])[0].get("name") for d in cand["decisions"]]
    assert report["checks"] == {"fixed": [], "broken": []}


async def test_rerun_of_a_flawed_turn_on_the_fixed_model_refunds_the_named_order_and_writes_nothing(
        redis, producer, collector):
    turn_id, renamed = await refund_turn(redis, producer, FLAWED_OFFLINE_MODEL)
    named, wrong = renamed["1042"], renamed["1043"]
    before = await production_state(redis)
    traced = (len(collector.traces), len(collector.spans))
    report = await rerun(redis, turn_id, model=OFFLINE_MODEL)
    assert await production_state(redis) == before  # no ledger entry, aggregate, stream entry, memory
    assert (len(collector.traces), len(collector.spans)) == traced  # no trace, no span: tracing off
    assert report["changed"] is True
    orig, cand = report["original"], report["candidate"]
    assert [(c["tool"], json.loads(c["arguments"])) for c in orig["tool_calls"]] == expected_calls(wrong)
    assert [(c["tool"], json.loads(c["arguments"]), c["source"]) for c in cand["tool_calls"]] == [
        (tool, args, source) for (tool, args), source in zip(expected_calls(named), [LIVE, NOT_MADE])]
    eligibility, refund = cand["tool_calls"]
    assert json.loads(eligibility["result"])["eligible"] is True  # today's data: 1042 never refunded
    assert json.loads(refund["result"])[NOT_MADE] is True
    assert {d["what"] for d in report["differences"]} == {"tool_calls", "final_output"}
    checks = {c["check"]: c for c in orig["checks"]}
    assert checks[NAMED_CHECK]["passed"] is False
    assert {c["check"]: (c["passed"], c["applicable"]) for c in cand["checks"]}[NAMED_CHECK] == (True, True)
    assert report["checks"] == {"fixed": [NAMED_CHECK], "broken": []}
    amount = f"{load_order_book().orders['1042'].amount:.2f}"
    assert json.loads(refund["arguments"]) == {"order_id": named, "amount": amount}
    # The refund ledger has the original's refund only (of the wrong order), no second one.
    ledger = await redis.xrange(keys.REFUND_LEDGER)
    assert [e[1]["order_id"] for e in ledger] == [wrong]
    # Its own record: one, with the raw-text lifetime as TTL.
    stored = await redis.hgetall(keys.turn_reruns(turn_id))
    assert list(stored) == [report["rerun_id"]]
    assert json.loads(stored[report["rerun_id"]])["changed"] is True
    assert 0 < await redis.ttl(keys.turn_reruns(turn_id)) <= RAW_S


async def test_a_fixed_turn_rerun_on_the_flawed_model_breaks_the_money_check(redis, producer):
    turn_id, renamed = await refund_turn(redis, producer, OFFLINE_MODEL)
    report = await rerun(redis, turn_id, model=FLAWED_OFFLINE_MODEL)
    assert report["changed"] is True
    assert report["checks"] == {"fixed": [], "broken": [NAMED_CHECK]}
    assert [json.loads(c["arguments"])["order_id"] for c in report["candidate"]["tool_calls"]] == \
        [renamed["1043"], renamed["1043"]]


async def test_rerun_works_for_a_turn_stored_at_trace_sample_rate_zero(redis, producer):
    turn_id, _ = await refund_turn(redis, producer, OFFLINE_MODEL, trace=False)
    assert not await redis.exists(keys.trace(turn_id))
    await redis.delete(keys.turn_events(turn_id))  # the event timeline's retention ran out too
    report = await rerun(redis, turn_id)
    assert report["changed"] is False
    assert report["original"]["decisions_source"] == "tool_calls"


async def test_rerun_reads_the_memory_as_it_was_before_the_turn(redis, producer):
    renamed = await copy_orders(redis, ORDERS_OF["C-100"])
    await desk_turn(redis, producer, OFFLINE_MODEL, f"Where is order {renamed['1042']}?", conversation="conv-m")
    turn_id = await desk_turn(redis, producer, OFFLINE_MODEL, "I want a refund for it", conversation="conv-m")
    await desk_turn(redis, producer, OFFLINE_MODEL, "Thanks, bye", conversation="conv-m")  # memory grows after
    report = await rerun(redis, turn_id)
    assert report["changed"] is False, report["differences"]
    assert [json.loads(c["arguments"])["order_id"] for c in report["candidate"]["tool_calls"]] == \
        [renamed["1042"], renamed["1042"]]


async def test_rerun_errors_say_what_is_missing(redis, producer):
    with pytest.raises(RerunError, match=r"no turn 't-nope' \(never enqueued, or removed by retention\)") as e:
        await rerun(redis, "t-nope")
    assert e.value.code == "not_found"
    queued = await producer.enqueue_turn(conversation_id="conv-q", customer_id="C-100", text="hi")
    with pytest.raises(RerunError, match="is queued, not finished"):
        await rerun(redis, queued)
    turn_id, _ = await refund_turn(redis, producer, OFFLINE_MODEL)
    with pytest.raises(RerunError, match="--model 'gpt-nope': no such model here"):
        await rerun(redis, turn_id, model="gpt-nope")
    with pytest.raises(RerunError, match="--workflow 'nope': no such workflow in the built-in app"):
        await rerun(redis, turn_id, workflow="nope")
    with pytest.raises(RerunError, match="--app 'no_such_module:app': no module named"):
        await rerun(redis, turn_id, app="no_such_module:app")
    await redis.hset(keys.turn(turn_id), "raw_expired_at", "2026-01-01T00:00:00+00:00")
    with pytest.raises(RerunError, match=f"removed by retention / raw text expired after {RAW_S} s"):
        await rerun(redis, turn_id)


async def test_rerun_says_when_the_memory_before_the_turn_was_removed(redis, producer):
    await desk_turn(redis, producer, OFFLINE_MODEL, "Hi, I'm Dana", conversation="conv-x")
    turn_id = await desk_turn(redis, producer, OFFLINE_MODEL, "Where is order 1042?", conversation="conv-x")
    await redis.delete(keys.session_messages("conv-x"))  # the session TTL ran out
    with pytest.raises(RerunError, match="memory before it .* was removed by retention") as e:
        await rerun(redis, turn_id)
    assert e.value.code == "removed"


async def test_forget_erases_the_reruns_of_its_turns(redis, producer):
    turn_id, _ = await refund_turn(redis, producer, OFFLINE_MODEL, conversation="conv-f")
    await rerun(redis, turn_id, raw_s=0)
    assert await redis.ttl(keys.turn_reruns(turn_id)) == -1  # raw text kept as long as the turn
    await forget(redis, conversation_id="conv-f")
    assert not await redis.exists(keys.turn_reruns(turn_id))


def test_side_effect_tools_name_tools_of_the_workflow(desk):
    from turnfleet.workers.model import OfflineModel
    from turnfleet.workers.support_desk import SIDE_EFFECT_TOOLS, support_desk_workflow

    assert support_desk_workflow(OfflineModel()).side_effect_tools == SIDE_EFFECT_TOOLS == (
        "process_refund", "escalate_to_human")
    with pytest.raises(WorkflowError, match="side_effect_tools names no tool of its agents: refund_all"):
        Workflow(name="w", agent=desk.triage, side_effect_tools=["process_refund", "refund_all"])
    with pytest.raises(WorkflowError, match="must be a list of tool names, not a string"):
        Workflow(name="w", agent=desk.triage, side_effect_tools="process_refund")
    assert Workflow(name="w", agent=desk.triage, side_effect_tools=["process_refund"]).fingerprint() == \
        Workflow(name="w", agent=desk.triage).fingerprint()


def test_a_judge_that_gave_no_verdict_neither_fixes_nor_breaks():
    """An LLM judge unavailable on one side (not applicable, with an error) is no verdict: a
    failure on the original is not "fixed" by it, a pass is not "broken" by it; a check that
    raised (failed, with an error) still is a failure."""
    def one(name: str, passed: bool, applicable: bool = True, error: str | None = None) -> dict[str, Any]:
        return {"check": name, "passed": passed, "applicable": applicable, "error": error}

    unavailable = {"passed": True, "applicable": False, "error": "InternalServerError"}
    original = {"checks": [one("judge_a", False), one("judge_b", True), one("raises", True), one("named", False)]}
    candidate = {"checks": [{"check": "judge_a", **unavailable}, {"check": "judge_b", **unavailable},
                            one("raises", False, error="KeyError"), one("named", True, applicable=False)]}
    assert check_changes(original, candidate) == {"fixed": ["named"], "broken": ["raises"]}


async def test_rerun_judges_both_sides_through_the_fleets_endpoint_its_tokens_reported(redis, producer, llm_server):
    """A workflow's LLM judge re-judges both sides on the fleet's endpoint (in a thread, as the
    check job does); the judge's tokens are the rerun's own, reported per side."""
    import dataclasses

    from turnfleet import llm_judge
    from turnfleet.judge import JudgeEndpoint

    server = llm_server()
    server.reply('{"score": 0.9, "reason": "fine"}', match="Turn to grade")
    turn_id, _ = await refund_turn(redis, producer, OFFLINE_MODEL)
    record = await TurnQueue(redis).get(turn_id)
    judge = llm_judge("polite", "Polite and accurate.", sample_rate=1.0, pass_score=0.7)
    desk = Candidates(CandidateSpec()).for_turn(record).workflow
    workflow = dataclasses.replace(desk, checks=(judge,))
    endpoint = JudgeEndpoint(base_url=server.url, model="gpt-4o-mini", api_key="sk-test", max_retries=0)
    outcomes = await judged(record, workflow, [], endpoint)
    [o] = outcomes
    served = server.usage_served()
    assert (o.check, o.passed, o.score) == ("polite", True, 0.9)
    shown = side(record, outcomes, decisions=[], decisions_source="tool_calls", sources=None, pricing=None,
                 usage_by_model={})
    assert shown["judge_usage"] == {"input_tokens": served["input_tokens"], "output_tokens": served["output_tokens"]}
    assert served["input_tokens"] > 0
