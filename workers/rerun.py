"""Re-run a stored turn against a candidate (a workflow, a model), writing nothing to production.

What a rerun reads: the turn's record (``TurnResult``: its text, tool calls with arguments and
results, handoffs, agents, final answer, workflow, model, usage) and the conversation's memory
as it stood before the turn (``memory[0:memory_base]``). Not the sampled trace: a turn stored
at trace sample rate 0 re-runs the same. What it runs: the real Agents SDK ``Runner``, in this
process, from the agent the turn started at, on a clone of the candidate's agent graph whose
function tools are intercepted:

- a call whose (tool, canonical arguments) the original made answers from the recording
  (``source: recorded``), each recorded call used once, in order;
- a read-only tool called with other arguments runs for real against today's data (``live``);
- a side-effecting tool (``Workflow.side_effect_tools``) never runs: the recording when the
  call matches, else a plain answer that the candidate asked for a side effect the original
  did not make (``side_effect_not_made``; ``turnfleet.checks.SIDE_EFFECT_NOT_MADE``), which
  checks judge as the call's decision.

What it never writes: tracing is disabled for the run (no span reaches the trace store, the
SDK's exporter or OTLP), no telemetry hooks run (nothing reaches the stream, the aggregates or
the alerts; the team's own ``Workflow.hooks`` are not called either), the memory is a
read-only copy, and side-effecting tools do not run (no ledger entry, no ticket). What it
writes: its own record (``keys.turn_reruns``: candidate, changed, differences, usage), with
the raw-text lifetime as TTL (it holds customer text) and erased with its turn.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agents import Agent, RunConfig, RunContextWrapper, RunHooks, Runner
from agents.exceptions import InputGuardrailTripwireTriggered, OutputGuardrailTripwireTriggered
from agents.items import ModelResponse
from agents.memory.session import SessionABC
from agents.tool import FunctionTool
from redis.asyncio import Redis

from turnfleet import keys
from turnfleet.checks import SIDE_EFFECT_NOT_MADE, CheckOutcome, FinishedTurn, run_checks
from turnfleet.connection import RAW, lenient_text
from turnfleet.context import TurnContext
from turnfleet.events import LlmEndDetail, parse_events
from turnfleet.judge import JudgeEndpoint, run_with_endpoint
from turnfleet.models import Handoff, TokenUsage, ToolCall, TurnResult, utcnow
from turnfleet.queue import TurnQueue
from turnfleet.settings import WorkerProcessSettings
from turnfleet.workflow import App, Workflow, load_app
from turnfleet.workers.hooks import decision_of, model_name_of, usage_of
from turnfleet.workers.llm import OFFLINE_MODELS, WorkerModels, check_offline_scripts, make_model
from turnfleet.workers.memory import decode_item, is_marker

RECORDED, LIVE, NOT_MADE = "recorded", "live", SIDE_EFFECT_NOT_MADE

Pricing = Callable[[str | None, TokenUsage], float | None]


class RerunError(ValueError):
    """A turn that cannot be re-run, or a candidate that cannot be built; the message says why
    in one line. ``code``: ``not_found``, ``not_finished``, ``removed`` or ``validation``."""

    def __init__(self, message: str, code: str = "validation") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class CandidateSpec:
    """What to re-run a turn against; every field unset means "what served the original"."""

    app: str | None = None  # module:attr (``--app``); default: the built-in Desk
    workflow: str | None = None  # default: the turn's workflow
    model: str | None = None  # default: the model the turn's record names

    def describe(self) -> dict[str, Any]:
        return {"app": self.app, "workflow": self.workflow, "model": self.model}


@dataclass
class Candidate:
    """A built candidate: the workflow to run, its model provider and the model's name."""

    workflow: Workflow
    models: WorkerModels
    model: str
    version: str

    def describe(self) -> dict[str, Any]:
        return {"workflow": self.workflow.name, "version": self.version, "model": self.model}


