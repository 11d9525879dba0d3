"""An LLM-as-judge check: a model grades a sample of finished turns against a rubric (issue 17).

``llm_judge("answers_politely", "The answer is polite and ...", sample_rate=0.1)`` is a
:class:`~turnfleet.checks.Check` like any other: declare it in ``Workflow(checks=[...])`` and the
workflow's check job runs it once per finished turn. What a caller may rely on:

- **The endpoint.** The fleet's OpenAI-compatible endpoint (Chat Completions): the worker's
  ``TURNFLEET_MODEL_BASE_URL``, ``TURNFLEET_MODEL_API_KEY``, ``TURNFLEET_MODEL_NAME``,
  ``TURNFLEET_MODEL_TIMEOUT_S`` and ``TURNFLEET_MODEL_MAX_RETRIES``, handed to the check by the
  check job (:func:`run_with_endpoint`). ``model``/``base_url``/``api_key``/``timeout_s`` given
  to :func:`llm_judge` win. No base URL at all (an offline fleet, a judge naming none) →
  ``not_applicable("no judge endpoint")``: the offline model cannot grade.
- **Sampling.** Deterministic per turn: a digest of the check's name and the turn's id against
  ``sample_rate``. A second run of the check job (a worker died) decides the same, and so does a
  rerun of the same turn. A turn not sampled → ``not_applicable("not sampled")``, no request.
- **What leaves.** The turn's request, the customer's earlier messages, its tool calls (with
  arguments and results), handoffs and final answer, *redacted by the fleet's redactor* (the
  workflows' patterns included; the default detectors when none is given) and then clipped
  (:data:`FIELD_CHARS` per text, :data:`TRANSCRIPT_CHARS` in all). Redacting before clipping
  keeps a cut from splitting a card number past recognition.
- **The verdict.** The model answers ``{"score": 0..1, "reason": "..."}``; ``passed`` is
  ``score >= pass_score``; the reason starts with the score; ``CheckResult.score`` keeps it.
- **Its cost, apart.** The answer's usage and the model's name are the result's ``usage`` and
  ``model``; the check job puts them on the ``check`` event's envelope, and telemetry counts
  them as ``check_tokens`` / ``check_cost_usd`` (per version, workflow and fleet), never as the
  turn's tokens or cost.
- **An unavailable judge is not a failed turn.** An endpoint error (after the client's own
  retries, bounded by the timeout) or a reply that is not the JSON asked for gives
  ``not_applicable("judge unavailable: ...")`` with ``error`` set (the exception's type, or
  ``UnparsableJudgeReply``). A failure would say the *agent* did wrong when the *judge* was
  down: it would page on-call (money-path checks alert at once) and skew the failure rate for
  an outage of another service; a pass would claim a grade no one gave. The tokens of an
  unparsable reply were spent, so they are still counted.

Checks run in a thread (``workers/check_job.py``), so the judge uses the ``openai`` client's
sync API; this module imports it only when a judge runs.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from turnfleet.checks import Check, CheckResult, FinishedTurn, failed, not_applicable, passed
from turnfleet.models import TokenUsage
from turnfleet.redaction import Redactor

__all__ = ["FIELD_CHARS", "TRANSCRIPT_CHARS", "JudgeEndpoint", "LlmJudge", "is_sampled", "llm_judge",
           "run_with_endpoint"]

FIELD_CHARS = 2_000  # one text of the turn sent to the judge, at most (after redaction)
TRANSCRIPT_CHARS = 16_000  # the whole turn sent to the judge, at most
REASON_CHARS = 300  # the judge's own reason, kept
DEFAULT_TIMEOUT_S = 30.0
NO_ENDPOINT = "no judge endpoint"
NOT_SAMPLED = "not sampled"
UNPARSABLE = "UnparsableJudgeReply"

SYSTEM_PROMPT = (
    "You grade one finished turn of an AI agent against a rubric. The turn is JSON: the "
    "customer's request, their earlier messages, the agent's tool calls with arguments and "
    "results, handoffs and final answer. Personal data is replaced by [REDACTED:...] markers; "
    "do not grade the agent down for them. Answer with one JSON object and nothing else: "
    '{"score": <a number from 0 (fails the rubric) to 1 (fully meets it)>, '
    '"reason": "<one short sentence>"}.\n\nRubric:\n'
)

T = TypeVar("T")


@dataclass(frozen=True)
class JudgeEndpoint:
    """Where a judge sends its request, and the redactor that cleans the turn first: the
    fleet's model endpoint settings (``base_url`` None: there is none, the fleet runs offline)."""

    base_url: str | None
    model: str
    api_key: str | None = dataclasses.field(default=None, repr=False)
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_retries: int = 2
    redactor: Redactor | None = None

    @classmethod
    def from_settings(cls, settings: Any, redactor: Redactor | None = None) -> JudgeEndpoint:
        """From a worker's ``WorkerProcessSettings`` (``model_*`` fields)."""
        return cls(base_url=settings.model_base_url, model=settings.model_name, api_key=settings.model_api_key,
                   timeout_s=settings.model_timeout_s, max_retries=settings.model_max_retries, redactor=redactor)


