"""Checks: a workflow's judgements over its finished turns (online evaluation).

A check is a plain function over :class:`FinishedTurn`, a read-only view of one finished turn
built from what the fleet keeps anyway — the turn's record (``TurnResult``: request text, tool
calls in the order they finished with their arguments and results, handoffs, agents, final
answer, status, workflow, version, customer) and the conversation's memory before the turn
(the customer's earlier messages and the earlier turns' tool calls). It never needs the
sampled trace, so checks can run for every turn whatever the trace sample rate.

A check returns :class:`CheckResult` (or ``True``/``False``, or ``(bool, reason)``, normalised).
Checks judge, they do not act: they never delay or fail the turn, and a check that raises is a
*failed* check whose reason is the exception (the runner never crashes). A check that does not
apply to a turn (no refund in it) returns :func:`not_applicable`: it counts as passed and
says so (``applicable=False``), so a pass rate is not inflated silently and ``find
--check-failed`` never lists it.

``money_path=True`` marks checks guarding money (refunds): the next step alerts on each of
their failures at once. :func:`run_checks` is the pure runner (timing each check in µs);
running it once per finished turn is the fleet's job (docs/ARCHITECTURE.md, "Checks").

This module never imports the Agents SDK: memory items are read as the plain JSON the SDK
stores (``role``/``content`` messages, ``function_call``/``function_call_output`` items).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from turnfleet.models import TokenUsage, TurnResult, check_id

NOT_APPLICABLE = "not applicable"
# The result ``turnfleet rerun`` gives a candidate's call of a side-effecting tool the original
# never made (workers/rerun.py): the tool did not run, but the call is the candidate's decision,
# and checks judge decisions (``ToolCallView.not_made``).
SIDE_EFFECT_NOT_MADE = "side_effect_not_made"


@dataclass(frozen=True)
class CheckResult:
    """What a check decided: ``passed`` and why. ``applicable=False``: the check had nothing
    to judge in this turn (it passes, and says so).

    A check that calls a model (an LLM judge, ``turnfleet/judge.py``) also says which
    (``model``), what it spent (``usage``: counted apart from the turn's own tokens and cost)
    and, graded, its ``score``; ``error`` names what kept it from judging (its reason says more)."""

    passed: bool
    reason: str = ""
    applicable: bool = True
    model: str | None = None
    usage: TokenUsage | None = None
    score: float | None = None
    error: str | None = None


def passed(reason: str = "") -> CheckResult:
    return CheckResult(True, reason)


def failed(reason: str) -> CheckResult:
    return CheckResult(False, reason)


def not_applicable(reason: str = "") -> CheckResult:
    """The check had nothing to judge: a pass marked ``applicable=False``."""
    return CheckResult(True, f"{NOT_APPLICABLE}: {reason}" if reason else NOT_APPLICABLE, applicable=False)


def _freeze(value: Any) -> Any:
    """Parsed JSON made read-only: objects as mappings proxies, arrays as tuples."""
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _parse(text: str | None) -> Any:
    """JSON text as read-only values; text that is not JSON stays the text (None stays None)."""
    if text is None:
        return None
    try:
        return _freeze(json.loads(text))
    except (ValueError, RecursionError):
        return text


@dataclass(frozen=True)
class ToolCallView:
    """One tool call: ``arguments`` parsed (an empty mapping when not a JSON object) and
    ``result`` parsed where JSON (else the text; ``None`` when it never answered)."""

    tool: str
    arguments: Mapping[str, Any]
    result: Any
    agent: str | None = None
    call_id: str | None = None

    @property
    def result_object(self) -> Mapping[str, Any]:
        """The result when it is a JSON object, else an empty mapping (for ``.get``)."""
        return self.result if isinstance(self.result, Mapping) else MappingProxyType({})

    @property
    def not_made(self) -> bool:
        """A side effect a rerun's candidate asked for and the rerun did not make: judge its
        ``arguments`` as what the call would have done."""
        return self.result_object.get(SIDE_EFFECT_NOT_MADE) is True

    @classmethod
    def parsed(cls, tool: str, arguments: str | None, result: str | None, **where: Any) -> ToolCallView:
        args = _parse(arguments or "")
        return cls(tool=tool, arguments=args if isinstance(args, Mapping) else MappingProxyType({}),
                   result=_parse(result), **where)


@dataclass(frozen=True)
class FinishedTurn:
    """A finished turn as checks see it (module docstring). ``earlier_*`` come from the
    conversation's memory before this turn; ``tool_calls`` are this turn's, in order."""

    turn_id: str
    conversation_id: str
    customer_id: str
    status: str
    text: str
    final_output: str | None = None
    tool_calls: tuple[ToolCallView, ...] = ()
    handoffs: tuple[tuple[str, str], ...] = ()
    agents: tuple[str, ...] = ()
    workflow: str | None = None
    version: str | None = None
    earlier_user_messages: tuple[str, ...] = ()
    earlier_tool_calls: tuple[ToolCallView, ...] = ()

    @classmethod
    def from_result(cls, result: TurnResult, earlier_items: Iterable[Mapping[str, Any]] = ()) -> FinishedTurn:
        """From the turn's record and its conversation's memory items before the turn
        (``memory[0:memory_base]``, the plain JSON items the SDK stores)."""
        items = list(earlier_items)
        return cls(
            turn_id=result.turn_id, conversation_id=result.conversation_id,
            customer_id=result.customer_id, status=result.status, text=result.text,
            final_output=result.final_output,
            tool_calls=tuple(ToolCallView.parsed(c.tool, c.arguments, c.output, agent=c.agent,
                                                 call_id=c.call_id) for c in result.tool_calls),
            handoffs=tuple((h.from_agent, h.to_agent) for h in result.handoffs),
            agents=tuple(result.agents), workflow=result.workflow, version=result.version,
            earlier_user_messages=tuple(user_messages(items)),
            earlier_tool_calls=tuple(memory_tool_calls(items)),
        )

    @property
    def user_messages(self) -> tuple[str, ...]:
        """Everything the customer said in the conversation, this turn's text last."""
        return (*self.earlier_user_messages, self.text)

    def calls(self, tool: str) -> list[ToolCallView]:
        """This turn's calls of ``tool``, in order."""
        return [c for c in self.tool_calls if c.tool == tool]


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("text"))
    return ""