@dataclass
class Candidates:
    """Builds candidates for turns and keeps them (a regression run builds each once)."""

    spec: CandidateSpec
    settings: WorkerProcessSettings = field(default_factory=WorkerProcessSettings)
    _apps: dict[str, App] = field(default_factory=dict)
    _built: dict[tuple[str, str], Candidate] = field(default_factory=dict)

    def for_turn(self, record: TurnResult) -> Candidate:
        """The candidate for ``record`` (RerunError naming the option that is wrong)."""
        model = self.spec.model or record.model or self.settings.model_name
        workflow_name = self.spec.workflow or record.workflow or self.settings.workflow_name
        found = self._built.get((workflow_name, model))
        if found is None:
            found = self._built[(workflow_name, model)] = self._build(workflow_name, model)
        return found

    def _build(self, workflow_name: str, model: str) -> Candidate:
        # httpx, not the worker's aiohttp default: a rerun's clients live as long as its command
        # or request and are dropped unclosed, which an aiohttp session warns about.
        settings = self.settings.model_copy(update={"model_name": model, "model_http": "httpx"})
        if self.settings.model_base_url is None and model not in OFFLINE_MODELS:
            raise RerunError(f"--model {model!r}: no such model here: without TURNFLEET_MODEL_BASE_URL "
                             f"the fleet runs offline ({', '.join(OFFLINE_MODELS)})")
        app = self._app(settings)
        workflow = app.get(workflow_name)
        if workflow is None:
            served = ", ".join(w.name for w in app.workflows)
            raise RerunError(f"--workflow {workflow_name!r}: no such workflow in "
                             f"{self.spec.app or 'the built-in app'} (it has: {served})")
        try:
            check_offline_scripts(App([workflow]), settings)
        except ValueError as exc:
            raise RerunError(str(exc)) from None
        # --model overrides the workflow's own model; otherwise the workflow runs as it serves.
        models = WorkerModels(settings, script=workflow.offline_script,
                              workflow_model=None if self.spec.model else workflow.model)
        return Candidate(workflow, models, models.default_name if not self.spec.model else model,
                         workflow.version_label())

    def _app(self, settings: WorkerProcessSettings) -> App:
        if self.spec.app:
            app = self._apps.get(self.spec.app)
            if app is None:
                try:
                    app = self._apps[self.spec.app] = load_app(self.spec.app)
                except (ValueError, ImportError) as exc:  # AppLoadError, WorkflowError, a bad module
                    raise RerunError(str(exc) if str(exc).startswith("--app") else f"--app {self.spec.app!r}: {exc}") from None
            return app
        from turnfleet.workers.support_desk import builtin_app

        # The Desk's agents hold their Model object: built on the candidate's model.
        return builtin_app(make_model(settings), settings.workflow_name)


# -- what a turn was --------------------------------------------------------------------------


@dataclass
class StoredTurn:
    """A finished turn as a rerun needs it: its record, request metadata and earlier memory."""

    record: TurnResult
    metadata: dict[str, str]
    earlier: list[dict[str, Any]]  # memory items before the turn (markers and corrupt items skipped)
    events: list[Any]  # the last attempt's telemetry events, if still stored
    stored_checks: list[dict[str, Any]] | None


