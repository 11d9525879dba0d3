"""Issue 14 end to end: the new redaction shapes and an extra detector in a real worker.

A turn carrying a mixed-separator card, an SSN, an IBAN, national phone numbers and an
employee id (caught only by an extra detector from ``TURNFLEET_REDACT_DETECTORS``, defined in
``tests/redact_detectors.py``) runs in a real worker and telemetry process; none of those
values reaches a telemetry key, the trace record, an alert or a log line, and each kind's
marker is in the trace.
"""

from __future__ import annotations

from turnfleet.producer import Producer
from turnfleet.telemetry.alert_reads import read_alerts
from tests.processes import run_burst
from tests.test_observability import dump_telemetry_keys
from turnfleet import keys

PERSONAL = {
    "card": "4111 1111-1111 1111",
    "ssn": "078-05-1120",
    "iban": "GB82 WEST 1234 5698 7654 32",
    "phone": "020 7946 0958",
    "mobile": "06.12.34.56.78",
    "employee": "EMP-123456",
}


async def test_new_shapes_and_an_extra_detector_reach_no_telemetry_trace_alert_or_log(
    redis, fleet_env, tmp_path
):
    env = {**fleet_env, "TURNFLEET_LOG_LEVEL": "DEBUG",
           "TURNFLEET_ALERT_CONVERSATION_COST_USD": "0.000001",
           "TURNFLEET_REDACT_DETECTORS": '["tests.redact_detectors:employee_ids"]'}
    text = (f"I want to talk to a human. I am {PERSONAL['employee']}; card {PERSONAL['card']}, "
            f"SSN {PERSONAL['ssn']}, refund to {PERSONAL['iban']}, call {PERSONAL['phone']} "
            f"or {PERSONAL['mobile']}.")
    async with Producer(redis=redis) as producer:
        turn = await producer.enqueue_turn(conversation_id="conv-pii-14", customer_id="C-100",
                                           text=text)
        worker = run_burst("worker", env, tmp_path)
        result = await producer.result(turn)
    assert result.status == "completed"
    assert PERSONAL["iban"] in result.tool_calls[0].arguments  # business data keeps the words
    before_telemetry = await dump_telemetry_keys(redis)
    telemetry = run_burst("telemetry", env, tmp_path)
    dumped = await dump_telemetry_keys(redis)
    assert keys.trace(turn) in dumped and await read_alerts(redis)
    everything = "\n".join([*before_telemetry.values(), *dumped.values(), worker.output(),
                            telemetry.output()])
    for kind, value in PERSONAL.items():
        assert value not in everything, kind
    for kind in ("card", "ssn", "iban", "phone", "employee"):
        assert f"[REDACTED:{kind}]" in dumped[keys.trace(turn)], kind
