"""The OTLP export as Phoenix (OpenInference), Langfuse and GenAI-aware backends read it: every
span kind's attribute keys are the conventions packages' constants, with the right values;
the turn's text and answer, model messages and cost; failures with their cause; attempts
marked; nothing raw (card, e-mail) in any attribute. Records come from real SDK runs, or from
real turn jobs (real Redis, the real SDK, a real OTLP/HTTP receiver).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from arq import Retry
from openinference.semconv.trace import MessageAttributes as MA
from openinference.semconv.trace import OpenInferenceMimeTypeValues as Mime
from openinference.semconv.trace import OpenInferenceSpanKindValues as Kind
from openinference.semconv.trace import SpanAttributes as OI
from openinference.semconv.trace import ToolCallAttributes as TC
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as GA
from opentelemetry.semconv.attributes import error_attributes as ERR
from opentelemetry.semconv.attributes import exception_attributes as EXC

from tests.test_otlp import STATUS_ERROR, Receiver, by_sdk_id, receiver, refund_record, send  # noqa: F401
from tests.worker_runtime import FlakyModel, runtime
from turnfleet.models import TokenUsage
from turnfleet.pricing import PriceTable
from turnfleet.producer import Producer
from turnfleet.redaction import Redactor
from turnfleet.settings import DEFAULT_PRICES
from turnfleet.workers import otlp
from turnfleet.workers.job import run_turn
from turnfleet.workers.model import OfflineModel
from turnfleet.workers.otlp import OtlpSink
from turnfleet.workers.trace_store import TraceBuffer, TraceSampler, TraceStore
from tests.tracing import traces_to
from tests.llm_server import llm_server  # noqa: F401 - the fixture

PRICES = PriceTable(DEFAULT_PRICES)
ANSWER = "I've refunded $89.00 for order 1042"
Op = GA.GenAiOperationNameValues

# Names no maintained package publishes (Langfuse's, and the OTel exception event's name):
# asserted as Langfuse documents them.
LANGFUSE_SESSION, LANGFUSE_USER = "langfuse.session.id", "langfuse.user.id"
LANGFUSE_TAGS, LANGFUSE_COST = "langfuse.trace.tags", "langfuse.observation.cost_details"
GEN_AI_COST = "gen_ai.usage.cost"

# On every span: the operation, the provider, the OI kind.
EVERY_SPAN = {GA.GEN_AI_OPERATION_NAME, GA.GEN_AI_PROVIDER_NAME, OI.OPENINFERENCE_SPAN_KIND}
# On the attempt's root only (the receivers read them per trace, from its root: otlp.turn_attributes).
ROOT_ONLY = {GA.GEN_AI_CONVERSATION_ID, OI.SESSION_ID, LANGFUSE_SESSION, OI.USER_ID, LANGFUSE_USER}
TURN_WIDE = ROOT_ONLY | {"turnfleet.turn_id", "turnfleet.attempt", "turnfleet.attempt.final",
                         "turnfleet.kept_because"}


@pytest.fixture
def sink(receiver: Receiver):
    made = OtlpSink(receiver.endpoint, service_name="tf-test", pricing=PRICES.cost_usd)
    try:
        yield made
    finally:
        made.shutdown()


def conventions(attrs: dict[str, Any]) -> set[str]:
    """The attribute keys a receiver reads (turnfleet's own ``turnfleet.*`` left out)."""
    return {k for k in attrs if not k.startswith("turnfleet.")}


def messages_keys(prefix: str, attrs: dict[str, Any]) -> set[str]:
    return {k for k in attrs if k.startswith(prefix + ".")}


def genai(attrs: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """A model call's GenAI messages (``gen_ai.input.messages`` / ``.output.messages``)."""
    return json.loads(attrs[key])


def calls_in(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in message["parts"] if p["type"] == "tool_call"]


async def kept_refund(redis, collector) -> dict[str, Any]:
    """A real refund turn's record as the trace store keeps it, with the turn's own fields."""
    record = copy.deepcopy(await refund_record(redis, collector))
    record["trace"].update(input="I want a refund for order 1042", output=ANSWER + " (refund RF-1).",
                           final=True)
    return record


async def test_every_span_kind_carries_the_conventions_names_and_values(
    redis, collector, receiver: Receiver, sink: OtlpSink
) -> None:
    record = await kept_refund(redis, collector)
    spans = send(sink, receiver, record)
    received = by_sdk_id(spans)
    (root,) = [s for s in spans if not s["parent_span_id"]]
    seen_kinds = set()

    # The root: one per attempt, the turn's text and answer, the attempt's marks.
    attrs = root["attributes"]
    assert conventions(attrs) == EVERY_SPAN | ROOT_ONLY | {
        GA.GEN_AI_WORKFLOW_NAME, OI.INPUT_VALUE, OI.INPUT_MIME_TYPE, OI.OUTPUT_VALUE,
        OI.OUTPUT_MIME_TYPE, OI.TAG_TAGS, LANGFUSE_TAGS}
    assert attrs[GA.GEN_AI_OPERATION_NAME] == Op.INVOKE_WORKFLOW.value
    assert attrs[GA.GEN_AI_WORKFLOW_NAME] == "Support Desk"
    assert attrs[OI.OPENINFERENCE_SPAN_KIND] == Kind.CHAIN.value
    assert attrs[OI.INPUT_VALUE] == "I want a refund for order 1042"
    assert attrs[OI.OUTPUT_VALUE].startswith(ANSWER) and attrs[OI.OUTPUT_MIME_TYPE] == Mime.TEXT.value
    assert attrs[OI.TAG_TAGS] == attrs[LANGFUSE_TAGS] == ["attempt 1"]
    assert attrs["turnfleet.attempt"] == 1 and attrs["turnfleet.attempt.final"] is True

    assert attrs[GA.GEN_AI_CONVERSATION_ID] == attrs[OI.SESSION_ID] == attrs[LANGFUSE_SESSION] == "conv-1"
    assert attrs[OI.USER_ID] == attrs[LANGFUSE_USER] == "C-100"

    for span in spans:
        attrs = span["attributes"]
        if span is not root:  # the turn-wide attributes are the root's alone
            assert not TURN_WIDE & set(attrs), span["name"]
        model = attrs.get(GA.GEN_AI_REQUEST_MODEL)  # a model call: its model's provider (offline: turnfleet)
        assert attrs[GA.GEN_AI_PROVIDER_NAME] == (otlp.provider_of(model) if model else GA.GenAiProviderNameValues.OPENAI.value)

    for sdk in record["spans"]:
        data, attrs = sdk["span_data"], received[sdk["id"]]["attributes"]
        kind = data["type"]
        seen_kinds.add(kind)
        if kind == "agent":
            assert conventions(attrs) == EVERY_SPAN | {GA.GEN_AI_AGENT_NAME, OI.AGENT_NAME}
            assert attrs[GA.GEN_AI_AGENT_NAME] == attrs[OI.AGENT_NAME] == data["name"]
            assert attrs[GA.GEN_AI_OPERATION_NAME] == Op.INVOKE_AGENT.value
            assert attrs[OI.OPENINFERENCE_SPAN_KIND] == Kind.AGENT.value
        elif kind == "generation":
            usage = data["usage"]
            scalar = EVERY_SPAN | {
                GA.GEN_AI_SYSTEM, GA.GEN_AI_REQUEST_MODEL, GA.GEN_AI_RESPONSE_MODEL, OI.LLM_MODEL_NAME,
                OI.LLM_PROVIDER, OI.LLM_INVOCATION_PARAMETERS,
                GA.GEN_AI_USAGE_INPUT_TOKENS, GA.GEN_AI_USAGE_OUTPUT_TOKENS,
                GA.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, GA.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS,
                GA.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS, OI.LLM_TOKEN_COUNT_PROMPT,
                OI.LLM_TOKEN_COUNT_COMPLETION, OI.LLM_TOKEN_COUNT_TOTAL,
                OI.LLM_TOKEN_COUNT_PROMPT_DETAILS_CACHE_READ, OI.LLM_TOKEN_COUNT_PROMPT_DETAILS_CACHE_WRITE,
                OI.LLM_TOKEN_COUNT_COMPLETION_DETAILS_REASONING,
                OI.LLM_COST_TOTAL, GEN_AI_COST, LANGFUSE_COST,
                GA.GEN_AI_INPUT_MESSAGES, GA.GEN_AI_OUTPUT_MESSAGES,
                OI.INPUT_VALUE, OI.INPUT_MIME_TYPE, OI.OUTPUT_VALUE, OI.OUTPUT_MIME_TYPE}
            # The messages once, in GenAI's form (Phoenix makes its llm.*_messages from it).
            assert conventions(attrs) == scalar
            assert attrs[GA.GEN_AI_OPERATION_NAME] == Op.CHAT.value
            assert attrs[OI.OPENINFERENCE_SPAN_KIND] == Kind.LLM.value
            assert attrs[GA.GEN_AI_REQUEST_MODEL] == attrs[OI.LLM_MODEL_NAME] == "turnfleet-offline"
            assert attrs[GA.GEN_AI_USAGE_INPUT_TOKENS] == attrs[OI.LLM_TOKEN_COUNT_PROMPT] == usage["input_tokens"]
            assert attrs[GA.GEN_AI_USAGE_OUTPUT_TOKENS] == attrs[OI.LLM_TOKEN_COUNT_COMPLETION] == usage["output_tokens"]
            assert attrs[OI.LLM_TOKEN_COUNT_TOTAL] == usage["total_tokens"]
            assert attrs[GA.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] == usage["input_tokens_details"]["cached_tokens"]
            assert attrs[GA.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS] == usage["output_tokens_details"]["reasoning_tokens"]
            # turnfleet's cost of the call, so the offline model is not shown as $0.
            cost = PRICES.cost_usd("turnfleet-offline", TokenUsage(
                input_tokens=usage["input_tokens"], output_tokens=usage["output_tokens"]))
            assert cost and attrs[OI.LLM_COST_TOTAL] == attrs[GEN_AI_COST] == cost
            assert json.loads(attrs[LANGFUSE_COST]) == {"total": cost}
            # The messages: the system prompt first, the user's text, the model's decision.
            assert genai(attrs, GA.GEN_AI_INPUT_MESSAGES)[0]["role"] == "system"
            assert json.loads(attrs[GA.GEN_AI_INPUT_MESSAGES])[1] == {
                "role": "user", "parts": [{"type": "text", "content": "I want a refund for order 1042"}]}
            out = data["output"][0]
            (decided,) = genai(attrs, GA.GEN_AI_OUTPUT_MESSAGES)
            assert decided["role"] == "assistant"
            if out["type"] == "function_call":
                # finish_reason: GenAI requires it on an output message (Phoenix refuses the list without).
                assert decided["finish_reason"] == "tool_call"
                assert calls_in(decided)[0] == {"type": "tool_call", "id": out["call_id"],
                                                "name": out["name"], "arguments": out["arguments"]}
                assert attrs[OI.OUTPUT_VALUE] == f"{out['name']}({out['arguments']})"
            else:
                text = out["content"][0]["text"]
                assert decided["finish_reason"] == "stop"
                assert decided["parts"] == [{"type": "text", "content": text}]
                assert attrs[OI.OUTPUT_VALUE] == text and text.startswith(ANSWER)
            assert "model" not in attrs[OI.OUTPUT_VALUE]  # not the old {"model": ...} panel
        elif kind == "function":
            assert conventions(attrs) == EVERY_SPAN | {
                GA.GEN_AI_TOOL_NAME, OI.TOOL_NAME, GA.GEN_AI_TOOL_TYPE, GA.GEN_AI_TOOL_CALL_ID,
                GA.GEN_AI_TOOL_CALL_ARGUMENTS, GA.GEN_AI_TOOL_CALL_RESULT,
                OI.INPUT_VALUE, OI.INPUT_MIME_TYPE, OI.OUTPUT_VALUE, OI.OUTPUT_MIME_TYPE}
            assert attrs[GA.GEN_AI_TOOL_NAME] == attrs[OI.TOOL_NAME] == data["name"]
            assert attrs[GA.GEN_AI_OPERATION_NAME] == Op.EXECUTE_TOOL.value
            assert attrs[OI.OPENINFERENCE_SPAN_KIND] == Kind.TOOL.value
            assert attrs[GA.GEN_AI_TOOL_CALL_ARGUMENTS] == attrs[OI.INPUT_VALUE] == data["input"]
            assert attrs[GA.GEN_AI_TOOL_CALL_RESULT] == attrs[OI.OUTPUT_VALUE] == data["output"]
            # The call id is the model's: the same id as the call in the model's output.
            (made,) = [o for s in record["spans"] if s["span_data"]["type"] == "generation"
                       for o in s["span_data"]["output"] if o.get("name") == data["name"]]
            assert attrs[GA.GEN_AI_TOOL_CALL_ID] == made["call_id"]
        elif kind == "handoff":
            assert conventions(attrs) == EVERY_SPAN | {GA.GEN_AI_TOOL_NAME, OI.TOOL_NAME}
            assert attrs[GA.GEN_AI_TOOL_NAME] == attrs[OI.TOOL_NAME] == "transfer_to_Billing"
            assert attrs[GA.GEN_AI_OPERATION_NAME] == otlp.HANDOFF
            assert attrs[OI.OPENINFERENCE_SPAN_KIND] == Kind.TOOL.value
            assert attrs["turnfleet.handoff.to_agent"] == "Billing"
        elif kind == "guardrail":
            assert conventions(attrs) == EVERY_SPAN | {OI.OUTPUT_VALUE, OI.OUTPUT_MIME_TYPE}
            assert attrs[OI.OPENINFERENCE_SPAN_KIND] == Kind.GUARDRAIL.value
            assert attrs[GA.GEN_AI_OPERATION_NAME] == otlp.GUARDRAIL
            assert json.loads(attrs[OI.OUTPUT_VALUE]) == {"triggered": False}
            assert attrs[OI.OUTPUT_MIME_TYPE] == Mime.JSON.value
        elif kind == "custom":
            turn_span = data["data"].get("sdk_span_type") == "turn"
            assert conventions(attrs) == EVERY_SPAN | ({GA.GEN_AI_AGENT_NAME} if turn_span else set())
            assert attrs[OI.OPENINFERENCE_SPAN_KIND] == Kind.CHAIN.value
            assert attrs[GA.GEN_AI_OPERATION_NAME] == data["name"]
        else:
            pytest.fail(f"a span kind this test does not know: {kind}")
    assert seen_kinds == {"agent", "generation", "function", "handoff", "guardrail", "custom"}


def test_the_responses_api_span_and_chat_completions_messages_map_too() -> None:
    # A real OpenAI model's spans: "response" (Responses API) and chat-completions messages.
    _, kind, attrs = otlp.span_attributes(
        {"type": "response", "response_id": "resp_1", "model": "gpt-4o",
         "usage": {"input_tokens": 1000, "output_tokens": 100, "input_tokens_details": {"cached_tokens": 400},
                   "output_tokens_details": {"reasoning_tokens": 30}}},
        PRICES.cost_usd)
    assert kind == "response" and attrs[GA.GEN_AI_RESPONSE_ID] == "resp_1"
    assert attrs[GA.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] == attrs[OI.LLM_TOKEN_COUNT_PROMPT_DETAILS_CACHE_READ] == 400
    assert attrs[GA.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS] == attrs[OI.LLM_TOKEN_COUNT_COMPLETION_DETAILS_REASONING] == 30
    assert attrs[OI.LLM_COST_TOTAL] == PRICES.cost_usd(
        "gpt-4o", TokenUsage(input_tokens=1000, output_tokens=100, cached_tokens=400))
    _, _, attrs = otlp.span_attributes({
        "type": "generation", "model": "unpriced-model",
        "input": [{"role": "user", "content": "hi"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "c1", "type": "function", "function": {"name": "lookup_order", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "shipped"}],
        "output": [{"role": "assistant", "content": "It shipped."}],
        "usage": {"input_tokens": 10, "output_tokens": 3}}, PRICES.cost_usd)
    history = genai(attrs, GA.GEN_AI_INPUT_MESSAGES)
    assert calls_in(history[1])[0]["name"] == "lookup_order"
    assert history[2] == {"role": "tool", "parts": [{"type": "tool_call_response", "id": "c1", "response": "shipped"}]}
    assert genai(attrs, GA.GEN_AI_OUTPUT_MESSAGES)[0]["parts"] == [{"type": "text", "content": "It shipped."}]
    assert not messages_keys(OI.LLM_INPUT_MESSAGES, attrs) | messages_keys(OI.LLM_OUTPUT_MESSAGES, attrs)
    assert OI.LLM_COST_TOTAL not in attrs and GEN_AI_COST not in attrs  # unknown, not $0


def test_openinference_flattened_messages_are_opt_in_and_match_the_genai_ones() -> None:
    """For a receiver that reads only OpenInference's llm.*_messages (and converts no GenAI):
    ``OtlpSink(openinference_messages=True)`` adds them, the same messages as GenAI's."""
    call = {"type": "generation", "model": "gpt-4o-mini",
            "input": [{"role": "system", "content": "rules"}, {"role": "user", "content": "where is 1042?"},
                      {"type": "function_call", "call_id": "c1", "name": "lookup_order", "arguments": "{}"},
                      {"type": "function_call_output", "call_id": "c1", "output": "shipped"}],
            "output": [{"role": "assistant", "content": [{"type": "output_text", "text": "It shipped."}]}]}
    _, _, attrs = otlp.span_attributes(call, None, None, True)
    inp, out = OI.LLM_INPUT_MESSAGES, OI.LLM_OUTPUT_MESSAGES
    assert [attrs[f"{inp}.{i}.{MA.MESSAGE_ROLE}"] for i in range(4)] == ["system", "user", "assistant", "tool"]
    assert attrs[f"{inp}.2.{MA.MESSAGE_TOOL_CALLS}.0.{TC.TOOL_CALL_FUNCTION_NAME}"] == "lookup_order"
    assert attrs[f"{inp}.3.{MA.MESSAGE_TOOL_CALL_ID}"] == "c1"
    assert attrs[f"{out}.0.{MA.MESSAGE_CONTENT}"] == "It shipped."
    assert len(genai(attrs, GA.GEN_AI_INPUT_MESSAGES)) == 4  # GenAI's form is always there
    assert not messages_keys(inp, otlp.span_attributes(call)[2])  # off by default


@pytest.mark.parametrize(("model", "provider"), [
    ("gpt-4o-mini", "openai"), ("litellm/anthropic/claude-sonnet", "anthropic"),
    ("turnfleet-offline", "turnfleet"), ("turnfleet-offline-flawed", "turnfleet")])
def test_a_model_calls_provider_is_the_one_its_name_routes_to(model: str, provider: str) -> None:
    _, _, attrs = otlp.span_attributes({"type": "generation", "model": model, "input": [], "output": []})
    assert attrs[GA.GEN_AI_PROVIDER_NAME] == attrs[GA.GEN_AI_SYSTEM] == attrs[OI.LLM_PROVIDER] == provider


def test_a_model_call_that_got_no_response_names_no_response_model() -> None:
    """A call that failed (no usage, no output) has a request model and no response model:
    Phoenix fills a span's missing output.value from gen_ai.response.*, so a response model
    there showed a failed call's output as {"model": "gpt-4o-mini"} (seen in make e2e-phoenix)."""
    failed = {"type": "generation", "model": "gpt-4o-mini", "output": None, "usage": None,
              "input": [{"role": "user", "content": "hi"}]}
    _, _, attrs = otlp.span_attributes(failed, PRICES.cost_usd)
    assert attrs[GA.GEN_AI_REQUEST_MODEL] == attrs[OI.LLM_MODEL_NAME] == "gpt-4o-mini"
    assert genai(attrs, GA.GEN_AI_INPUT_MESSAGES)[0]["parts"] == [{"type": "text", "content": "hi"}]
    assert not {GA.GEN_AI_RESPONSE_MODEL, GA.GEN_AI_RESPONSE_ID, OI.OUTPUT_VALUE} & set(attrs)
    # A call that got its answer names the model that answered, recorded text or not.
    answered = {**failed, "usage": {"input_tokens": 10, "output_tokens": 3}}
    assert otlp.span_attributes(answered)[2][GA.GEN_AI_RESPONSE_MODEL] == "gpt-4o-mini"
    assert otlp.span_attributes({**failed, "output": [{"role": "assistant", "content": "ok"}]})[2][
        GA.GEN_AI_RESPONSE_MODEL] == "gpt-4o-mini"


def test_a_long_history_and_long_texts_are_capped() -> None:
    history = [{"role": "system", "content": "rules"}] + [
        {"role": "user" if i % 2 else "assistant", "content": f"message {i} " + "x" * 5000} for i in range(40)]
    _, _, attrs = otlp.span_attributes({"type": "generation", "model": "m", "input": history, "output": []})
    kept = genai(attrs, GA.GEN_AI_INPUT_MESSAGES)
    assert len(kept) == otlp.MAX_HISTORY and kept[0]["role"] == "system"
    last = kept[-1]["parts"][0]["content"]
    assert last.startswith("message 39 ") and len(last) == otlp.MAX_MESSAGE_CHARS and last.endswith("…")
    assert attrs["turnfleet.input_messages.left_out"] == 41 - otlp.MAX_HISTORY
    root = otlp.root_attributes({"id": "trace_1", "input": "y" * 10_000, "output": "z"})
    assert len(root[OI.INPUT_VALUE]) == otlp.MAX_VALUE_CHARS and root[OI.OUTPUT_VALUE] == "z"


async def test_a_failed_attempt_shows_its_cause_and_an_exception_event(
    redis, collector, receiver: Receiver, sink: OtlpSink
) -> None:
    record = await kept_refund(redis, collector)
    record["trace"].update(status="failed", kept_because="failed", final=False, output=None,
                           error={"type": "InternalServerError", "message": "Error code: 500"})
    (generation,) = [s for s in record["spans"] if s["span_data"]["type"] == "generation"][-1:]
    generation["error"] = {"message": "Error getting response",
                           "data": {"error": "Error code: 500"}}

    spans = send(sink, receiver, record)

    (root,) = [s for s in spans if not s["parent_span_id"]]
    assert root["status"] == STATUS_ERROR
    assert root["status_message"] == "InternalServerError: Error code: 500"
    assert root["events"] == [{"name": "exception", "attributes": {
        EXC.EXCEPTION_TYPE: "InternalServerError", EXC.EXCEPTION_MESSAGE: "Error code: 500"}}]
    assert root["attributes"][ERR.ERROR_TYPE] == "InternalServerError"
    assert root["attributes"]["turnfleet.attempt.final"] is False
    assert root["attributes"][OI.TAG_TAGS] == ["attempt 1", "retried", "failed"]
    failed = by_sdk_id(spans)[generation["id"]]
    assert failed["status"] == STATUS_ERROR
    assert failed["status_message"] == "Error getting response: Error code: 500"
    assert failed["events"] == [{"name": "exception", "attributes": {
        EXC.EXCEPTION_TYPE: "Error", EXC.EXCEPTION_MESSAGE: "Error getting response: Error code: 500"}}]
    assert all(not s["events"] for s in spans if s is not root and s is not failed)


async def test_a_retried_turn_exports_each_attempt_marked_with_text_answer_and_cause(
    redis, receiver: Receiver, sink: OtlpSink
) -> None:
    """Through the real turn job: attempt 1 fails on the model (retried), attempt 2 answers.
    The customer's card number and e-mail never reach an attribute (the store redacts)."""
    text = "Refund order 1042 please, card 4242 4242 4242 4242, mail jane.doe@acme.example"
    producer = Producer(redis=redis)
    turn_id = await producer.enqueue_turn(conversation_id="conv-a", customer_id="C-100", text=text)
    buffer = TraceBuffer()
    ctx = runtime(redis, FlakyModel(fail_on=4))
    ctx["runtime"].traces = TraceStore(buffer, redis, TraceSampler(1.0), Redactor(), 60, sink=sink)
    with traces_to(buffer):
        with pytest.raises(Retry):
            await run_turn(ctx, turn_id, "conv-a")
        assert await run_turn(ctx, turn_id, "conv-a") == "completed"
    assert sink.force_flush(5) is True
    result = await producer.result(turn_id)
    spans = receiver.wait_for_spans(2)
    roots = sorted((s for s in spans if not s["parent_span_id"]), key=lambda s: s["attributes"]["turnfleet.attempt"])

    # One trace per attempt, each its SDK trace's id, marked so a receiver tells them apart.
    assert [r["attributes"]["turnfleet.attempt"] for r in roots] == [1, 2]
    assert [r["attributes"]["turnfleet.attempt.final"] for r in roots] == [False, True]
    assert len({r["trace_id"] for r in roots}) == 2
    first, second = roots
    assert first["status"] == STATUS_ERROR
    assert first["status_message"] == "ConnectionError: model endpoint reset the connection"
    assert first["events"][0]["attributes"][EXC.EXCEPTION_TYPE] == "ConnectionError"
    assert OI.OUTPUT_VALUE not in first["attributes"]
    assert second["status"] != STATUS_ERROR and not second["events"]
    for root in roots:
        shown = root["attributes"][OI.INPUT_VALUE]
        assert shown.startswith("Refund order 1042 please") and "[REDACTED:card]" in shown
    assert second["attributes"][OI.OUTPUT_VALUE] == result.final_output
    everything = json.dumps(spans)
    assert "4242 4242" not in everything and "jane.doe@acme.example" not in everything


async def test_without_sensitive_data_the_root_has_no_text_or_answer(redis, receiver: Receiver, sink: OtlpSink) -> None:
    producer = Producer(redis=redis)
    turn_id = await producer.enqueue_turn(conversation_id="conv-s", customer_id="C-100", text="Where is order 1042?")
    buffer = TraceBuffer()
    ctx = runtime(redis, OfflineModel(), trace_include_sensitive_data=False)
    ctx["runtime"].traces = TraceStore(buffer, redis, TraceSampler(1.0), Redactor(), 60, sink=sink)
    with traces_to(buffer):
        assert await run_turn(ctx, turn_id, "conv-s") == "completed"
    assert sink.force_flush(5) is True
    spans = receiver.wait_for_spans(2)
    (root,) = [s for s in spans if not s["parent_span_id"]]
    assert root["attributes"]["turnfleet.attempt.final"] is True
    for span in spans:
        if span["attributes"][OI.OPENINFERENCE_SPAN_KIND] == Kind.GUARDRAIL.value:
            continue  # its output is whether it tripped, not the customer's words
        assert not {OI.INPUT_VALUE, OI.OUTPUT_VALUE, GA.GEN_AI_INPUT_MESSAGES} & set(span["attributes"])
        assert not messages_keys(OI.LLM_INPUT_MESSAGES, span["attributes"])


def test_otlp_py_spells_no_convention_name_itself() -> None:
    """Every attribute name the conventions packages publish is taken from them: none is a
    string literal in the exporter (where a typo or a renamed convention would go unseen)."""
    import ast
    from pathlib import Path

    published = {v for ns in (OI, MA, TC) for k, v in vars(ns).items() if k.isupper() and isinstance(v, str)}
    published |= {v for k, v in vars(GA).items() if k.startswith("GEN_AI_") and isinstance(v, str)}
    published = {name for name in published if "." in name}
    source = Path(otlp.__file__).read_text()
    literals = {node.value for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert len(published) > 100 and not literals & published


def test_a_worker_prices_model_calls_with_the_fleets_price_table(receiver: Receiver, monkeypatch) -> None:
    from tests.test_otlp import minimal_record
    from turnfleet.settings import WorkerProcessSettings

    monkeypatch.setenv("TURNFLEET_PRICES", '{"self-hosted-llm": {"input": 1, "cached_input": 0.5, "output": 2}}')
    record = minimal_record()
    record["spans"] = [{
        "id": "span_1", "parent_id": None, "started_at": "2025-06-15T10:00:00.1+00:00",
        "ended_at": "2025-06-15T10:00:00.9+00:00",
        "span_data": {"type": "generation", "model": "self-hosted-llm",
                      "usage": {"input_tokens": 1000, "output_tokens": 1000,
                                "input_tokens_details": {"cached_tokens": 1000}}}}]
    with OtlpSink.from_settings(WorkerProcessSettings(otlp_endpoint=receiver.endpoint)) as made:
        spans = send(made, receiver, record)
    (call,) = [s for s in spans if s["parent_span_id"]]
    assert call["attributes"][OI.LLM_COST_TOTAL] == call["attributes"][GEN_AI_COST] == 0.0025  # 1000 cached + 1000 out


# -- a model call on the Responses API carries what a chat one does ---------------------------

ENDPOINT_MODEL = "gpt-4o-mini"  # priced: cost is known


async def endpoint_turn(redis, receiver: Receiver, sink: OtlpSink, server, api: str, text: str,
                        **settings: Any) -> tuple[Any, list[dict[str, Any]]]:
    """One real turn job of the Support Desk on the local endpoint (``api``: chat or
    responses), its kept record exported; returns (the turn's result, the spans received)."""
    from turnfleet.settings import WorkerProcessSettings
    from turnfleet.workers.llm import make_model

    model = make_model(WorkerProcessSettings(
        model_base_url=server.url, model_name=ENDPOINT_MODEL, model_api_key="sk-test-dummy",
        model_api=api, model_max_retries=0))
    producer = Producer(redis=redis)
    turn_id = await producer.enqueue_turn(conversation_id=f"conv-{api}", customer_id="C-100", text=text)
    buffer = TraceBuffer()
    ctx = runtime(redis, model, model_name=ENDPOINT_MODEL, max_attempts=1, **settings)
    ctx["runtime"].traces = TraceStore(buffer, redis, TraceSampler(1.0), Redactor(), 60, sink=sink)
    with traces_to(buffer):
        await run_turn(ctx, turn_id, f"conv-{api}")
    assert sink.force_flush(5) is True
    result = await producer.result(turn_id)
    return result, receiver.wait_for_spans(2)


def model_calls(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    calls = [s for s in spans if s["attributes"][OI.OPENINFERENCE_SPAN_KIND] == Kind.LLM.value]
    return sorted(calls, key=lambda s: s["start"])


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_a_model_call_on_either_api_carries_model_messages_tokens_and_cost(
    redis, receiver: Receiver, sink: OtlpSink, llm_server, api: str  # noqa: F811
) -> None:
    """The same refund through the real SDK on Chat Completions and on the Responses API: each
    model call names its model and provider, carries its messages (redacted: the card number
    never), its tokens as the server reported them and turnfleet's cost of them."""
    server = llm_server()
    text = "I'd like a refund of $89.00 for order 1042, card 4242 4242 4242 4242"
    result, spans = await endpoint_turn(redis, receiver, sink, server, api, text)
    assert result.status == "completed"
    calls = model_calls(spans)
    served = sorted((s for s in server.log if s.outcome == "ok"), key=lambda s: s.number)
    assert len(calls) == len(served) == 4
    for call, answered in zip(calls, served, strict=True):
        attrs = call["attributes"]
        assert call["name"] == f"chat {ENDPOINT_MODEL}"
        assert attrs[GA.GEN_AI_OPERATION_NAME] == Op.CHAT.value
        assert attrs[GA.GEN_AI_REQUEST_MODEL] == attrs[GA.GEN_AI_RESPONSE_MODEL] == ENDPOINT_MODEL
        assert attrs[OI.LLM_MODEL_NAME] == ENDPOINT_MODEL
        assert attrs[GA.GEN_AI_PROVIDER_NAME] == attrs[OI.LLM_PROVIDER] == "openai"
        usage = answered.usage
        assert attrs[GA.GEN_AI_USAGE_INPUT_TOKENS] == attrs[OI.LLM_TOKEN_COUNT_PROMPT] == usage["input_tokens"]
        assert attrs[GA.GEN_AI_USAGE_OUTPUT_TOKENS] == attrs[OI.LLM_TOKEN_COUNT_COMPLETION] == usage["output_tokens"]
        assert attrs[GA.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] == usage["cached_tokens"]
        assert attrs[GA.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS] == 0
        cost = PRICES.cost_usd(ENDPOINT_MODEL, TokenUsage(
            input_tokens=usage["input_tokens"], output_tokens=usage["output_tokens"],
            cached_tokens=usage["cached_tokens"]))
        assert cost and attrs[OI.LLM_COST_TOTAL] == attrs[GEN_AI_COST] == cost
        # The messages: the agent's instructions first, the customer's (redacted) text, the decision.
        history = genai(attrs, GA.GEN_AI_INPUT_MESSAGES)
        assert history[0]["role"] == "system" and history[0]["parts"][0]["content"]
        assert history[1]["role"] == "user"
        assert history[1]["parts"][0]["content"].startswith("I'd like a refund")
        (decided,) = genai(attrs, GA.GEN_AI_OUTPUT_MESSAGES)
        assert decided["role"] == "assistant"
        if answered.decision == "message":
            assert attrs[OI.OUTPUT_VALUE] == result.final_output
        else:
            assert calls_in(decided)[0]["name"] == answered.decision
            assert attrs[OI.OUTPUT_VALUE].startswith(f"{answered.decision}(")
    # The tool spans name the call id the model made (matched from the model's output).
    tools = [s for s in spans if s["attributes"][OI.OPENINFERENCE_SPAN_KIND] == Kind.TOOL.value
             and GA.GEN_AI_TOOL_TYPE in s["attributes"]]
    assert tools and all(s["attributes"].get(GA.GEN_AI_TOOL_CALL_ID) for s in tools)
    assert "4242 4242" not in json.dumps(spans)


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_a_failed_model_call_on_either_api_shows_error_and_cause(
    redis, receiver: Receiver, sink: OtlpSink, llm_server, api: str  # noqa: F811
) -> None:
    server = llm_server()
    server.inject("500", times=None)
    result, spans = await endpoint_turn(redis, receiver, sink, server, api, "Where is order 1042?")
    assert result.status == "failed"
    (call,) = model_calls(spans)
    assert call["status"] == STATUS_ERROR
    assert call["status_message"].startswith("Error getting response: Error code: 500")
    assert call["events"][0]["name"] == "exception"
    assert not {GA.GEN_AI_RESPONSE_MODEL, OI.OUTPUT_VALUE, OI.LLM_COST_TOTAL} & set(call["attributes"])


async def test_without_sensitive_data_a_responses_call_carries_tokens_and_no_text(
    redis, receiver: Receiver, sink: OtlpSink, llm_server  # noqa: F811
) -> None:
    server = llm_server()
    result, spans = await endpoint_turn(redis, receiver, sink, server, "responses",
                                        "I'd like a refund of $89.00 for order 1042",
                                        trace_include_sensitive_data=False)
    assert result.status == "completed"
    calls = model_calls(spans)
    assert len(calls) == 4
    for call, answered in zip(calls, sorted(server.log, key=lambda s: s.number), strict=True):
        attrs = call["attributes"]
        assert attrs[GA.GEN_AI_USAGE_INPUT_TOKENS] == answered.usage["input_tokens"]
        assert not {OI.INPUT_VALUE, OI.OUTPUT_VALUE, GA.GEN_AI_INPUT_MESSAGES, GA.GEN_AI_OUTPUT_MESSAGES} & set(attrs)
        assert not messages_keys(OI.LLM_INPUT_MESSAGES, attrs) | messages_keys(OI.LLM_OUTPUT_MESSAGES, attrs)