def user_messages(items: Iterable[Mapping[str, Any]]) -> list[str]:
    """The user messages among memory items, in order (corrupt-item markers have no role)."""
    return [_text_of(i.get("content")) for i in items if isinstance(i, Mapping) and i.get("role") == "user"]


def memory_tool_calls(items: Iterable[Mapping[str, Any]]) -> list[ToolCallView]:
    """Tool calls among memory items (``function_call`` matched to its ``function_call_output``
    by ``call_id``), in the order they were called. Handoffs are function calls there too
    (``transfer_to_<agent>`` by the SDK's default), so they are listed; checks pick tools by name."""
    items = [i for i in items if isinstance(i, Mapping)]
    outputs = {i.get("call_id"): i.get("output") for i in items if i.get("type") == "function_call_output"}
    return [
        ToolCallView.parsed(str(i.get("name")), i.get("arguments"),
                            out if isinstance(out := outputs.get(i.get("call_id")), str | None) else json.dumps(out),
                            call_id=i.get("call_id"))
        for i in items if i.get("type") == "function_call"
    ]


CheckFunction = Callable[[FinishedTurn], Any]


@dataclass(frozen=True)
class Check:
    """A named check. ``money_path``: it guards money (alerted at once on failure).

    ``blocking`` (default True) says the check may wait (I/O, a model call, a lock, a sleep) or
    run long: the check job runs such a turn's checks in a thread, so the worker's event loop
    never waits for them. ``blocking=False`` promises cheap pure Python over the
    :class:`FinishedTurn` (the Support Desk's checks: tens of µs): a turn whose checks all
    promise it runs them on the loop, without a thread hop (``workers/check_job.py``). A check
    that breaks the promise delays the worker's turns while it runs: leave it True when unsure."""

    name: str
    function: CheckFunction
    money_path: bool = False
    description: str = ""
    blocking: bool = True

    def __post_init__(self) -> None:
        try:
            check_id(self.name)
        except ValueError as exc:
            raise ValueError(f"Check name: {exc}") from None
        if not callable(self.function):
            raise ValueError(f"Check {self.name!r}: function is a {type(self.function).__name__}, not callable")
        if not self.description:
            doc = (getattr(self.function, "__doc__", None) or "").strip()
            object.__setattr__(self, "description", doc.splitlines()[0] if doc else "")

    def __call__(self, turn: FinishedTurn) -> CheckResult:
        """The check's normalised result (raises what the function raises; the runner catches)."""
        return _normalise(self.function(turn))


