"""Issue 4 end to end: real workers and telemetry as subprocesses, real Redis.

Replay matches what the model did; redaction leaves no secret in telemetry, traces, alerts or
logs; sampling keeps whole conversations and never loses aggregates; failed turns are kept;
spans that cannot be stored are counted; a worker exports spans over OTLP.
"""

from __future__ import annotations

import json


from turnfleet.telemetry.alert_reads import read_alerts
from turnfleet.telemetry.stats import conversation_stats, totals
from turnfleet.telemetry.replay import conversation_replay, turn_replay
from turnfleet import keys
from turnfleet.shell.embedded import free_port
from turnfleet.shell.fleet import FleetProcess
from tests.redis_scan import dump_keys
from tests.processes import run_burst
from turnfleet.models import TokenUsage
from turnfleet.workers.trace_store import conversation_fraction


def walk(nodes):
    for node in nodes:
        yield node
        yield from walk(node["children"])


async def test_replay_of_the_three_turn_conversation_shows_exactly_what_the_model_did(
    producer, redis, fleet_env, tmp_path
):
    texts = ["Hi, I'm Dana Whitfield, customer C-100.", "Where is order 1043?",
             "I want a refund for order 1042", "I want to talk to a human, please."]
    ids = [await producer.enqueue_turn(conversation_id="conv-r", customer_id="C-100", text=t) for t in texts]
    run_burst("worker", fleet_env, tmp_path)
    run_burst("telemetry", fleet_env, tmp_path)
    replay = await conversation_replay(redis, "conv-r")
    assert [t["turn"]["turn_id"] for t in replay["turns"]] == ids
    for turn in replay["turns"]:
        result = turn["turn"]
        (attempt,) = turn["attempts"]
        assert attempt["source"] == "trace" and attempt["kept_because"] == "sampled"
        nodes = list(walk(attempt["tree"]))
        assert [n["name"] for n in nodes if n["kind"] == "agent"] == result["agents"]
        tools = [n for n in nodes if n["kind"] == "tool"]
        assert [(n["name"], json.loads(n["detail"]["arguments"]), n["detail"]["result"]) for n in tools] == [
            (c["tool"], json.loads(c["arguments"]), c["output"]) for c in result["tool_calls"]
        ]
        handoffs = [(n["detail"]["from_agent"], n["detail"]["to_agent"]) for n in nodes if n["kind"] == "handoff"]
        assert handoffs == [(h["from_agent"], h["to_agent"]) for h in result["handoffs"]]
        generations = [n for n in nodes if n["kind"] == "generation"]
        assert len(generations) == result["usage"]["requests"]
        assert sum(g["detail"]["input_tokens"] for g in generations) == result["usage"]["input_tokens"]
        assert turn["telemetry"]["cost_usd"] > 0
    refund = replay["turns"][2]
    refund_nodes = list(walk(refund["attempts"][0]["tree"]))
    decisions = [n["detail"]["decision"] for n in refund_nodes if n["kind"] == "generation"]
    assert decisions[-2]["calls"][0]["name"] == "process_refund"
    assert json.loads(decisions[-2]["calls"][0]["arguments"]) == {"order_id": "1042", "amount": "89.00"}
    ledger_span = [n for n in refund_nodes if n["kind"] == "custom" and n["name"] == "refund.ledger_write"]
    assert ledger_span and ledger_span[0]["detail"]["data"]["amount"] == "89.00"


SECRETS = {
    "card": "4111 1111 1111 1111",
    "email": "dana.whitfield@example.com",
    "phone": "+1 415 555 2671",
    "key": "sk-proj-Zx8Kq2Lm9Np4Rt6Vw1Yb3Cd5Ef7Gh9Jk",
}
BUSINESS_PREFIXES = (
    keys.ARQ_JOB_PREFIX, keys.SESSION_PREFIX, "tf:turn:", keys.LEDGER_PREFIX, keys.ORDERS,
    keys.RESULTS_STREAM,
)
BUSINESS_SUFFIXES = (keys.conversation_escalation("").rsplit("}", 1)[1],)  # the ticket


