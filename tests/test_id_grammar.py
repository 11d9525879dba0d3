"""The id grammar at every edge, with generated inputs.

Ids (turn, conversation, customer, agent) are 1–128 ASCII letters, digits and ``. _ : @ -``,
starting with a letter or digit: the whole string, so ``"C-100\\n"`` (Python's ``$`` matches
before a final newline) is refused like any other control character. Generated bad ids —
control characters anywhere, Unicode look-alikes, lengths 0 and 129+, leading symbols — must
be refused by the Python API (``TurnValidationError`` naming the field), the HTTP API (422
naming the field) and the CLI (one line, exit 2), with nothing written to Redis. Hypothesis
runs derandomized: the same examples every run, so CI cannot flake on a lucky draw.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import string
import uuid

import httpx
import pytest
import structlog
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.provisional import domains
from redis import Redis as SyncRedis

from turnfleet.producer import Producer, TurnValidationError
from tests.processes import tf
from tests.serve_process import turnfleet_serve
from turnfleet.shell import cli
from turnfleet.auth import hash_key, new_key
from turnfleet.models import ID_PATTERN, check_id, check_pseudonymous_id

ALLOWED = set(string.ascii_letters + string.digits + "._:@-")
ID_FIELDS = ["turn_id", "conversation_id", "customer_id", "agent"]
CLI_FLAGS = {"turn_id": "--turn-id", "conversation_id": "--conversation", "customer_id": "--customer",
             "agent": "--agent"}
LOOKALIKES = [
    "\u0421",  # Cyrillic Es, looks like C
    "\u0410", "\u041e", "\u0435",  # Cyrillic A, O, e
    "\uff11", "\uff10", "\u0661",  # fullwidth 1, 0; Arabic-Indic 1
    "\u00a0", "\u2007", "\u3000",  # no-break, figure and ideographic spaces
    "\u200d", "\u200b", "\ufeff", "\u2060",  # zero-width joiner, space, BOM, word joiner
    "\u2010", "\u2011", "\uff0d", "\u2212",  # hyphens and minus that look like -
    "\u0131", "\u212a",  # dotless i; Kelvin sign (folds to k)
]
SYMBOLS = list(" {}/\\#%?&\"'<>$+=,;*|~`!^()[]")
GRAMMAR = settings(derandomize=True, database=None, deadline=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

valid_ids = st.from_regex(ID_PATTERN, fullmatch=True)
bad_chars = st.one_of(
    st.characters(codec=None, categories=["Cc"]),  # \x00-\x1f, \x7f-\x9f: \n, \r, \t, NUL, ...
    st.sampled_from(LOOKALIKES),
    st.sampled_from(SYMBOLS),
    st.characters(min_codepoint=0x80, exclude_categories=["Cs"]),  # anything non-ASCII
)


@st.composite
def _with_bad_char(draw: st.DrawFn) -> str:
    base = draw(st.text(alphabet="".join(sorted(ALLOWED)), min_size=1, max_size=30).map(lambda s: "C" + s))
    char = draw(bad_chars)
    where = draw(st.sampled_from(["start", "middle", "end"]))
    if where == "start":
        return char + base
    if where == "end":
        return base + char
    i = draw(st.integers(1, len(base)))
    return base[:i] + char + base[i:]


bad_ids = st.one_of(
    _with_bad_char(),
    st.just(""),
    st.integers(129, 300).map(lambda n: "a" * n),  # too long
    st.tuples(st.sampled_from("._:@-"), valid_ids).map("".join),  # a leading symbol
)
BAD_EXAMPLES = ["C-100\n", "t-1\n", "C-100\r", "C-100\r\n", "\nC-100", "C-100\t", "C-\x00100",
                "\u0421-100", "C-\uff11\uff10\uff10", "C-100\u00a0", "C\u200d-100", "", "a" * 129,
                "-C-100", ".x", "C 100", "C{100}"]


def _reference(value: str) -> bool:
    """The grammar as prose, without a regex: what ``check_id`` must agree with."""
    return (1 <= len(value) <= 128 and all(c in ALLOWED for c in value)
            and value[0] in string.ascii_letters + string.digits)


def _explicit(*values: str):  # type: ignore[no-untyped-def]
    def add(test):  # type: ignore[no-untyped-def]
        for value in reversed(values):
            test = example(value)(test)
        return test
    return add


@settings(GRAMMAR, max_examples=400)
@given(st.one_of(valid_ids, bad_ids, st.text(max_size=140)))
@_explicit(*BAD_EXAMPLES, "a", "a" * 128, "C-100", "x.y:z@w_v-1")
def test_check_id_accepts_exactly_the_documented_grammar(value: str) -> None:
    try:
        check_id(value)
        accepted = True
    except ValueError as exc:
        accepted = False
        assert str(exc) and "\n" not in str(exc)  # one printable line, whatever the input
    assert accepted == _reference(value), repr(value)


# -- the Python API --------------------------------------------------------------------


def _turn(field: str, value: str) -> dict[str, str]:
    return {"conversation_id": "c-1", "customer_id": "C-100", "text": "hello", field: value}


@settings(GRAMMAR, max_examples=60)
@given(field=st.sampled_from(ID_FIELDS), value=bad_ids)
@example(field="customer_id", value="C-100\n")
@example(field="turn_id", value="t-1\n")
def test_python_api_refuses_bad_ids_naming_the_field(redis_url: str, field: str, value: str) -> None:
    _refused_by_python_api(redis_url, field, value)


def _refused_by_python_api(redis_url: str, field: str, value: str) -> TurnValidationError:
    """The Python API's error for a turn with ``field=value``, naming only that field, after
    checking that nothing was written."""
    async def enqueue() -> TurnValidationError:
        async with Producer(redis_url) as producer:
            with pytest.raises(TurnValidationError) as info:
                await producer.enqueue_turn(**_turn(field, value))
            return info.value

    error = asyncio.run(enqueue())
    assert [e["field"] for e in error.errors] == [field]
    with SyncRedis.from_url(redis_url) as r:
        assert r.dbsize() == 0
    return error


async def test_python_api_newline_customer_is_not_a_second_customer(redis):
    async with Producer(redis=redis) as producer:
        await producer.enqueue_turn(conversation_id="c-1", customer_id="C-100", text="hi", turn_id="t-1")
        before = sorted(await redis.keys("*"))
        for field, value in (("customer_id", "C-100\n"), ("turn_id", "t-1\n"), ("conversation_id", "c-1\n")):
            with pytest.raises(TurnValidationError) as info:
                await producer.enqueue_turn(**{**_turn(field, value), "conversation_id": "c-2"}
                                            if field != "conversation_id" else _turn(field, value))
            assert info.value.errors[0]["field"] == field
        assert sorted(await redis.keys("*")) == before


# -- HTTP --------------------------------------------------------------------------------

OPERATOR = new_key()


@pytest.fixture
def serve_url(fleet_env, tmp_path):  # type: ignore[no-untyped-def]
    keys = [{"name": "ops", "sha256": hash_key(OPERATOR), "customers": ["*"]}]
    with turnfleet_serve(fleet_env, tmp_path / "serve.log", keys) as (url, proc):
        yield url, proc
    assert "Traceback" not in proc.output()


HEADERS = {"Authorization": f"Bearer {OPERATOR}"}


@settings(GRAMMAR, max_examples=25)
@given(items=st.lists(st.tuples(st.sampled_from(ID_FIELDS), bad_ids), min_size=1, max_size=20))
def test_http_refuses_bad_ids_naming_the_field(serve_url, redis_url: str, items) -> None:  # type: ignore[no-untyped-def]
    url, _ = serve_url
    with httpx.Client(base_url=url, headers=HEADERS, timeout=30) as client:
        turns = [_turn(field, value) for field, value in items]
        resp = client.post("/v1/turns:batch", json={"turns": turns})
        assert resp.status_code == 200, resp.text
        for (field, _value), result in zip(items, resp.json()["results"], strict=True):
            assert result["status"] == 422 and result["error"] == "validation", result
            assert [e["field"] for e in result["errors"]] == [field]
        field, value = items[0]
        one = client.post("/v1/turns", json=_turn(field, value))
        assert one.status_code == 422, one.text
        assert [e["field"] for e in one.json()["errors"]] == [field]
        assert "location" not in one.headers
    with SyncRedis.from_url(redis_url) as r:
        assert r.dbsize() == 0


def test_http_newline_ids_never_make_a_location_header_or_a_second_customer(serve_url, redis_url):  # type: ignore[no-untyped-def]
    url, proc = serve_url
    with httpx.Client(base_url=url, headers=HEADERS, timeout=30) as client:
        ok = client.post("/v1/turns", json={**_turn("turn_id", "t-1")})
        assert ok.status_code == 202 and ok.headers["location"] == "/v1/turns/t-1"
        with SyncRedis.from_url(redis_url, decode_responses=True) as r:
            before = sorted(r.keys("*"))
        # Before the fix: "t-1\n" was enqueued and its Location header dropped the connection;
        # "C-100\n" became a second customer with its own spend and budget.
        for field, value in (("turn_id", "t-2\n"), ("customer_id", "C-100\n")):
            resp = client.post("/v1/turns", json={**_turn(field, value), "conversation_id": "c-9"})
            assert resp.status_code == 422, resp.text
            assert resp.json()["errors"][0]["field"] == field
            assert "location" not in resp.headers
        with SyncRedis.from_url(redis_url, decode_responses=True) as r:
            assert sorted(r.keys("*")) == before
    assert "Traceback" not in proc.output()


# -- the CLI -----------------------------------------------------------------------------


def _cli(argv: list[str]) -> tuple[int, str, str]:
    """``turnfleet ARGV`` in this process; the logging it configures is put back afterwards,
    so later tests do not log through a filter or into this call's captured stderr."""
    out, err = io.StringIO(), io.StringIO()
    structlog_config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
    finally:
        structlog.configure(**structlog_config)
        root.handlers[:], root.level = handlers, level
    return code, out.getvalue(), err.getvalue()