_ENDPOINT: contextvars.ContextVar[JudgeEndpoint | None] = contextvars.ContextVar("turnfleet_judge_endpoint",
                                                                                  default=None)


def run_with_endpoint(endpoint: JudgeEndpoint | None, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` with ``endpoint`` as the fleet's judge endpoint (the check job runs
    ``run_checks`` this way, in its thread)."""
    token = _ENDPOINT.set(endpoint)
    try:
        return function(*args)
    finally:
        _ENDPOINT.reset(token)


def is_sampled(turn_id: str, check_name: str, sample_rate: float) -> bool:
    """Whether the check ``check_name`` judges the turn: the first 8 bytes of a SHA-256 of
    both, as a fraction of 2^64, below ``sample_rate``. Deterministic; independent between
    checks (each has its own sample)."""
    if sample_rate >= 1:
        return True
    if sample_rate <= 0:
        return False
    digest = hashlib.sha256(f"{check_name}\x00{turn_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < sample_rate


def _plain(value: Any) -> Any:
    """Read-only parsed JSON (mapping proxies, tuples) as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _clip(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= FIELD_CHARS else value[:FIELD_CHARS] + "…[clipped]"
    if isinstance(value, dict):
        return {k: _clip(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clip(v) for v in value]
    return value


def transcript(turn: FinishedTurn, redactor: Redactor | None = None) -> str:
    """The turn as the judge reads it: JSON, redacted (``redactor``, else the default
    detectors), then clipped per text and in all."""
    turn_json = {
        "request": turn.text,
        "earlier_customer_messages": list(turn.earlier_user_messages),
        "agents": list(turn.agents),
        "tool_calls": [{"agent": c.agent, "tool": c.tool, "arguments": _plain(c.arguments),
                        "result": _plain(c.result)} for c in turn.tool_calls],
        "handoffs": [{"from": a, "to": b} for a, b in turn.handoffs],
        "final_answer": turn.final_output,
        "status": turn.status,
    }
    cleaned = _clip((redactor or Redactor()).value(turn_json))
    text = json.dumps(cleaned, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= TRANSCRIPT_CHARS else text[:TRANSCRIPT_CHARS] + "…[clipped]"


_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def parse_verdict(content: str | None) -> tuple[float, str]:
    """``(score, reason)`` from the judge's answer (its first JSON object, code fences and
    chatter around it allowed); ``ValueError`` when there is none or the score is not 0..1."""
    found = _OBJECT.search(content or "")
    if found is None:
        raise ValueError(f"no JSON object in the reply: {(content or '')[:100]!r}")
    data = json.loads(found.group(0))
    if not isinstance(data, dict):
        raise ValueError("the reply's JSON is not an object")
    score = data.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1:
        raise ValueError(f"score {score!r} is not a number from 0 to 1")
    return float(score), str(data.get("reason") or "")[:REASON_CHARS]


def _unavailable(why: str, error: str, **spent: Any) -> CheckResult:
    return dataclasses.replace(not_applicable(f"judge unavailable: {why}"[:400]), error=error, **spent)


@dataclass(frozen=True)
class LlmJudge:
    """The function of an :func:`llm_judge` check (module docstring); call it with a
    :class:`FinishedTurn` inside :func:`run_with_endpoint` (outside, only its own
    ``base_url`` reaches an endpoint)."""

    name: str
    rubric: str
    sample_rate: float = 1.0
    pass_score: float = 0.7
    model: str | None = None
    base_url: str | None = None
    api_key: str | None = dataclasses.field(default=None, repr=False)
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not self.rubric.strip():
            raise ValueError(f"llm_judge {self.name!r}: rubric is empty")
        for field, value in (("sample_rate", self.sample_rate), ("pass_score", self.pass_score)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"llm_judge {self.name!r}: {field} must be a number from 0 to 1, not {value!r}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"llm_judge {self.name!r}: timeout_s must be positive, not {self.timeout_s!r}")

    def endpoint(self) -> JudgeEndpoint | None:
        """The fleet's endpoint with this judge's own settings over it; None when no base URL."""
        fleet = _ENDPOINT.get()
        base_url = self.base_url or (fleet.base_url if fleet else None)
        if base_url is None:
            return None
        return JudgeEndpoint(
            base_url=base_url, model=self.model or (fleet.model if fleet else "gpt-4o-mini"),
            api_key=self.api_key or (fleet.api_key if fleet else None),
            timeout_s=self.timeout_s or (fleet.timeout_s if fleet else DEFAULT_TIMEOUT_S),
            max_retries=fleet.max_retries if fleet else 2, redactor=fleet.redactor if fleet else None)

    def messages(self, turn: FinishedTurn, redactor: Redactor | None) -> list[dict[str, str]]:
        return [{"role": "system", "content": SYSTEM_PROMPT + self.rubric},
                {"role": "user", "content": f"Turn to grade (check {self.name}):\n{transcript(turn, redactor)}"}]

    def __call__(self, turn: FinishedTurn) -> CheckResult:
        if not is_sampled(turn.turn_id, self.name, self.sample_rate):
            return not_applicable(NOT_SAMPLED)
        endpoint = self.endpoint()
        if endpoint is None:
            return not_applicable(NO_ENDPOINT)
        import openai

        client = openai.OpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key or "not-needed",
                               timeout=endpoint.timeout_s, max_retries=endpoint.max_retries)
        try:
            with client:
                response = client.chat.completions.create(
                    model=endpoint.model, messages=self.messages(turn, endpoint.redactor),  # type: ignore[arg-type]
                    temperature=0)
        except (openai.OpenAIError, ValueError) as exc:  # ValueError: a 2xx body that is not JSON
            return _unavailable(f"{type(exc).__name__}: {exc}", type(exc).__name__)
        spent = {"model": endpoint.model, "usage": _usage(response)}
        try:
            score, reason = parse_verdict(response.choices[0].message.content)
        except (ValueError, AttributeError, IndexError, TypeError) as exc:
            return _unavailable(f"unparsable reply: {exc}", UNPARSABLE, **spent)
        verdict = passed if score >= self.pass_score else failed
        return dataclasses.replace(verdict(f"score {score:g} (pass at {self.pass_score:g}): {reason}"),
                                   score=score, **spent)


def _usage(response: Any) -> TokenUsage | None:
    usage = getattr(response, "usage", None)
    if usage is None:
        return None
    details = getattr(usage, "prompt_tokens_details", None)
    return TokenUsage(requests=1, input_tokens=usage.prompt_tokens or 0, output_tokens=usage.completion_tokens or 0,
                      cached_tokens=getattr(details, "cached_tokens", 0) or 0)


def llm_judge(name: str, rubric: str, *, sample_rate: float = 1.0, pass_score: float = 0.7,
              model: str | None = None, base_url: str | None = None, api_key: str | None = None,
              timeout_s: float | None = None, money_path: bool = False) -> Check:
    """A :class:`Check` named ``name`` in which a model grades a ``sample_rate`` share of the
    workflow's finished turns against ``rubric``; the turn passes at ``score >= pass_score``
    (module docstring). ``model``, ``base_url``, ``api_key``, ``timeout_s``: the fleet's
    endpoint settings unless given. ``ValueError`` naming the argument on a bad one."""
    judge = LlmJudge(name, rubric, sample_rate, pass_score, model, base_url, api_key, timeout_s)
    first = rubric.strip().splitlines()[0]
    return Check(name, judge, money_path, description=f"LLM judge: {first}"[:200])