async def dump_telemetry_keys(redis) -> dict[str, str]:
    """Every key except business data (jobs, memory, results, the ticket/ledger), as text."""
    return await dump_keys(redis, lambda key: key.startswith(BUSINESS_PREFIXES) or key.endswith(BUSINESS_SUFFIXES))


async def test_secrets_in_a_turn_reach_no_telemetry_trace_alert_or_log(producer, redis, fleet_env, tmp_path):
    text = (f"I want to talk to a human. My card is {SECRETS['card']}, mail me at {SECRETS['email']} "
            f"or call {SECRETS['phone']}. Here is my key {SECRETS['key']}.")
    env = {**fleet_env, "TURNFLEET_LOG_LEVEL": "DEBUG", "TURNFLEET_ALERT_CONVERSATION_COST_USD": "0.000001"}
    escalate = await producer.enqueue_turn(conversation_id="conv-pii", customer_id="C-100", text=text)
    # And a turn that fails (so a turn_failed alert is written) with the same text.
    details = (f"My card is {SECRETS['card']}, mail me at {SECRETS['email']} or call {SECRETS['phone']}."
               f" Key {SECRETS['key']}.")
    await producer.enqueue_turn(conversation_id="conv-pii-2", customer_id="C-100",
                                text="Where is order 1043? " + details)
    # Two model calls allowed: the escalation fits (call, answer); the routed question does not.
    worker = run_burst("worker", {**env, "TURNFLEET_MAX_AGENT_TURNS": "2"}, tmp_path, "worker-fail")
    result = await producer.result(escalate)
    assert result.status == "completed"
    assert SECRETS["card"] in result.tool_calls[0].arguments  # business data: the ticket keeps the words
    before_telemetry = await dump_telemetry_keys(redis)  # the stream is trimmed once aggregated
    assert 'llm_end' in before_telemetry[keys.TELEMETRY_STREAM]
    telemetry = run_burst("telemetry", env, tmp_path)

    dumped = await dump_telemetry_keys(redis)
    assert keys.trace(escalate) in dumped and keys.ALERTS_STREAM in dumped
    rules = {a.rule for _, a in await read_alerts(redis)}
    assert {"turn_failed", "conversation_cost"} <= rules
    everything = "\n".join([*before_telemetry.values(), *dumped.values(), worker.output(), telemetry.output()])
    for kind, secret in SECRETS.items():
        assert secret not in everything, kind
        assert secret.replace(" ", "") not in everything, kind
    for kind in ("card", "email", "phone", "secret"):
        assert f"[REDACTED:{kind}]" in dumped[keys.trace(escalate)]


async def test_rate_zero_stores_no_spans_but_aggregates_still_equal_the_model_usage(
    producer, redis, fleet_env, tmp_path
):
    env = {**fleet_env, "TURNFLEET_TRACE_SAMPLE_RATE": "0", "TURNFLEET_TRACE_KEEP_SLOWER_THAN_MS": "600000"}
    ids = [await producer.enqueue_turn(conversation_id=f"conv-z{i}", customer_id="C-100", text=t)
           for i, t in enumerate(["Where is order 1043?", "I want a refund for order 1042", "Hello"])]
    run_burst("worker", env, tmp_path)
    run_burst("telemetry", env, tmp_path)
    assert [k async for k in redis.scan_iter("tf:trace:*")] == []
    usage = sum([(await producer.result(t)).usage for t in ids], TokenUsage())
    overall = await totals(redis)
    assert (overall["input_tokens"], overall["output_tokens"], overall["llm_calls"]) == (
        usage.input_tokens, usage.output_tokens, usage.requests)
    replay = await turn_replay(redis, ids[1])
    (attempt,) = replay["attempts"]
    assert attempt["source"] == "events"  # unsampled: the hook-event timeline
    tools = [n["name"] for n in walk(attempt["tree"]) if n["kind"] == "tool"]
    assert tools == ["check_refund_eligibility", "process_refund"]