async def load_turn(redis: Redis, turn_id: str, raw_retention_s: int) -> StoredTurn:
    """The turn's record and memory as they were before it, or ``RerunError`` saying what is
    missing: unknown, not finished, raw text expired, memory removed."""
    record = await TurnQueue(redis).get(turn_id)
    if record is None:
        raise RerunError(f"no turn {turn_id!r} (never enqueued, or removed by retention): cannot re-run",
                         "not_found")
    if not record.done:
        raise RerunError(f"turn {turn_id!r} is {record.status}, not finished: cannot re-run yet", "not_finished")
    if record.error_type == "CorruptTurnRecord":
        raise RerunError(f"turn {turn_id!r}: its record cannot be read ({record.error_message}): cannot re-run",
                         "removed")
    fields = ("raw_expired_at", "memory_base", "memory_session", "request")
    raw = dict(zip(fields, await redis.execute_command("HMGET", keys.turn(turn_id), *fields, **RAW)))
    if raw["raw_expired_at"]:
        raise RerunError(f"turn {turn_id!r}: removed by retention / raw text expired after "
                         f"{raw_retention_s} s (TURNFLEET_RAW_RETENTION_S): only its redacted form "
                         f"is left: cannot re-run", "removed")
    base = int(lenient_text(raw["memory_base"]) or 0)
    conv = record.conversation_id
    meta = f"{keys.SESSION_PREFIX}:{keys.session_id(conv)}"
    async with redis.pipeline(transaction=False) as pipe:
        pipe.execute_command("LRANGE", keys.session_messages(conv), 0, base - 1, **RAW)
        pipe.hget(meta, "created_at")
        pipe.hgetall(keys.turn_events(turn_id))
        pipe.get(keys.turn_checks(turn_id))
        items, created, batches, checks = await pipe.execute()
    session = lenient_text(raw["memory_session"]) or ""
    if base and (len(items) < base or (session and str(created or "") != session)):
        raise RerunError(f"turn {turn_id!r}: the conversation memory before it ({base} items) was removed "
                         f"by retention (TURNFLEET_SESSION_TTL_S, or the conversation was purged): cannot re-run",
                         "removed")
    earlier = []
    for item_raw in (items if base else []):
        item, problem = decode_item(item_raw)
        if problem is None and not is_marker(item):
            earlier.append(item)
    metadata: dict[str, str] = {}
    try:
        metadata = dict(json.loads(raw["request"] or b"{}").get("metadata") or {})
    except (ValueError, AttributeError):
        pass
    events: list[Any] = []
    if batches:
        last = max(batches, key=lambda a: int(a) if str(a).isdigit() else 0)
        try:
            events = parse_events(batches[last])
        except ValueError:
            events = []
    stored_checks = None
    if checks:
        try:
            parsed = json.loads(checks)
            stored_checks = parsed.get("checks", parsed) if isinstance(parsed, dict) else parsed
        except ValueError:
            stored_checks = None
    return StoredTurn(record, metadata, earlier, events, stored_checks)


# -- running the candidate -------------------------------------------------------------------


def canonical(arguments: str | None) -> str:
    """Tool arguments compared by meaning: JSON with sorted keys, else the text as it is."""
    try:
        return json.dumps(json.loads(arguments or ""), sort_keys=True, separators=(",", ":"))
    except (ValueError, RecursionError):
        return arguments or ""


class Recording:
    """The original's tool results by (tool, canonical arguments), each used once, in order."""

    def __init__(self, calls: list[ToolCall]) -> None:
        self._answers: dict[tuple[str, str], deque[str | None]] = defaultdict(deque)
        for call in calls:
            self._answers[(call.tool, canonical(call.arguments))].append(call.output)

    def take(self, tool: str, arguments: str) -> tuple[bool, str | None]:
        answers = self._answers.get((tool, canonical(arguments)))
        if not answers:
            return False, None
        return True, answers.popleft()


class ReadOnlyMemory(SessionABC):
    """The conversation as it was before the turn; what the run adds stays in this object."""

    def __init__(self, session_id: str, items: list[dict[str, Any]]) -> None:
        self.session_id = session_id
        self.session_settings = None
        self._items = [copy.deepcopy(i) for i in items]

    async def get_items(self, limit: int | None = None) -> list[Any]:
        return list(self._items if limit is None else self._items[-limit:] if limit > 0 else [])

    async def add_items(self, items: list[Any]) -> None:
        self._items.extend(items)

    async def pop_item(self) -> Any | None:
        return self._items.pop() if self._items else None

    async def clear_session(self) -> None:
        self._items = []


@dataclass
class _Run:
    """What the candidate did, collected by the tool interceptors and :class:`_Watch`."""

    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    agents: list[str] = field(default_factory=list)
    handoffs: list[tuple[str, str]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, TokenUsage] = field(default_factory=dict)  # per model name


class _Watch(RunHooks[Any]):
    """The rerun's own hooks: they only note what happened (no telemetry, no writes)."""

    def __init__(self, run: _Run, default_model: str) -> None:
        self.run, self.default_model = run, default_model

    async def on_agent_start(self, context: RunContextWrapper[Any], agent: Agent[Any]) -> None:
        self.run.agents.append(agent.name)

    async def on_handoff(self, context: RunContextWrapper[Any], from_agent: Agent[Any], to_agent: Agent[Any]) -> None:
        self.run.handoffs.append((from_agent.name, to_agent.name))

    async def on_llm_end(self, context: RunContextWrapper[Any], agent: Agent[Any], response: ModelResponse) -> None:
        model = model_name_of(agent.model, self.default_model)
        usage = usage_of(response.usage)
        self.run.usage[model] = self.run.usage.get(model, TokenUsage()) + usage
        self.run.decisions.append({"agent": agent.name, "model": model,
                                   **decision_of(response)})