def check(name: str | CheckFunction | None = None, *, money_path: bool = False,
          description: str = "", blocking: bool = True) -> Any:
    """``@check("refund_matches", money_path=True)`` (or bare ``@check``): the function as a
    :class:`Check` named ``name`` (default: the function's name); ``blocking`` as
    :class:`Check`'s."""
    if callable(name):
        return Check(name.__name__, name, money_path, description, blocking)

    def wrap(function: CheckFunction) -> Check:
        return Check(name or function.__name__, function, money_path, description, blocking)

    return wrap


def as_checks(values: Iterable[Any], where: str = "checks") -> tuple[Check, ...]:
    """Checks, or plain functions (named by ``__name__``), as a tuple of :class:`Check`;
    ValueError on anything else and on a name used twice."""
    found: list[Check] = []
    for value in values:
        if isinstance(value, Check):
            found.append(value)
        elif callable(value) and hasattr(value, "__name__"):
            found.append(Check(value.__name__, value))
        else:
            raise ValueError(f"{where}: {type(value).__name__} is not a turnfleet Check or a function")
    names = [c.name for c in found]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{where}: check names used twice: {', '.join(dupes)}")
    return tuple(found)


def _normalise(value: Any) -> CheckResult:
    if isinstance(value, CheckResult):
        return value
    if isinstance(value, bool):
        return CheckResult(value)
    if (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], bool)
            and isinstance(value[1], str)):
        return CheckResult(value[0], value[1])
    return failed(f"returned {type(value).__name__}, not a CheckResult, a bool or (bool, reason)")


@dataclass(frozen=True)
class CheckOutcome:
    """One check run on one turn: its result, how long it took (µs) and, when it raised, the
    exception's type (``error``; the reason is ``Type: message``). ``model``, ``usage`` and
    ``score`` are a model-calling check's (:class:`CheckResult`); ``as_dict`` has them only
    when set, so other checks' stored outcomes keep their shape."""

    check: str
    money_path: bool
    passed: bool
    reason: str
    applicable: bool
    duration_us: float
    error: str | None = None
    model: str | None = None
    usage: TokenUsage | None = None
    score: float | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"check": self.check, "money_path": self.money_path, "passed": self.passed,
                               "reason": self.reason, "applicable": self.applicable,
                               "duration_us": round(self.duration_us, 1), "error": self.error}
        if self.model is not None:
            out["model"] = self.model
        if self.usage is not None:
            out["usage"] = self.usage.model_dump(mode="json")
        if self.score is not None:
            out["score"] = self.score
        return out


def run_checks(checks: Any, turn: FinishedTurn) -> list[CheckOutcome]:
    """Run every check of a workflow (anything with ``.checks``) or of a list on ``turn``, in
    order; an exception is that check's failure, never the runner's."""
    listed: Sequence[Any] = getattr(checks, "checks", checks)
    outcomes = []
    for one in as_checks(listed):
        began = time.perf_counter_ns()
        error = None
        try:
            result = one(turn)
        except Exception as exc:  # noqa: BLE001 - a check's bug is its own failure, not the runner's
            error = type(exc).__name__
            result = failed(f"{error}: {exc}"[:500])
        outcomes.append(CheckOutcome(
            check=one.name, money_path=one.money_path, passed=result.passed, reason=result.reason,
            applicable=result.applicable, duration_us=(time.perf_counter_ns() - began) / 1000,
            error=error or result.error, model=result.model, usage=result.usage, score=result.score,
        ))
    return outcomes


__all__ = ["SIDE_EFFECT_NOT_MADE", "Check", "CheckOutcome", "CheckResult", "FinishedTurn", "ToolCallView", "check",
           "failed", "not_applicable", "passed", "run_checks"]
