"""Alert rules over the aggregates, each firing once per (rule, subject, window).

The consumer calls :meth:`AlertRules.evaluate` after an entry's aggregate is stored and
before it acknowledges it, with the subjects the entry touched. Rules read the aggregates
(not the events), so a redelivered entry re-evaluates the same figures; firing is one Lua
script (``SET alert-fired NX`` then, only if set, ``XADD`` to the alert stream), so an alert
is written exactly once however often its condition is seen to hold and however many
consumers see it.

Rules (names are the ``Alert.rule`` values):

- ``conversation_cost``: a conversation's known cost > ``alert_conversation_cost_usd``
  (subject the conversation, window ``lifetime``);
- ``customer_daily_cost``: a customer's known cost on one UTC day >
  ``alert_customer_daily_cost_usd`` (subject the customer, window the date ``YYYY-MM-DD``);
- ``turn_failed``: a turn failed terminally, if ``alert_turn_failed`` (subject the turn,
  window ``once``);
- ``customer_budget``: a customer's known cost on one UTC day crossed 80% (warning) and
  100% (critical) of its daily budget (``TURNFLEET_BUDGETS`` / ``..._DEFAULT_DAILY_BUDGET_USD``;
  subject the customer, window ``YYYY-MM-DD:80%`` / ``:100%``);
- ``error_rate``: failed / finished turns in a fixed window of ``alert_error_rate_window_s``
  ≥ ``alert_error_rate``, with at least ``alert_error_rate_min_turns`` finished (subject
  ``fleet``, window the window start as ISO 8601 UTC);
- ``feedback_negative_rate``: negative feedback given in an error-rate window / turns finished
  in it ≥ ``alert_feedback_negative_rate``, with at least ``alert_feedback_negative_min_count``
  negative (subject ``fleet``, window as ``error_rate``'s). Feedback counted once
  (``turnfleet.telemetry.aggregate``), so a re-sent one moves neither figure;
- ``check_failed``: a money-path check failed on a turn: at once, one alert per turn and check
  (subject the turn, window ``once:<check>``); the message names the check, the turn, its
  conversation and workflow, never the check's reason (the replay shows it);
- ``check_failure_rate``: one check of one workflow failed in an error-rate window / judged
  in it (passed + failed; not applicable and expired inputs are neither) ≥
  ``alert_check_failure_rate``, with at least ``alert_check_failure_min_count`` failures
  (subject ``<workflow>/<check>``, window as ``error_rate``'s). Check results are counted once,
  so a second run of the check job moves no figure.

Calls of unknown cost are not counted as zero: the cost rules compare the known part and
say in the figures how many calls were unpriced.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import structlog
from redis.asyncio import Redis

from turnfleet.telemetry.aggregate import (
    CHECK_FAILED_FIELD,
    CHECK_FAILS,
    CHECK_RUNS,
    DAY_TTL_S,
    GLOBAL_SUBJECT,
    MIN_WINDOW_TTL_S,
    FailedCheck,
    FailedTurn,
    Touched,
)
from turnfleet.telemetry.pricing import nusd_to_usd
from turnfleet import budget, keys
from turnfleet.models import Alert
from turnfleet.scripts import load_script
from turnfleet.settings import TelemetrySettings

log = structlog.get_logger(__name__)

RULE_CONVERSATION_COST = "conversation_cost"
RULE_CUSTOMER_DAILY_COST = "customer_daily_cost"
RULE_TURN_FAILED = "turn_failed"
RULE_ERROR_RATE = "error_rate"
RULE_CUSTOMER_BUDGET = "customer_budget"
RULE_FEEDBACK_NEGATIVE_RATE = "feedback_negative_rate"
RULE_CHECK_FAILED = "check_failed"
RULE_CHECK_FAILURE_RATE = "check_failure_rate"
RULES = (RULE_CONVERSATION_COST, RULE_CUSTOMER_DAILY_COST, RULE_TURN_FAILED, RULE_ERROR_RATE,
         RULE_CUSTOMER_BUDGET, RULE_FEEDBACK_NEGATIVE_RATE, RULE_CHECK_FAILED, RULE_CHECK_FAILURE_RATE)
BUDGET_LEVELS = (0.8, 1.0)  # alert when a customer's day spend crosses these shares of its budget

ALERTS_MAXLEN = 100_000  # approximate length the alert stream is trimmed to
MESSAGE_ERROR_CHARS = 300

# SET the fired marker NX and, only if set, XADD and count the alert (lua/fire_alert.lua).
FIRE = load_script("fire_alert", "turnfleet.telemetry")


def alert_id(rule: str, subject: str, window: str) -> str:
    """Deterministic: the one alert a (rule, subject, window) can ever produce."""
    digest = hashlib.sha1(f"{rule}\0{subject}\0{window}".encode()).hexdigest()
    return f"al_{digest[:20]}"


def window_label(start_s: int) -> str:
    return datetime.fromtimestamp(start_s, timezone.utc).isoformat()


def _int(value: str | None) -> int:
    return int(value) if value else 0


def _finished(v: dict[str, str | None]) -> int:
    """Turns that ended in a window's figures (completed or failed)."""
    return _int(v["turns_failed"]) + _int(v["turns_completed"])