def _intercept(tool: FunctionTool, agent: str, side_effect: bool, recording: Recording, run: _Run) -> FunctionTool:
    original = tool.on_invoke_tool

    async def invoke(ctx: Any, arguments: str) -> Any:
        matched, answer = recording.take(tool.name, arguments)
        if matched:
            source = RECORDED
        elif side_effect:
            source = NOT_MADE
            answer = json.dumps({
                SIDE_EFFECT_NOT_MADE: True, "tool": tool.name,
                "reason": (f"not done: this is a re-run, and {tool.name} changes the world; the "
                            f"original turn did not call it with these arguments, so it was not run"),
            })
        else:
            source = LIVE
            answer = await original(ctx, arguments)
        run.tool_calls.append({"agent": agent, "tool": tool.name, "call_id": getattr(ctx, "tool_call_id", None),
                               "arguments": arguments, "result": None if answer is None else str(answer),
                               "source": source})
        return answer

    clone = copy.copy(tool)
    clone.on_invoke_tool = invoke
    return clone


def clone_graph(workflow: Workflow, recording: Recording, run: _Run) -> dict[str, Agent[Any]]:
    """Every agent of ``workflow`` cloned with intercepted function tools and handoffs that
    lead to the clones (``Handoff`` objects are wrapped to return the clone of their agent)."""
    side_effects = set(workflow.side_effect_tools)
    clones: dict[str, Agent[Any]] = {
        name: agent.clone(tools=[_intercept(t, name, t.name in side_effects, recording, run)
                                 if isinstance(t, FunctionTool) else t for t in agent.tools])
        for name, agent in workflow.agents.items()
    }

    def lead_to_clone(handoff: Any) -> Any:
        if hasattr(handoff, "name") and hasattr(handoff, "instructions"):
            return clones.get(handoff.name, handoff)
        invoke = handoff.on_invoke_handoff

        async def to_clone(ctx: Any, arguments: str) -> Any:
            agent = await invoke(ctx, arguments)
            return clones.get(agent.name, agent)

        return dataclasses.replace(handoff, on_invoke_handoff=to_clone)

    for clone in clones.values():
        clone.handoffs = [lead_to_clone(h) for h in clone.handoffs]
    return clones


@dataclass
class Ran:
    """The candidate's side of a rerun."""

    result: TurnResult
    decisions: list[dict[str, Any]]
    usage: dict[str, TokenUsage]
    tool_sources: list[str]


async def run_candidate(redis: Redis, stored: StoredTurn, candidate: Candidate, max_turns: int = 10) -> Ran:
    """Run the candidate on the stored turn (module docstring): nothing written anywhere."""
    record = stored.record
    run = _Run()
    clones = clone_graph(candidate.workflow, Recording(record.tool_calls), run)
    start = clones.get(record.agents[0] if record.agents else "", clones[candidate.workflow.agent.name])
    final: str | None
    try:
        ran = await Runner.run(
            start, record.text,
            context=TurnContext(turn_id=record.turn_id, conversation_id=record.conversation_id,
                                customer_id=record.customer_id, attempt=max(record.attempts, 1), redis=redis,
                                metadata=dict(stored.metadata), workflow=candidate.workflow.name),
            hooks=_Watch(run, candidate.model),
            session=ReadOnlyMemory(keys.session_id(record.conversation_id), stored.earlier),
            max_turns=max_turns,
            run_config=RunConfig(model_provider=candidate.models, tracing_disabled=True,
                                 trace_include_sensitive_data=False),
        )
        final = str(ran.final_output)
    except (InputGuardrailTripwireTriggered, OutputGuardrailTripwireTriggered) as exc:
        final = candidate.workflow.guardrail_reply(exc.guardrail_result.guardrail.get_name())
    total = sum(run.usage.values(), TokenUsage())
    result = record.model_copy(update={
        "status": "completed", "final_output": final, "agents": list(run.agents),
        "tool_calls": [ToolCall(agent=c["agent"], tool=c["tool"], call_id=c["call_id"], arguments=c["arguments"],
                                output=c["result"]) for c in run.tool_calls],
        "handoffs": [Handoff(from_agent=a, to_agent=b) for a, b in run.handoffs],
        "model": candidate.model, "usage": total, "workflow": candidate.workflow.name,
        "version": candidate.version, "errors": [], "error_type": None, "error_message": None,
    })
    return Ran(result, run.decisions, dict(run.usage), [c["source"] for c in run.tool_calls])