async def test_rate_half_keeps_whole_conversations_only(producer, redis, fleet_env, tmp_path):
    env = {**fleet_env, "TURNFLEET_TRACE_SAMPLE_RATE": "0.5", "TURNFLEET_TRACE_KEEP_SLOWER_THAN_MS": "600000"}
    conversations = [f"conv-s{i:03d}" for i in range(200)]
    batch = [{"conversation_id": c, "customer_id": "C-100", "text": t}
             for c in conversations for t in ("Hello", "Where is order 1043?")]
    ids = await producer.enqueue_turns(batch)
    workers = [FleetProcess(f"w{n}", ["worker", "--burst"], env, tmp_path / f"w{n}.log").start() for n in (1, 2)]
    for w in workers:
        assert w.wait(180) == 0, w.output()[-2000:]
    kept = {}
    for turn_id, item in zip(ids, batch, strict=True):
        kept.setdefault(item["conversation_id"], []).append(await redis.exists(keys.trace(turn_id)) == 1)
    assert all(len(set(flags)) == 1 for flags in kept.values())  # all turns of a conversation, or none
    sampled = {c for c, flags in kept.items() if flags[0]}
    assert sampled == {c for c in conversations if conversation_fraction(c) < 0.5}
    assert 60 < len(sampled) < 140


async def test_a_failed_turn_keeps_its_spans_at_rate_zero(producer, redis, fleet_env, tmp_path):
    env = {**fleet_env, "TURNFLEET_TRACE_SAMPLE_RATE": "0", "TURNFLEET_MAX_AGENT_TURNS": "1"}
    failing = await producer.enqueue_turn(conversation_id="conv-k", customer_id="C-100", text="Where is order 1043?")
    fine = await producer.enqueue_turn(conversation_id="conv-k", customer_id="C-100", text="Hello")
    run_burst("worker", env, tmp_path)
    assert (await producer.result(failing)).status == "failed"
    records = [json.loads(r) for r in await redis.lrange(keys.trace(failing), 0, -1)]
    assert [r["trace"]["kept_because"] for r in records] == ["failed"]
    assert any(s["span_data"]["type"] == "generation" for s in records[0]["spans"])
    assert await redis.exists(keys.trace(fine)) == 0


async def test_spans_that_cannot_be_stored_are_counted(producer, redis, fleet_env, tmp_path):
    env = {**fleet_env, "TURNFLEET_TRACE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}  # nothing listens
    turn_id = await producer.enqueue_turn(conversation_id="conv-d", customer_id="C-100", text="Where is order 1043?")
    worker = run_burst("worker", env, tmp_path)
    assert (await producer.result(turn_id)).status == "completed"
    assert "trace.dropped" in worker.output()
    run_burst("telemetry", fleet_env, tmp_path)
    stats = await conversation_stats(redis, "conv-d")
    # task, 2 agents, 3 turn spans, 3 generations, 1 handoff, 1 function, 1 guardrail (the
    # desk's prompt_injection check, not tripped): 12 spans.
    assert stats["spans_dropped"] == 12
    assert (await totals(redis))["spans_dropped"] == 12


async def test_a_worker_exports_its_kept_spans_over_otlp(producer, redis, fleet_env, tmp_path):
    from tests.test_otlp import Receiver

    with Receiver() as receiver:
        env = {**fleet_env, "TURNFLEET_OTLP_ENDPOINT": receiver.endpoint}
        turn_id = await producer.enqueue_turn(conversation_id="conv-o", customer_id="C-100",
                                              text="I want a refund for order 1042")
        run_burst("worker", env, tmp_path)  # exits only after the sink has sent what it queued
        stored = json.loads((await redis.lrange(keys.trace(turn_id), 0, -1))[0])
        spans = receiver.wait_for_spans(len(stored["spans"]) + 1)
    ids = {s["span_id"] for s in spans}
    roots = [s for s in spans if not s["parent_span_id"]]
    assert len(roots) == 1 and all(s["parent_span_id"] in ids for s in spans if s not in roots)
    assert roots[0]["attributes"]["session.id"] == "conv-o"  # the turn-wide attributes are the root's
    assert {s["trace_id"] for s in spans} == {stored["trace"]["id"].removeprefix("trace_")}