def _clip(text: str, limit: int = MESSAGE_ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class _Check:
    """One rule on one subject and window: what to read, and the alert if it holds."""

    rule: str
    subject: str
    window: str
    source: str  # the aggregate hash the rule reads
    fields: Sequence[str]
    ttl_s: int | None
    decide: Callable[[dict[str, str | None]], Alert | None]

    @property
    def fired_key(self) -> str:
        return keys.alert_fired(self.rule, self.subject, self.window)


class AlertRules:
    """The rules of one ``TelemetrySettings``, evaluated against stored aggregates."""

    def __init__(self, redis: Redis, settings: TelemetrySettings) -> None:
        self.redis = redis
        self.settings = settings
        self._fire = FIRE.bind(redis)

    async def evaluate(self, touched: Touched) -> list[tuple[str, Alert]]:
        """Fire every rule that holds for a touched subject and has not fired yet.

        Two round trips whatever the number of subjects: read the figures and the fired
        markers, then fire the new ones. Returns what was written now.
        """
        checks = self._checks(touched)
        if not checks:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for check in checks:
                pipe.exists(check.fired_key)
                pipe.hmget(check.source, list(check.fields))
            replies = await pipe.execute()
        alerts: list[tuple[_Check, Alert]] = []
        for i, check in enumerate(checks):
            if replies[2 * i]:
                continue  # already fired for this window
            alert = check.decide(dict(zip(check.fields, replies[2 * i + 1])))
            if alert is not None:
                alerts.append((check, alert))
        fired: list[tuple[str, Alert]] = []
        for (check, alert), entry_id in zip(alerts, await self._fire_many(alerts)):
            if entry_id is not None:
                fired.append((entry_id, alert))
                log.warning("alert.fired", rule=alert.rule, subject=alert.subject,
                            window=alert.window, entry_id=entry_id, text=alert.message,
                            figures=alert.figures)
        return fired

    async def _fire_many(self, alerts: Sequence[tuple[_Check, Alert]]) -> list[str | None]:
        """Stream ids of the alerts written; ``None`` where another consumer fired it first."""
        if not alerts:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for check, alert in alerts:
                await self._fire(
                    keys={"fired": check.fired_key, "stream": keys.ALERTS_STREAM,
                          "counts": keys.ALERTS_COUNT},
                    args={"alert_id": alert.alert_id, "alert": alert.model_dump_json(),
                          "ttl_s": check.ttl_s or 0, "maxlen": ALERTS_MAXLEN, "rule": alert.rule},
                    client=pipe,
                )
            return list(await pipe.execute())

    # -- the rules -----------------------------------------------------------------------

    def _checks(self, touched: Touched) -> list[_Check]:
        s = self.settings
        # A conversation whose cost the batch script read back (touched.conversation_costs) is
        # read again only if that is over the threshold: costs only grow, and whoever adds to
        # one evaluates it after its own write.
        known, threshold = touched.conversation_costs, s.alert_conversation_cost_usd
        checks = [self._conversation_cost(cid, cust) for cid, cust in touched.conversations.items()
                  if cid not in known or nusd_to_usd(known[cid]) > threshold]
        checks += [self._customer_daily_cost(cust, day) for cust, day in sorted(touched.customer_days)]
        checks += [
            self._customer_budget(cust, day, limit, level)
            for cust, day in sorted(touched.customer_days)
            if (limit := budget.limit_for(s, cust)) is not None
            for level in BUDGET_LEVELS
        ]
        if s.alert_turn_failed:
            checks += [self._turn_failed(t) for t in touched.failed_turns.values()]
        checks += [self._error_rate(start, t) for start, t in sorted(touched.windows.items())]
        checks += [self._feedback_negative_rate(start) for start in sorted(touched.windows)]
        checks += [self._check_failed(f) for _, f in sorted(touched.failed_checks.items())]
        checks += [self._check_failure_rate(start, subject) for start, subject in sorted(touched.check_windows)]
        return checks

    def _conversation_cost(self, cid: str, customer: str) -> _Check:
        return self._cost_over(
            RULE_CONVERSATION_COST, "conversation", cid, "lifetime",
            keys.aggregate("conversation", cid), self.settings.alert_conversation_cost_usd,
            f"Conversation {cid} cost", "threshold", None, {},
            conversation_id=cid, customer_id=customer,
        )

    def _customer_daily_cost(self, customer: str, day: str) -> _Check:
        return self._cost_over(
            RULE_CUSTOMER_DAILY_COST, "customer", customer, day,
            keys.aggregate_day("customer", customer, day),
            self.settings.alert_customer_daily_cost_usd,
            f"Customer {customer} cost", f"daily threshold ({day}, UTC)", DAY_TTL_S, {"day": day},
            customer_id=customer,
        )

    def _cost_over(self, rule: str, subject_kind: str, subject: str, window: str, source: str,
                   threshold: float, what: str, threshold_name: str, ttl_s: int | None,
                   figures: dict[str, float | int | str], **pointers: str) -> _Check:
        """A known cost above a threshold; unpriced calls are named, not taken as free."""

        def decide(v: dict[str, str | None]) -> Alert | None:
            cost, unknown = nusd_to_usd(_int(v["cost_nusd"])), _int(v["cost_unknown_calls"])
            if not cost > threshold:
                return None
            return self._alert(
                rule, subject_kind, subject, window,
                f"{what} ${cost:.4f} > ${threshold:.4f} {threshold_name}"
                + (f" ({unknown} calls of unknown cost not included)" if unknown else ""),
                {"cost_usd": cost, "threshold_usd": threshold, "llm_calls": _int(v["llm_calls"]),
                 "cost_unknown_calls": unknown, **figures},
                **pointers,
            )

        return _Check(rule, subject, window, source, ("cost_nusd", "cost_unknown_calls", "llm_calls"),
                      ttl_s, decide)

    def _customer_budget(self, customer: str, day: str, limit: float, level: float) -> _Check:
        """A customer's spend today crossed ``level`` of its daily budget (80% warns, 100%
        is critical: the producer now refuses its turns until the budget resets)."""
        share = round(level * 100)
        window = f"{day}:{share}%"

        def decide(v: dict[str, str | None]) -> Alert | None:
            spent = nusd_to_usd(_int(v["cost_nusd"]))
            if spent < limit * level:
                return None
            return self._alert(
                RULE_CUSTOMER_BUDGET, "customer", customer, window,
                f"Customer {customer} has spent ${spent:.4f} of its ${limit:.2f} daily budget "
                f"({spent / limit:.0%}, {day} UTC)"
                + (": new turns are refused until midnight UTC" if level >= 1.0 else ""),
                {"spent_usd": spent, "budget_usd": limit, "share": round(spent / limit, 4),
                 "level": level, "day": day},
                severity="critical" if level >= 1.0 else "warning",
                customer_id=customer,
            )

        return _Check(RULE_CUSTOMER_BUDGET, customer, window,
                      keys.aggregate_day("customer", customer, day), ("cost_nusd",), DAY_TTL_S, decide)

    def _turn_failed(self, turn: FailedTurn) -> _Check:
        def decide(v: dict[str, str | None]) -> Alert | None:
            if v["status"] != "failed":
                return None
            attempts = _int(v["attempts"])
            error_type = v["error_type"] or "unknown"
            error_message = _clip(v["error_message"] or "")
            figures: dict[str, float | int | str] = {
                "attempts": attempts, "error_type": error_type, "error_message": error_message,
            }
            if v["duration_ms"]:
                figures["duration_ms"] = float(v["duration_ms"])
            return self._alert(
                RULE_TURN_FAILED, "turn", turn.turn_id, "once",
                f"Turn {turn.turn_id} of conversation {turn.conversation_id} failed after "
                f"{attempts} attempt(s): {error_type}: {error_message}",
                figures,
                conversation_id=turn.conversation_id, customer_id=turn.customer_id,
                turn_id=turn.turn_id,
            )

        return _Check(RULE_TURN_FAILED, turn.turn_id, "once", keys.aggregate("turn", turn.turn_id),
                      ("status", "attempts", "error_type", "error_message", "duration_ms"), None,
                      decide)

    def _error_rate(self, start: int, failure: FailedTurn | None) -> _Check:
        s = self.settings
        label = window_label(start)

        def decide(v: dict[str, str | None]) -> Alert | None:
            failed, finished = _int(v["turns_failed"]), _finished(v)
            if finished < s.alert_error_rate_min_turns or finished == 0:
                return None
            rate = failed / finished
            if rate < s.alert_error_rate:
                return None
            return self._alert(
                RULE_ERROR_RATE, "fleet", GLOBAL_SUBJECT, label,
                f"Error rate {rate:.1%} ({failed} of {finished} turns failed) in the "
                f"{s.alert_error_rate_window_s} s window from {label} ≥ {s.alert_error_rate:.1%} threshold",
                {"error_rate": rate, "threshold": s.alert_error_rate, "turns": finished,
                 "failed": failed, "window_s": s.alert_error_rate_window_s,
                 "min_turns": s.alert_error_rate_min_turns},
                severity="critical",
                conversation_id=failure.conversation_id if failure else None,
                customer_id=failure.customer_id if failure else None,
                turn_id=failure.turn_id if failure else None,
            )

        return self._window_check(RULE_ERROR_RATE, start, (), decide)

    def _feedback_negative_rate(self, start: int) -> _Check:
        s = self.settings
        label = window_label(start)

        def decide(v: dict[str, str | None]) -> Alert | None:
            negative, finished = _int(v["feedback_negative"]), _finished(v)
            if negative < s.alert_feedback_negative_min_count or negative == 0 or finished == 0:
                return None
            rate = negative / finished
            if rate < s.alert_feedback_negative_rate:
                return None
            return self._alert(
                RULE_FEEDBACK_NEGATIVE_RATE, "fleet", GLOBAL_SUBJECT, label,
                f"Negative feedback rate {rate:.1%} ({negative} negative for {finished} turns) in the "
                f"{s.alert_error_rate_window_s} s window from {label} ≥ "
                f"{s.alert_feedback_negative_rate:.1%} threshold",
                {"feedback_negative_rate": rate, "threshold": s.alert_feedback_negative_rate,
                 "turns": finished, "feedback_negative": negative,
                 "feedback_positive": _int(v["feedback_positive"]),
                 "window_s": s.alert_error_rate_window_s,
                 "min_count": s.alert_feedback_negative_min_count},
            )

        return self._window_check(RULE_FEEDBACK_NEGATIVE_RATE, start, ("feedback_negative", "feedback_positive"),
                                  decide)

    def _check_failed(self, failure: FailedCheck) -> _Check:
        """A money-path check failed on a turn: alerted at once, once per turn and check."""
        window, marked = f"once:{failure.check}", CHECK_FAILED_FIELD + failure.check

        def decide(v: dict[str, str | None]) -> Alert | None:
            if _int(v[marked]) <= 0:
                return None
            return self._alert(
                RULE_CHECK_FAILED, "turn", failure.turn_id, window,
                f"Money-path check {failure.check} failed on turn {failure.turn_id} of conversation "
                f"{failure.conversation_id} (workflow {failure.workflow}); see turnfleet turn {failure.turn_id}",
                {"check": failure.check, "workflow": failure.workflow},
                severity="critical",
                conversation_id=failure.conversation_id, customer_id=failure.customer_id,
                turn_id=failure.turn_id,
            )

        return _Check(RULE_CHECK_FAILED, failure.turn_id, window, keys.aggregate("turn", failure.turn_id),
                      (marked,), None, decide)

    def _check_failure_rate(self, start: int, subject: str) -> _Check:
        """One check of one workflow failing too often in an error-rate window."""
        s = self.settings
        label = window_label(start)
        runs, fails = CHECK_RUNS + subject, CHECK_FAILS + subject
        workflow, check = keys.split_version_subject(subject)

        def decide(v: dict[str, str | None]) -> Alert | None:
            failed, judged = _int(v[fails]), _int(v[runs])
            if failed < s.alert_check_failure_min_count or failed == 0 or judged == 0:
                return None
            rate = failed / judged
            if rate < s.alert_check_failure_rate:
                return None
            return self._alert(
                RULE_CHECK_FAILURE_RATE, "fleet", subject, label,
                f"Check {check} of workflow {workflow} failed {rate:.1%} ({failed} of {judged} judged) "
                f"in the {s.alert_error_rate_window_s} s window from {label} ≥ "
                f"{s.alert_check_failure_rate:.1%} threshold",
                {"check": check, "workflow": workflow, "failure_rate": rate,
                 "threshold": s.alert_check_failure_rate, "failed": failed, "judged": judged,
                 "window_s": s.alert_error_rate_window_s, "min_count": s.alert_check_failure_min_count},
            )

        return _Check(RULE_CHECK_FAILURE_RATE, subject, label, keys.aggregate_window(start), (runs, fails),
                      max(MIN_WINDOW_TTL_S, 2 * s.alert_error_rate_window_s), decide)

    def _window_check(self, rule: str, start: int, fields: tuple[str, ...],
                      decide: Callable[[dict[str, str | None]], Alert | None]) -> _Check:
        """A fleet rule over the error-rate window from ``start``: it reads the window's finished
        turns and ``fields``, once per window."""
        return _Check(rule, GLOBAL_SUBJECT, window_label(start), keys.aggregate_window(start),
                      ("turns_completed", "turns_failed", *fields),
                      max(MIN_WINDOW_TTL_S, 2 * self.settings.alert_error_rate_window_s), decide)

    @staticmethod
    def _alert(rule: str, subject_kind: str, subject: str, window: str, message: str,
               figures: dict[str, float | int | str], severity: str = "warning",
               **pointers: str | None) -> Alert:
        return Alert(
            alert_id=alert_id(rule, subject, window), rule=rule, severity=severity,  # type: ignore[arg-type]
            subject_kind=subject_kind, subject=subject, window=window,  # type: ignore[arg-type]
            message=message, figures=figures, **pointers,
        )