# -- comparing ----------------------------------------------------------------------------------


def _decisions_of_events(events: list[Any]) -> list[dict[str, Any]]:
    out = []
    for e in sorted(events, key=lambda e: e.seq):
        if isinstance(e.detail, LlmEndDetail):
            out.append({"agent": e.agent, "model": e.model,
                        **e.detail.decision.model_dump(mode="json", exclude_none=True)})
    return out


def _decisions_of_record(record: TurnResult) -> list[dict[str, Any]]:
    """Derived when the events are gone: one decision per tool call or handoff, then the answer."""
    out: list[dict[str, Any]] = [{"agent": c.agent, "calls": [{"name": c.tool, "arguments": c.arguments}]}
                                 for c in record.tool_calls]
    out += [{"agent": h.from_agent, "calls": [{"name": f"handoff to {h.to_agent}"}]} for h in record.handoffs]
    if record.final_output is not None:
        out.append({"agent": record.agents[-1] if record.agents else None, "message": record.final_output})
    return out


async def judged(result: TurnResult, workflow: Workflow, earlier: list[dict[str, Any]],
                 endpoint: JudgeEndpoint | None) -> list[CheckOutcome]:
    """The workflow's checks on one side, in a thread (an LLM judge's call is sync) with the
    fleet's judge endpoint, as the check job runs them."""
    return await asyncio.to_thread(run_with_endpoint, endpoint, run_checks, workflow,
                                   FinishedTurn.from_result(result, earlier))


def side(result: TurnResult, checks: list[CheckOutcome], *, decisions: list[dict[str, Any]],
         decisions_source: str, sources: list[str] | None, pricing: Pricing | None,
         usage_by_model: Mapping[str, TokenUsage]) -> dict[str, Any]:
    """One side of the comparison as plain JSON."""
    costs = [pricing(m, u) if pricing else None for m, u in usage_by_model.items()]
    return {
        "workflow": result.workflow, "version": result.version, "model": result.model,
        "agents": list(result.agents),
        "decisions": decisions, "decisions_source": decisions_source,
        "tool_calls": [{"agent": c.agent, "tool": c.tool, "arguments": c.arguments, "result": c.output,
                        "source": sources[i] if sources else RECORDED}
                       for i, c in enumerate(result.tool_calls)],
        "handoffs": [[h.from_agent, h.to_agent] for h in result.handoffs],
        "final_output": result.final_output,
        "checks": [o.as_dict() for o in checks],
        "judge_usage": _judge_usage(checks),
        "usage": result.usage.model_dump(),
        "cost_usd": None if not costs or any(c is None for c in costs) else round(sum(costs), 9),  # type: ignore[arg-type]
    }


def _judge_usage(checks: list[CheckOutcome]) -> dict[str, int]:
    """Tokens the side's LLM-judge checks spent (the rerun's own cost, apart from the turn's)."""
    out = {"input_tokens": 0, "output_tokens": 0}
    for o in checks:
        for k in out:
            out[k] += int(getattr(o.usage, k, 0) or 0)
    return out


def _judgement(check: dict[str, Any]) -> bool | None:
    """A check's verdict for fixed/broken: passed (a not-applicable pass included), failed, or
    None when no verdict was given (an LLM judge that was unavailable: not applicable with an
    error), which neither fixes nor breaks anything."""
    if not check.get("applicable", True) and check.get("error"):
        return None
    return bool(check["passed"])


def differences(original: dict[str, Any], candidate: dict[str, Any]) -> list[dict[str, Any]]:
    """What the candidate decided differently: agents, tool calls with their arguments,
    handoffs, final answer (never timings, ids or token counts)."""
    def calls(s: dict[str, Any]) -> list[list[str]]:
        return [[c["tool"], canonical(c["arguments"])] for c in s["tool_calls"]]

    out = []
    for what, get in (("agents", lambda s: s["agents"]), ("tool_calls", calls),
                      ("handoffs", lambda s: s["handoffs"]), ("final_output", lambda s: s["final_output"])):
        a, b = get(original), get(candidate)
        if a != b:
            out.append({"what": what, "original": a, "candidate": b})
    return out


