"""Property-based run of the HTTP API against its own OpenAPI spec (schemathesis).

Every operation the app publishes at ``/openapi.json`` is exercised, including routes other
components add (nothing here names them), with valid and invalid inputs, over real HTTP
(uvicorn on a free port, in a thread: schemathesis calls are synchronous) against a real
Redis. The property: no input makes the server answer 5xx.

The write operations also get hostile versions of valid bodies (a custom strategy over
schemathesis' own cases): lone surrogates, control characters and look-alikes in strings,
and deep nesting where a string belongs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok

from turnfleet.auth import hash_key, new_key
from turnfleet.shell.embedded import free_port
from turnfleet.shell.server import create_app
from turnfleet.settings import ApiKey, ProducerSettings

OPERATOR_KEY = new_key()
HEADERS = {"Authorization": f"Bearer {OPERATOR_KEY}"}
# Answers start within milliseconds (a 500 takes longer: its traceback is rendered to the
# log). An event stream (one that follows alerts, say) never ends by itself: schemathesis
# keeps what it sent within the read timeout, so once an operation has answered with a
# stream, its later cases get a short one.
READ_TIMEOUT_S = 3.0
STREAM_READ_S = 0.5
# 503 is a deliberate answer here (a readiness probe with no live worker says "not ready");
# a crash is the app's 500, and any other 5xx fails the run.
CONFIG = schemathesis.Config.from_dict(
    {"checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]}}}
)


class _Server(uvicorn.Server):
    """uvicorn with a readiness event another thread can wait on."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        try:
            await super().startup(sockets)
        finally:
            self.ready.set()


@contextlib.contextmanager
def serving_in_thread(app) -> Iterator[str]:  # type: ignore[no-untyped-def]
    port = free_port()
    server = _Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    assert server.ready.wait(30) and server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture
def api_schema(redis_url: str) -> Iterator[schemathesis.BaseSchema]:
    app_settings = ProducerSettings(
        api_keys=[ApiKey(name="schema-test", sha256=hash_key(OPERATOR_KEY), customers=["*"])],
        max_wait_s=0.2,  # a generated ?wait= on a queued turn must not stall the run
        max_batch=20,
    )
    with serving_in_thread(create_app(app_settings, redis_url)) as base_url:
        yield schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=CONFIG)


def _exercise(operation: schemathesis.APIOperation, mode: GenerationMode, streaming: set[str]):  # type: ignore[no-untyped-def]
    """A bounded Hypothesis test of one operation: its cases must not get a 5xx."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.generate, Phase.shrink], database=None,
              derandomize=True)  # the same examples every run: CI cannot flake on a lucky draw
    def exercise(case: schemathesis.Case) -> None:
        timeout = STREAM_READ_S if operation.label in streaming else READ_TIMEOUT_S
        response = case.call_and_validate(headers=HEADERS, checks=[not_a_server_error], timeout=timeout)
        if any("text/event-stream" in v for v in response.headers.get("content-type", [])):
            streaming.add(operation.label)

    return exercise


def _describe(exc: BaseException) -> str:
    """The failure and, for Hypothesis' wrappers (flaky, multiple), what they wrap."""
    if isinstance(exc, BaseExceptionGroup) and not isinstance(exc, FailureGroup):
        return "\n".join([str(exc), *(_describe(e) for e in exc.exceptions)])
    return str(exc)


# Each operation gets its own bounded Hypothesis run. (``schemathesis.pytest.from_fixture``
# would do the same per operation, but its lazy loader reads ``Item._nodeid``, which pytest 9
# no longer has; the loop below is what it runs, with the same strategies and checks.)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_no_operation_answers_with_a_server_error(api_schema: schemathesis.BaseSchema, mode: GenerationMode) -> None:
    operations = []
    for result in api_schema.get_all_operations():
        assert isinstance(result, Ok), f"the app's OpenAPI spec is invalid: {result.err()}"
        operations.append(result.ok())

    failures: list[str] = []
    exercised: set[str] = set()
    streaming: set[str] = set()
    for operation in operations:
        try:
            _exercise(operation, mode, streaming)()
        except Unsatisfiable:  # negative mode: nothing in this operation can be made invalid
            assert mode is GenerationMode.NEGATIVE, operation.label
            continue
        except (Exception, FailureGroup) as exc:  # collect every operation's failures, report them all
            failures.append(f"{operation.label}: {_describe(exc)}")
        exercised.add(operation.label)
    assert not failures, "\n\n".join(failures)
    assert {"POST /v1/turns", "POST /v1/turns:batch", "GET /v1/turns/{turn_id}"} <= exercised, exercised


# -- hostile bodies ------------------------------------------------------------------------


def _nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


HOSTILE_VALUES = st.one_of(
    st.sampled_from(["\ud800", "refund \udcff", "\udfff\ud800", "C-100\n", "t-1\r\n", "\u0421-100",
                     "C-\uff11\uff10\uff10", "C\u200d-100", "\x00", ""]),
    st.integers(100, 600).map(_nested),  # deep, but still serialisable by the client
)
WRITES = ("POST /v1/turns", "POST /v1/turns:batch")


@st.composite
def _hostile_case(draw: st.DrawFn, operation: schemathesis.APIOperation) -> schemathesis.Case:
    """A valid case of ``operation`` with one field of one turn replaced by a hostile value."""
    case = draw(operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
    body = case.body
    if operation.label.endswith(":batch"):
        if not body["turns"]:
            body["turns"].append({"conversation_id": "c-1", "customer_id": "C-100", "text": "hi"})
        target = body["turns"][draw(st.integers(0, len(body["turns"]) - 1))]
    else:
        target = body
    field = draw(st.sampled_from(["conversation_id", "customer_id", "text", "turn_id", "agent", "trace",
                                  "metadata", "metadata-key", "unknown-field"]))
    value = draw(HOSTILE_VALUES)
    if field == "metadata":
        target["metadata"] = {"channel": value}
    elif field == "metadata-key":
        target["metadata"] = {value if isinstance(value, str) and value else "\ud800": "x"}
    elif field == "unknown-field":
        target[value if isinstance(value, str) and value else "\ud800"] = "x"
    else:
        target[field] = value
    return case


@pytest.mark.parametrize("label", WRITES)
def test_hostile_bodies_are_answered_4xx_never_5xx(api_schema: schemathesis.BaseSchema, label: str) -> None:
    operation = next(r.ok() for r in api_schema.get_all_operations() if r.ok().label == label)

    @given(case=_hostile_case(operation))
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.generate], database=None, derandomize=True)
    def exercise(case: schemathesis.Case) -> None:
        response = case.call_and_validate(headers=HEADERS, checks=[not_a_server_error], timeout=READ_TIMEOUT_S)
        assert response.status_code in (200, 202, 403, 409, 422, 429), response.text
        assert "Traceback" not in response.text
        if response.status_code == 200 and label.endswith(":batch"):  # each item judged on its own
            assert {r["status"] for r in response.json()["results"]} <= {200, 202, 403, 409, 422, 429}

    exercise()