@settings(GRAMMAR, max_examples=60)
@given(field=st.sampled_from(ID_FIELDS), value=bad_ids.filter(lambda v: not v.startswith("-")))
@example(field="customer_id", value="C-100\n")
@example(field="turn_id", value="t-1\n")
def test_cli_refuses_bad_ids_in_one_line(redis_url: str, monkeypatch, field: str, value: str) -> None:  # type: ignore[no-untyped-def]
    """In-process for many generated cases (argparse to exit code); the subprocess test below
    proves the same for the real command."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    _refused_by_cli(redis_url, field, value)


def _refused_by_cli(redis_url: str, field: str, value: str) -> str:
    """``turnfleet enqueue`` with ``field=value``: exit 2, one line naming the field, nothing
    written; the line."""
    args = {"conversation_id": "c-1", "customer_id": "C-100", field: value}
    argv = ["enqueue", *(a for f, v in args.items() for a in (CLI_FLAGS[f], v)), "hello"]
    code, out, err = _cli(argv)
    assert code == 2, (code, err)
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and field in err, err
    with SyncRedis.from_url(redis_url) as r:
        assert r.dbsize() == 0
    return err


@pytest.mark.parametrize("field,value", [("customer_id", "C-100\n"), ("turn_id", "t-1\n"),
                                         ("conversation_id", "c-1\r"), ("agent", "\u0421-desk"),
                                         ("customer_id", "C-\uff11\uff10\uff10")])
async def test_cli_subprocess_refuses_newline_and_lookalike_ids(fleet_env, redis, field, value):
    args = {"conversation_id": "c-1", "customer_id": "C-100", field: value}
    argv = ["enqueue", *(a for f, v in args.items() for a in (CLI_FLAGS[f], v)), "hello"]
    proc = tf(*argv, env=fleet_env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and field in proc.stderr
    assert await redis.dbsize() == 0


@pytest.mark.parametrize("args,flag", [
    (["--name", "svc", "--customer", "C-100\n"], "--customer"),
    (["--name", "svc", "--customer", "\u0421-100"], "--customer"),
    (["--name", "svc\nx", "--operator"], "--name"),
    (["--name", "svc\x1b[31m", "--operator"], "--name"),
])
def test_apikey_new_refuses_newline_and_lookalike_customers_and_names(args, flag):
    code, out, err = _cli(["apikey", "new", *args])
    assert code == 2 and out == ""
    assert err.startswith(f"turnfleet apikey: {flag}: ") and len(err.strip().splitlines()) == 1, err


# -- ids are pseudonymous: what the redactor would redact is refused at the edge -------------
#
# An id names Redis keys, alerts, /metrics labels and log lines, where it is never redacted:
# an e-mail address, a phone number, a card, an SSN, an IBAN or a secret as an id would leak.

PERSONAL_IDS = [  # (id, what the message says it looks like)
    ("jane@example.com", "an e-mail address"),
    ("jane.doe_shop@mail.example.co.uk", "an e-mail address"),
    ("07700900123", "a phone number"),  # UK mobile, trunk 0
    ("09876543210", "a phone number"),  # IN mobile, trunk 0
    ("015123456789", "a phone number"),  # DE mobile, trunk 0
    ("4111111111111111", "a card number"),
    ("5555-5555-5555-4444", "a card number"),
    ("123-45-6789", "a US social security number"),
    ("GB82WEST12345698765432", "a bank account (IBAN)"),
    ("token:abc123", "a secret"),
    ("AKIA" + "IOSFODNN7EXAMPLE", "a secret"),
]

pseudonymous_ids = st.one_of(
    st.from_regex(r"C-[0-9]{1,12}", fullmatch=True),
    st.from_regex(r"[1-9][0-9]{0,9}", fullmatch=True),  # numeric customer numbers, up to 10 digits
    st.from_regex(r"0[0-9]{0,9}", fullmatch=True),  # zero-led up to 10 digits: not a phone alone
    st.from_regex(r"t_[0-9a-f]{32}", fullmatch=True),
    st.uuids().map(str),
    st.uuids().map(lambda u: f"conv-{u}"),
    st.from_regex(r"demo-[0-9a-f]{6}-(refund|order|escalate)", fullmatch=True),
    st.from_regex(r"(order|RF|ESC)-[0-9A-F]{4,10}", fullmatch=True),
    st.from_regex(r"[a-z]{2,8}@[a-z]{2,8}", fullmatch=True),  # an "@" without a domain is no e-mail
    st.from_regex(r"4111111111111112|[1-9][0-9]{2}-[0-9]{3}-[0-9]{3}", fullmatch=True),  # Luhn fails; not 3-2-4
)


@st.composite
def _email_ids(draw: st.DrawFn) -> str:
    local = draw(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True))
    domain = draw(domains(max_length=60))
    return f"{local}@{domain}"


@settings(GRAMMAR, max_examples=300)
@given(pseudonymous_ids)
@_explicit("C-100", "C-102", "1234567890", "447946095800", "10470001", "1042", "c-1", "t-1",
           "support-desk", "demo-a1b2c3-refund", "x.y:z@w_v-1", "0612345678")
def test_pseudonymous_ids_pass(value: str) -> None:
    assert check_pseudonymous_id(value) == value


@settings(GRAMMAR, max_examples=200)
@given(_email_ids().filter(lambda v: ID_PATTERN.fullmatch(v) is not None))
def test_generated_email_ids_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="looks like an e-mail address; ids must be pseudonymous"):
        check_pseudonymous_id(value)


@pytest.mark.parametrize(("value", "what"), PERSONAL_IDS)
def test_personal_data_ids_are_refused_saying_what_they_look_like(value: str, what: str) -> None:
    with pytest.raises(ValueError) as info:
        check_pseudonymous_id(value)
    message = str(info.value)
    assert message.startswith(f"looks like {what}") and "pseudonymous" in message
    assert value not in message  # the message never repeats the personal data
    assert check_id(value) == value  # the grammar alone allows it: reads of stored ids still work


def test_a_stored_request_with_a_personal_id_still_decodes() -> None:
    """Turns recorded before the rule are read back (answered, replayed, erased), not failed."""
    from turnfleet.queue import decode_request

    raw = ('{"turn_id":"t-old","conversation_id":"c-old","customer_id":"jane@example.com",'
           '"text":"hi","metadata":{},"agent":"support-desk","trace":true,'
           '"enqueued_at":"2026-11-01T00:00:00Z"}')
    assert decode_request(raw).customer_id == "jane@example.com"


@pytest.mark.parametrize("field", ID_FIELDS)
@pytest.mark.parametrize(("value", "what"), PERSONAL_IDS[:1] + PERSONAL_IDS[2:3] + PERSONAL_IDS[5:6])
def test_python_api_refuses_personal_data_ids_naming_the_field(redis_url: str, field: str, value: str,
                                                               what: str) -> None:
    error = _refused_by_python_api(redis_url, field, value)
    assert error.errors[0]["message"].startswith(f"looks like {what}; ids must be pseudonymous")


@settings(GRAMMAR, max_examples=40)
@given(field=st.sampled_from(["turn_id", "conversation_id", "customer_id"]), value=pseudonymous_ids)
def test_python_api_accepts_generated_pseudonymous_ids(redis_url: str, field: str, value: str) -> None:
    async def enqueue() -> str:
        async with Producer(redis_url) as producer:
            turn = _turn(field, value)
            if field != "turn_id":
                turn["turn_id"] = f"t-{uuid.uuid4().hex}"
            if field != "conversation_id":
                turn["conversation_id"] = f"c-{uuid.uuid4().hex}"
            return await producer.enqueue_turn(**turn)

    assert asyncio.run(enqueue())


def test_http_refuses_personal_data_ids_with_422_naming_the_field(serve_url, redis_url) -> None:  # type: ignore[no-untyped-def]
    url, proc = serve_url
    with httpx.Client(base_url=url, headers=HEADERS, timeout=30) as client:
        for field, (value, what) in zip(["customer_id", "conversation_id", "turn_id"],
                                        [PERSONAL_IDS[0], PERSONAL_IDS[2], PERSONAL_IDS[7]]):
            resp = client.post("/v1/turns", json=_turn(field, value))
            assert resp.status_code == 422, resp.text
            [error] = resp.json()["errors"]
            assert error["field"] == field
            assert error["message"].startswith(f"looks like {what}")
            assert value not in resp.text
        turns = [_turn("customer_id", value) for value, _ in PERSONAL_IDS]
        batch = client.post("/v1/turns:batch", json={"turns": turns})
        assert batch.status_code == 200, batch.text
        assert [(r["status"], r["errors"][0]["field"]) for r in batch.json()["results"]] == (
            [(422, "customer_id")] * len(PERSONAL_IDS))
    with SyncRedis.from_url(redis_url) as r:
        assert r.dbsize() == 0
    assert "jane@example.com" not in proc.output()


@pytest.mark.parametrize(("field", "value"), [("customer_id", "jane@example.com"),
                                              ("conversation_id", "07700900123"),
                                              ("turn_id", "4111111111111111")])
def test_cli_refuses_personal_data_ids_in_one_line(redis_url: str, monkeypatch, field: str, value: str) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("REDIS_URL", redis_url)
    err = _refused_by_cli(redis_url, field, value)
    assert "ids must be pseudonymous" in err and value not in err


@pytest.mark.parametrize(("args", "flag"), [
    (["--name", "svc", "--customer", "jane@example.com"], "--customer"),
    (["--name", "svc", "--customer", "C-100", "--customer", "07700900123"], "--customer"),
    (["--name", "dana@example.com", "--operator"], "--name"),
])
def test_apikey_new_refuses_personal_data_customers_and_names(args, flag):  # type: ignore[no-untyped-def]
    code, out, err = _cli(["apikey", "new", *args])
    assert code == 2 and out == ""
    assert err.startswith(f"turnfleet apikey: {flag}: looks like ") and "pseudonymous" in err, err


def test_apikey_new_accepts_pseudonymous_customers():
    code, out, err = _cli(["apikey", "new", "--name", "svc", "--customer", "C-100", "--customer",
                           "1234567890", "--json"])
    assert code == 0, err
    assert json.loads(out)["entry"]["customers"] == ["C-100", "1234567890"]


def test_a_keys_file_naming_a_personal_data_customer_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from turnfleet.auth import KeysFileError, KeyStore
    from turnfleet.settings import ApiKey, ProducerSettings

    path = tmp_path / "keys.json"
    path.write_text(json.dumps([{"name": "svc", "sha256": hash_key(OPERATOR),
                                 "customers": ["C-100", "jane@example.com"]}]))
    with pytest.raises(KeysFileError) as info:
        KeyStore(ProducerSettings(api_keys_file=path))
    assert "customer 2: looks like an e-mail address" in str(info.value)
    assert "jane@example.com" not in str(info.value)
    assert ApiKey(name="ops", sha256="0" * 64, customers=["*", "C-100"]).customers == ["*", "C-100"]