def check_changes(original: dict[str, Any], candidate: dict[str, Any]) -> dict[str, list[str]]:
    """Checks that failed on the original and pass on the candidate (``fixed``), and the reverse
    (``broken``), by name."""
    before = {c["check"]: _judgement(c) for c in original["checks"]}
    after = {c["check"]: _judgement(c) for c in candidate["checks"]}
    return {"fixed": sorted(n for n, ok in after.items() if ok is True and before.get(n) is False),
            "broken": sorted(n for n, ok in after.items() if ok is False and before.get(n, True) is not False)}


async def rerun_turn(redis: Redis, turn_id: str, candidates: Candidates, *, raw_retention_s: int,
                     pricing: Pricing | None = None, store: bool = True) -> dict[str, Any]:
    """Re-run one stored turn against ``candidates.spec`` (module docstring); the report
    (``changed``, ``differences``, ``checks``, ``original``, ``candidate``, ``usage``). Stores
    the rerun's record unless ``store`` is false. Raises :class:`RerunError`."""
    stored = await load_turn(redis, turn_id, raw_retention_s)
    record = stored.record
    candidate = candidates.for_turn(record)
    original_workflow = candidate.workflow  # checks: the candidate's, judged on both sides alike
    began = time.perf_counter()
    ran = await run_candidate(redis, stored, candidate, candidates.settings.max_agent_turns)
    seconds = time.perf_counter() - began
    from_events = _decisions_of_events(stored.events)
    endpoint = JudgeEndpoint.from_settings(candidates.settings)  # redacts with the built-in detectors
    original = side(record, await judged(record, original_workflow, stored.earlier, endpoint),
                    decisions=from_events or _decisions_of_record(record),
                    decisions_source="events" if from_events else "tool_calls",
                    sources=None, pricing=pricing, usage_by_model={record.model: record.usage})
    if stored.stored_checks is not None:
        original["stored_checks"] = stored.stored_checks
    mine = side(ran.result, await judged(ran.result, candidate.workflow, stored.earlier, endpoint),
                decisions=ran.decisions,
                decisions_source="run", sources=ran.tool_sources, pricing=pricing, usage_by_model=ran.usage)
    diff = differences(original, mine)
    delta = (None if original["cost_usd"] is None or mine["cost_usd"] is None
             else round(mine["cost_usd"] - original["cost_usd"], 9))
    usage = {"original": {**original["usage"], "cost_usd": original["cost_usd"]},
             "candidate": {**mine["usage"], "cost_usd": mine["cost_usd"]},
             "cost_delta_usd": delta, "rerun_seconds": round(seconds, 4),
             "judge_tokens": {"original": original["judge_usage"], "candidate": mine["judge_usage"]}}
    report = {"turn_id": turn_id, "rerun_id": f"r_{uuid.uuid4().hex}", "at": utcnow().isoformat(),
              "candidate_spec": candidates.spec.describe(), "changed": bool(diff), "differences": diff,
              "checks": check_changes(original, mine), "usage": usage,
              "original": original, "candidate": {**candidate.describe(), **mine}}
    if store:
        await store_rerun(redis, report, raw_retention_s)
    return report


async def store_rerun(redis: Redis, report: dict[str, Any], ttl_s: int) -> None:
    """The rerun's record (``keys.turn_reruns``): it holds customer text, so it lives as long as
    raw text does (``ttl_s``; 0: as long as its turn), and is erased with its turn."""
    kept = {k: report[k] for k in ("turn_id", "rerun_id", "at", "candidate_spec", "changed", "differences",
                                   "checks", "usage")}
    kept["candidate"] = {k: report["candidate"].get(k) for k in ("workflow", "version", "model")}
    key = keys.turn_reruns(report["turn_id"])
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(key, report["rerun_id"], json.dumps(kept, separators=(",", ":"), default=str))
        if ttl_s > 0:
            pipe.expire(key, ttl_s)
        await pipe.execute()
