"""The audit every drill ends with.

1. Every enqueued turn has exactly one final outcome: its record is ``completed`` or
   ``failed``, and the results stream holds exactly one entry for it.
2. Telemetry totals equal the sum over finished attempts of the model's usage: the final
   attempt's usage (``TurnResult.usage``) plus each recorded failed attempt's
   (``AttemptError.usage``). An attempt lost with a killed worker left no telemetry and no
   usage record, so it is in neither side.
3. The refund ledger holds each order once, ever (whatever turn refunded it), and each entry
   matches the order's refund record (``keys.order_refund``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from turnfleet.telemetry.stats import totals
from turnfleet import keys
from turnfleet.models import TokenUsage, TurnResult
from turnfleet.queue import TurnQueue


@dataclass
class AuditReport:
    results: dict[str, TurnResult]
    expected_usage: TokenUsage
    telemetry: dict

    def statuses(self) -> Counter:
        return Counter(r.status for r in self.results.values())


async def audit(redis, turn_ids: list[str]) -> AuditReport:
    queue = TurnQueue(redis)
    results: dict[str, TurnResult] = {}
    for turn_id in turn_ids:
        result = await queue.get(turn_id)
        assert result is not None, f"turn {turn_id} is unknown"
        assert result.status in ("completed", "failed"), f"turn {turn_id} ended {result.status}"
        results[turn_id] = result

    finished = Counter()
    last = "0-0"
    while True:
        page = await redis.xrange(keys.RESULTS_STREAM, min=f"({last}" if last != "0-0" else "-", count=10_000)
        if not page:
            break
        for entry_id, fields in page:
            finished[fields["turn_id"]] += 1
            last = entry_id
    twice = {t: n for t, n in finished.items() if t in results and n != 1}
    assert not twice, f"turns with more than one outcome: {twice}"
    assert set(results) <= set(finished), "a turn ended without a results-stream entry"

    expected = TokenUsage()
    for result in results.values():
        expected = expected + result.usage
        for error in result.errors:
            if error.usage is not None and error.attempt != result.attempts:
                expected = expected + error.usage
    figures = await totals(redis)
    got = (figures["input_tokens"], figures["output_tokens"], figures["llm_calls"])
    want = (expected.input_tokens, expected.output_tokens, expected.requests)
    assert got == want, f"telemetry totals {got} != model usage {want}"

    ledger = await redis.xrange(keys.REFUND_LEDGER)
    orders = Counter(f["order_id"] for _, f in ledger)
    doubles = {o: n for o, n in orders.items() if n > 1}
    assert not doubles, f"orders refunded more than once: {doubles}"
    for _, entry in ledger:
        record = json.loads(await redis.get(keys.order_refund(entry["order_id"])) or "{}")
        assert record.get("refund_id") == entry["refund_id"], f"ledger entry without its record: {entry}"
    return AuditReport(results, expected, figures)
