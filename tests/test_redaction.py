"""Redaction of telemetry: every detector, the things it must leave alone, structures, logs."""

from __future__ import annotations

import io
import json
import random
import re
from collections import OrderedDict

import pytest
import structlog

import turnfleet.redaction as redaction
from turnfleet.redaction import Redactor
from turnfleet.settings import default_redactor
from turnfleet.settings import CommonSettings
from tests.processes import tf

R = Redactor()

# Secret-shaped samples are assembled from parts so that no scanner mistakes this file for a
# leak.
OPENAI_KEY = "sk-" + "proj-" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z" + "_-9x"
OPENAI_LEGACY = "sk-" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8s9T0u1V2w3X4"
STRIPE = [p + "_live_" + "51HqLyjWDarjtT1zdp7dc" for p in ("sk", "pk", "rk")]
STRIPE_TEST = "sk" + "_test_" + "4eC39HqLyjWDarjtT1zdp7dc"
GITHUB = [p + "_" + "16C7e42F292c6912E7710c838347Ae178B4a" for p in ("ghp", "gho", "ghs")]
GITHUB_PAT = "github_pat_" + "11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJ"
SLACK = ["xox" + k + "-" + "123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx" for k in "bp"]
AWS = "AKIA" + "IOSFODNN7EXAMPLE"
GOOGLE = "AIza" + "SyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY"
JWT = (
    "eyJ" + "hbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    + ".eyJ" + "zdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIn0"
    + ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)

# Issue 14: cards with mixed separators, US SSNs, IBANs, national phone formats.
NEW_POSITIVES: list[tuple[str, str]] = [
    ("card 4111 1111-1111 1111 on file", "card [REDACTED:card] on file"),
    ("card 4111-1111 1111-1111.", "card [REDACTED:card]."),
    ("amex 3782-822463 10005", "amex [REDACTED:card]"),
    ("ssn 123-45-6789.", "ssn [REDACTED:ssn]."),
    ("ssn 078-05-1120 and 123 45 6789", "ssn [REDACTED:ssn] and [REDACTED:ssn]"),
    ("(665-12-3456)", "([REDACTED:ssn])"),
    ("iban GB82 WEST 1234 5698 7654 32 thanks", "iban [REDACTED:iban] thanks"),
    ("iban GB82WEST12345698765432.", "iban [REDACTED:iban]."),
    ("IBAN: DE89 3704 0044 0532 0130 00", "IBAN: [REDACTED:iban]"),
    ("pay NL91ABNA0417164300 now", "pay [REDACTED:iban] now"),
    ("NO9386011117947", "[REDACTED:iban]"),
    ("FR14 2004 1010 0505 0001 3M02 606", "[REDACTED:iban]"),
    ("BE68 5390 0754 7034 PAID", "[REDACTED:iban] PAID"),
    # UK
    ("call +44 20 7946 0958", "call [REDACTED:phone]"),
    ("call 020 7946 0958 today", "call [REDACTED:phone] today"),
    ("mobile 07700 900123.", "mobile [REDACTED:phone]."),
    ("(020) 7946 0958", "[REDACTED:phone]"),
    ("0161 496 0123", "[REDACTED:phone]"),
    ("ring 07700900123", "ring [REDACTED:phone]"),
    # DE
    ("Tel. +49 30 12345678", "Tel. [REDACTED:phone]"),
    ("030 12345678", "[REDACTED:phone]"),
    ("0151 23456789", "[REDACTED:phone]"),
    ("030/12345678", "[REDACTED:phone]"),
    ("0171-1234567", "[REDACTED:phone]"),
    # FR
    ("appel +33 1 23 45 67 89", "appel [REDACTED:phone]"),
    ("01 23 45 67 89", "[REDACTED:phone]"),
    ("06.12.34.56.78", "[REDACTED:phone]"),
    ("06-12-34-56-78", "[REDACTED:phone]"),
    # IN
    ("+91 98765 43210", "[REDACTED:phone]"),
    ("098765 43210", "[REDACTED:phone]"),
    ("09876543210", "[REDACTED:phone]"),
    ("+919876543210", "[REDACTED:phone]"),
    # a bare 10–12 digit number in a phone context
    ("call me on 9876543210", "call me on [REDACTED:phone]"),
    ("my mobile number is 9876543210", "my mobile number is [REDACTED:phone]"),
    ("Phone: 4155552671", "Phone: [REDACTED:phone]"),
    ("whatsapp 919876543210", "whatsapp [REDACTED:phone]"),
    ("tel 0612345678", "tel [REDACTED:phone]"),
]

# Near-misses of the new shapes: must stay exactly as written.
NEW_NEGATIVES = [
    "4111 1111-1111 1112",  # Luhn fails, mixed separators
    "4111-1111 1111-1112",
    "GB82 WEST 1234 5698 7654 33",  # IBAN, bad check digits
    "GB82WEST12345698765433",
    "GB82WEST1234569876543",  # one character short for GB
    "XX82WEST12345698765432",  # no such country
    "ABCD1234EFGH5678IJKL",
    "000-12-3456 666-12-3456 900-12-3456 999-99-9999",  # areas never issued
    "123-00-4567 123-45-0000",  # group 00, serial 0000
    "123-45-678 1234-56-7890 123-456-789",  # wrong lengths
    "123-45 6789",  # mixed separators
    "9876543210",  # bare 10 digits: an id or cents without a phone word
    "order 9876543210 and invoice 0612345678",
    "hotel 9876543210, excellent 9876543210",
    "030 1234 and 01 23 45 67",  # too short
    "0151 2345678901234",  # too long
    "00 44 20 7946 0958 0012345678901",  # a leading 00 is a padded id
    "05.06.2026 10:30, 01/02/2026, 0.24.0, 0:00:01.234",
    "order 1042, order 10470001, refund RF-0A1B2C3D4E, ticket ESC-9F8E7D6C",
    "$229.00 and 1,234.56 USD on 2026-11-29 at 2026-11-29T21:54:17.450529Z",
    "turn t_0123456789abcdef0123456789abcdef, t_01234567890123456789012345678901",
    "[REDACTED:phone] 9876543210",  # a marker is not a phone context
    "at 2026-11-29T22:08:05.527000-05:30, 2026-11-29 07:30:05.123456+01:00",  # seconds, offsets
]

POSITIVES: list[tuple[str, str]] = [
    # cards (Luhn-valid test numbers of each network)
    ("card 4111111111111111 on file", "card [REDACTED:card] on file"),
    ("card 4111 1111 1111 1111 on file", "card [REDACTED:card] on file"),
    ("card 4111-1111-1111-1111.", "card [REDACTED:card]."),
    ('{"card": "5555555555554444"}', '{"card": "[REDACTED:card]"}'),
    ("mc 5555 5555 5555 4444", "mc [REDACTED:card]"),
    ("amex 378282246310005", "amex [REDACTED:card]"),
    ("amex 3782 822463 10005", "amex [REDACTED:card]"),
    ("discover 6011111111111117", "discover [REDACTED:card]"),
    ("discover 6011 0009 9013 9424", "discover [REDACTED:card]"),
    ("diners 30569309025904", "diners [REDACTED:card]"),
    ("jcb 3530111333300000", "jcb [REDACTED:card]"),
    ("visa13 4222222222222", "visa13 [REDACTED:card]"),
    ("19 digits 4111 1111 1111 1111 003", "19 digits [REDACTED:card]"),
    ("card 4111 1111 1111 1111 123 items", "card [REDACTED:card] 123 items"),
    ("(4111111111111111)", "([REDACTED:card])"),
    # emails
    ("mail jane.doe@example.com now", "mail [REDACTED:email] now"),
    ("<bob+tag@mail.example.co.uk>.", "<[REDACTED:email]>."),
    ("x_y-z.9@sub-domain.example.io", "[REDACTED:email]"),
    ("mail 0@a.xn--90ais.", "mail [REDACTED:email]."),  # an IDN top-level domain
    ("customer C-100 (dana.w@example.org) wrote", "customer C-100 ([REDACTED:email]) wrote"),
    # phones
    ("call +14155552671", "call [REDACTED:phone]"),
    ("call +44 20 7946 0958 today", "call [REDACTED:phone] today"),
    ("call +44 (0)20 7946 0958", "call [REDACTED:phone]"),
    ("call (415) 555-2671.", "call [REDACTED:phone]."),
    ("call 415-555-2671", "call [REDACTED:phone]"),
    ("call 415.555.2671", "call [REDACTED:phone]"),
    ("call 415 555 2671", "call [REDACTED:phone]"),
    ("call +1 (415) 555-2671", "call [REDACTED:phone]"),
    ("call +1 415-555-2671", "call [REDACTED:phone]"),
    ("call 1-800-555-1212", "call [REDACTED:phone]"),
    ('{"phone":"+33612345678"}', '{"phone":"[REDACTED:phone]"}'),
    *NEW_POSITIVES,
    # provider keys
    (f"key {OPENAI_KEY} set", "key [REDACTED:secret] set"),
    (f"OPENAI_API_KEY {OPENAI_LEGACY}", "OPENAI_API_KEY [REDACTED:secret]"),
    *[(f"stripe {k}", "stripe [REDACTED:secret]") for k in STRIPE],
    (f"stripe {STRIPE_TEST}", "stripe [REDACTED:secret]"),
    *[(f"gh {k}", "gh [REDACTED:secret]") for k in GITHUB],
    (f"gh {GITHUB_PAT}", "gh [REDACTED:secret]"),
    *[(f"slack {k}", "slack [REDACTED:secret]") for k in SLACK],
    (f"aws {AWS}", "aws [REDACTED:secret]"),
    (f"google {GOOGLE}", "google [REDACTED:secret]"),
    (f"jwt {JWT}", "jwt [REDACTED:secret]"),
    # Bearer keeps the word
    ("Authorization: Bearer abc123.def456", "Authorization: Bearer [REDACTED:secret]"),
    (f"authorization: bearer {JWT}", "authorization: bearer [REDACTED:secret]"),
    (f"Bearer {OPENAI_KEY}", "Bearer [REDACTED:secret]"),
    # key=value keeps the key
    ("api_key=abc123 next", "api_key=[REDACTED:secret] next"),
    ("apikey: abc123", "apikey: [REDACTED:secret]"),
    ("x-api-key: zzz", "x-api-key: [REDACTED:secret]"),
    ("API-KEY=Q1", "API-KEY=[REDACTED:secret]"),
    ("secret=shh", "secret=[REDACTED:secret]"),
    ("client_secret=xyz&grant=1", "client_secret=[REDACTED:secret]&grant=1"),
    ("token: t0k3n", "token: [REDACTED:secret]"),
    ("?access_token=abc&x=1", "?access_token=[REDACTED:secret]&x=1"),
    ("password=hunter2", "password=[REDACTED:secret]"),
    ("passwd: hunter2", "passwd: [REDACTED:secret]"),
    ("pwd='p a s s'", "pwd='[REDACTED:secret]'"),
    ("DB_PASSWORD=x", "DB_PASSWORD=[REDACTED:secret]"),
    (
        '{"password": "hunter 2", "user": "dana"}',
        '{"password": "[REDACTED:secret]", "user": "dana"}',
    ),
    (f"api_key={OPENAI_KEY}", "api_key=[REDACTED:secret]"),
    ("{'password': 'hunter2', 'user': 'x'}", "{'password': '[REDACTED:secret]', 'user': 'x'}"),
    # URL credentials keep the user
    ("redis://:s3cret@cache.internal:6379/0", "redis://:[REDACTED:secret]@cache.internal:6379/0"),
    ("https://dana:pa55@db.example.com/x", "https://dana:[REDACTED:secret]@db.example.com/x"),
]

NEGATIVES = [
    "order 1042",
    "Your refund of 89.00 USD for order 1042 is on its way; 229.00 was charged.",
    "placed on 2025-06-15, delivered 2025-06-17",
    "at 2026-11-25T00:35:59.450529Z",
    "at 2025-06-15T12:00:00+00:00",
    "took 12.5 ms (1500ms, PT15M, 0:00:01.234)",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "uuid 12345678-1234-1234-1234-123456789012",
    "turn t_9ab8911835f24b47b141499fd6db1bda",
    "turn t_4111111111111111abcdefabcdefabcd",
    "trace trace_0123abcd0123abcd0123abcd0123abcd span span_0123abcd0123abcd",
    "trace_4111111111111111aaaaaaaaaaaaaaaa",
    "entry 1732500000000-0 and 1732500000000-12",
    "epoch ms 1795566343882, ns 1732500000000000000",
    "versions v1.2.3, 3.11.4, openai-agents 0.24.0, 2025.6.15",
    "ip 192.168.100.200",
    "refund RF-0A1B2C3D4E, ticket ESC-9F8E7D6C",
    "input_tokens=120 output_tokens=30 cached_tokens=0 reasoning_tokens=0 total_tokens=150",
    '{"max_tokens": 4096, "tokens": 12, "input_tokens": 3}',
    "Bearer authentication is required",
    "support-desk task-force risk-free, the monkey=1 and mytoken=2 and sort_key=3",
    "amount $1,234.56 and +89.00 and -12.5",
    "see https://example.com/a@b and http://host:8080/path@x and redis://localhost:6379/0",
    "4111111111111112",
    "4111 1111 1111 1112",
    "1234567890123456",
    "short +1234 5678",
    "[REDACTED:card] [REDACTED:email] [REDACTED:secret]",
    "",
    *NEW_NEGATIVES,
]


@pytest.mark.parametrize(("text", "expected"), POSITIVES)
def test_detector_replaces_secret_with_its_kind(text: str, expected: str) -> None:
    assert R.text(text) == expected


@pytest.mark.parametrize("text", NEGATIVES)
def test_harmless_text_is_left_exactly_as_it_was(text: str) -> None:
    assert R.text(text) == text


def test_luhn_invalid_sixteen_digits_are_not_a_card() -> None:
    assert R.text("ref 4111111111111112 and 5555 5555 5555 4445") == (
        "ref 4111111111111112 and 5555 5555 5555 4445"
    )
    assert R.text("ref 4111111111111111") == "ref [REDACTED:card]"


def test_redacting_twice_is_redacting_once() -> None:
    for text, _ in POSITIVES:
        once = R.text(text)
        assert R.text(once) == once, text
    everything = " | ".join(text for text, _ in POSITIVES)
    once = R.text(everything)
    assert R.text(once) == once
    user = Redactor(patterns=[r"\w+"])
    once = user.text("card 4111111111111111 ok")
    assert once == "[REDACTED:custom] [REDACTED:custom] [REDACTED:custom]"
    assert user.text(once) == once
    assert user.text("[REDACTED:card] ok") == "[REDACTED:card] [REDACTED:custom]"


def test_random_mixtures_are_redacted_idempotently_and_as_without_gates() -> None:
    rng = random.Random(20250615)
    pieces = [text for text, _ in POSITIVES] + NEGATIVES
    pieces += [" ", "-", ".", "_", "[", "]", "+", "(", ")", ":", "=", '"', "1", "4", "é"]
    user = Redactor(patterns=[r"(?P<ticket>TCK-\d+)", r"\w{30,}"])
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))
        once = R.text(text)
        assert once == _ungated(text), text
        assert R.text(once) == once, text
        once = user.text(text)
        assert user.text(once) == once, text


def _ungated(s: str) -> str:
    """Every built-in detector, in the module's order, without gates or windows."""
    for detector in redaction.DETECTORS:
        s = detector.apply(s)
    return s


def test_gates_never_change_what_is_found() -> None:
    samples = [text for text, _ in POSITIVES] + NEGATIVES
    corpus = list(samples)
    for i, a in enumerate(samples):
        b = samples[(i * 7 + 3) % len(samples)]
        corpus += [f"{a} {b}", f"{b}\n{a}", f"é {a} ü {b}", f"1795566343882 {a} {b}"]
    for text in corpus:
        assert R.text(text) == _ungated(text), text


def test_non_ascii_text_is_scanned_from_the_start() -> None:
    text = "Grüße — Karte 4111 1111 1111 1111, Telefon (415) 555-2671, +49 30 123456789"
    assert R.text(text) == (
        "Grüße — Karte [REDACTED:card], Telefon [REDACTED:phone], [REDACTED:phone]"
    )


def test_a_late_gate_hit_does_not_hide_an_earlier_match() -> None:
    # The card gate first fires at the card; the phone's gate must line up after the card
    # pass shortened the text.
    text = "4111-1111-1111-1111-003 then 415-555-2671 then 1795566343882"
    assert R.text(text) == "[REDACTED:card] then [REDACTED:phone] then 1795566343882"


def test_value_redacts_deeply_and_whole_sensitive_fields() -> None:
    event = {
        "kind": "tool_end",
        "turn_id": "t_9ab8911835f24b47b141499fd6db1bda",
        "usage": {
            "input_tokens": 120,
            "output_tokens": 30,
            "cached_tokens": 0,
            "reasoning_tokens": 0,
            "total_tokens": 150,
            "max_tokens": 4096,
            "tokens": 7,
        },
        "detail": {
            "arguments": {"card": "4111 1111 1111 1111", "email": "jane@example.com"},
            "headers": [
                ("Authorization", "Bearer abc123.def456"),
                {"Set-Cookie": "sid=1", "API-Key": "k", "x-request-id": "r-1"},
            ],
            "Password": {"nested": "anything"},
            "access_token": None,
            "token": "abc",
            "auth": ["a", "b"],
            "cvv": 123,
            "SSN": "078-05-1120",
            "card_number": "4111111111111111",
            "duration_ms": 12.5,
            "ok": True,
        },
    }
    original = json.loads(json.dumps(event))
    out = R.value(event)
    assert out == {
        "kind": "tool_end",
        "turn_id": "t_9ab8911835f24b47b141499fd6db1bda",
        "usage": {
            "input_tokens": 120,
            "output_tokens": 30,
            "cached_tokens": 0,
            "reasoning_tokens": 0,
            "total_tokens": 150,
            "max_tokens": 4096,
            "tokens": 7,
        },
        "detail": {
            "arguments": {"card": "[REDACTED:card]", "email": "[REDACTED:email]"},
            "headers": [
                ("Authorization", "Bearer [REDACTED:secret]"),
                {
                    "Set-Cookie": "[REDACTED:field]",
                    "API-Key": "[REDACTED:field]",
                    "x-request-id": "r-1",
                },
            ],
            "Password": "[REDACTED:field]",
            "access_token": "[REDACTED:field]",
            "token": "[REDACTED:field]",
            "auth": "[REDACTED:field]",
            "cvv": "[REDACTED:field]",
            "SSN": "[REDACTED:field]",
            "card_number": "[REDACTED:field]",
            "duration_ms": 12.5,
            "ok": True,
        },
    }
    assert json.loads(json.dumps(event)) == original  # the argument is untouched
    assert isinstance(out["detail"]["headers"][0], tuple)


def test_value_keeps_numbers_and_redacts_other_objects_only_when_needed() -> None:
    class Thing:
        def __init__(self, text: str) -> None:
            self.text = text

        def __str__(self) -> str:
            return self.text

    clean = Thing("nothing here")
    assert R.value(clean) is clean
    assert R.value(Thing("mail jane@example.com")) == "mail [REDACTED:email]"
    assert R.value(4111111111111111) == 4111111111111111  # numbers are never scanned
    assert R.value(OrderedDict(password="x", note="jane@example.com")) == {
        "password": "[REDACTED:field]",
        "note": "[REDACTED:email]",
    }
    assert R.value({"jane@example.com": 1, 5: "ok"}) == {"[REDACTED:email]": 1, 5: "ok"}
    assert R.value(frozenset({"jane@example.com"})) == frozenset({"[REDACTED:email]"})


def test_user_fields_match_whatever_the_case_and_separators() -> None:
    redactor = Redactor(fields=["customer_email", "Home Address"])
    assert redactor.value(
        {"Customer-Email": "a", "home_address": "b", "HOME-ADDRESS": "c", "email": "d"}
    ) == {
        "Customer-Email": "[REDACTED:field]",
        "home_address": "[REDACTED:field]",
        "HOME-ADDRESS": "[REDACTED:field]",
        "email": "d",
    }
    assert redactor.is_sensitive_field("CustomerEmail")
    assert not redactor.is_sensitive_field("input_tokens")


def test_json_text_redacts_a_json_document_and_dumps_it_compactly() -> None:
    args = '{"card": "4111 1111 1111 1111", "order_id": "1042", "amount": 89.0}'
    assert R.json_text(args) == '{"card":"[REDACTED:card]","order_id":"1042","amount":89.0}'
    result = '[{"password": "x", "note": "call 415-555-2671"}, 2]'
    assert R.json_text(result) == (
        '[{"password":"[REDACTED:field]","note":"call [REDACTED:phone]"},2]'
    )
    assert R.json_text('{"name": "Zoë"}') == '{"name":"Zoë"}'


def test_json_text_falls_back_to_text_when_not_a_json_document() -> None:
    assert R.json_text("call 415-555-2671") == "call [REDACTED:phone]"
    assert R.json_text('{"card": 4111 1111') == '{"card": 4111 1111'
    assert R.json_text('{"broken": "jane@example.com"') == '{"broken": "[REDACTED:email]"'
    assert R.json_text("89.00") == "89.00"
    assert R.json_text('"jane@example.com"') == '"[REDACTED:email]"'
    assert R.json_text("") == ""


def test_user_pattern_with_one_named_group_names_the_kind() -> None:
    redactor = Redactor(patterns=[r"(?P<employee_id>EMP-\d{6})", r"ORD-\d+", r"(?P<a>x)(?P<b>y)"])
    assert redactor.text("EMP-123456 filed ORD-77 about xy") == (
        "[REDACTED:employee_id] filed [REDACTED:custom] about [REDACTED:custom]"
    )
    # The whole match goes, not only the group.
    assert Redactor(patterns=[r"emp=(?P<emp>\d+)"]).text("emp=42 ok") == "[REDACTED:emp] ok"


def test_user_patterns_see_the_raw_text_before_the_built_in_detectors() -> None:
    redactor = Redactor(patterns=[r"(?P<account>ACCT \d{16})"])
    assert redactor.text("ACCT 4111111111111111, card 4111111111111111") == (
        "[REDACTED:account], card [REDACTED:card]"
    )


def test_user_pattern_that_can_match_nothing_does_not_sprinkle_markers() -> None:
    assert Redactor(patterns=[r"z*"]).text("abc zz") == "abc [REDACTED:custom]"


def test_invalid_user_pattern_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"invalid redact pattern '\(\?P<x>unclosed'"):
        Redactor(patterns=[r"ok", r"(?P<x>unclosed"])
    with pytest.raises(TypeError):
        Redactor(patterns="abc")  # type: ignore[arg-type]


def test_from_settings_uses_redact_patterns_and_fields() -> None:
    settings = CommonSettings(redact_patterns=[r"(?P<ticket>TCK-\d+)"], redact_fields=["note"])
    redactor = Redactor.from_settings(settings)
    assert redactor.value({"note": "x", "text": "see TCK-12"}) == {
        "note": "[REDACTED:field]",
        "text": "see [REDACTED:ticket]",
    }
    assert default_redactor() is default_redactor()


def test_structlog_processor_redacts_what_a_real_logger_writes() -> None:
    out = io.StringIO()
    redactor = Redactor(patterns=[r"(?P<ticket>TCK-\d+)"])
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            redactor.structlog_processor(),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    try:
        log = structlog.get_logger("test")
        log.info(
            "refund for jane@example.com on TCK-9",
            password="hunter2",
            input_tokens=120,
            detail={"card": "4111 1111 1111 1111", "Authorization": "Bearer abc123.def456"},
            error="api_key=abc123 rejected",
            turn_id="t_9ab8911835f24b47b141499fd6db1bda",
        )
    finally:
        structlog.reset_defaults()
    line = json.loads(out.getvalue())
    assert line == {
        "event": "refund for [REDACTED:email] on [REDACTED:ticket]",
        "password": "[REDACTED:field]",
        "input_tokens": 120,
        "detail": {"card": "[REDACTED:card]", "Authorization": "[REDACTED:field]"},
        "error": "api_key=[REDACTED:secret] rejected",
        "turn_id": "t_9ab8911835f24b47b141499fd6db1bda",
        "level": "info",
    }


def test_long_texts_are_remembered_per_redactor_and_stay_redacted():
    from turnfleet.redaction import TEXT_CACHE_ENTRIES, TEXT_CACHE_MIN_CHARS

    text = "Card 4111 1111 1111 1111 on file; " + "x" * TEXT_CACHE_MIN_CHARS
    plain, custom = Redactor(), Redactor(patterns=[r"on file"])
    assert plain.text(text) == plain.text(text) == text.replace("4111 1111 1111 1111", "[REDACTED:card]")
    assert "on file" not in custom.text(text)  # another redactor's rules, not the first one's answer
    assert "on file" in plain.text(text)
    for i in range(TEXT_CACHE_ENTRIES + 5):  # the memory is bounded: full means start again
        plain.text(f"{i:08d} " + "y" * TEXT_CACHE_MIN_CHARS)
    assert len(plain._texts) <= TEXT_CACHE_ENTRIES
    assert "4111" not in plain.text(text)


@pytest.mark.parametrize(("text", "expected"), NEW_POSITIVES)
def test_new_shapes_are_redacted_in_json_values_too(text: str, expected: str) -> None:
    assert R.value({"note": text, "items": [text, {"deep": text}]}) == {
        "note": expected, "items": [expected, {"deep": expected}]
    }
    document = json.dumps({"order_id": "1042", "message": text, "amount": "229.00"})
    assert json.loads(R.json_text(document)) == {
        "order_id": "1042", "message": expected, "amount": "229.00"
    }


@pytest.mark.parametrize("text", NEW_NEGATIVES)
def test_near_misses_of_the_new_shapes_stay_in_json_values(text: str) -> None:
    assert R.value({"note": text}) == {"note": text}
    document = json.dumps({"message": text}, ensure_ascii=False, separators=(",", ":"))
    assert R.json_text(document) == document


def test_iban_checksum_and_country_length_decide() -> None:
    good = "GB82WEST12345698765432"
    for i in range(4, len(good)):  # any single changed digit or letter breaks mod 97
        ch = good[i]
        bad = good[:i] + ("1" if ch.isdigit() and ch != "1" else "2" if ch.isdigit() else
                          "A" if ch != "A" else "B") + good[i + 1:]
        assert R.text(f"iban {bad}") == f"iban {bad}", bad
    assert R.text(f"iban {good}") == "iban [REDACTED:iban]"


def test_ssn_areas_groups_and_serials_that_are_never_issued_stay() -> None:
    for area in ("000", "666", *(f"9{n:02d}" for n in range(100))):
        assert R.text(f"ssn {area}-12-3456") == f"ssn {area}-12-3456"
    for area in ("001", "665", "667", "899"):
        assert R.text(f"ssn {area}-12-3456") == "ssn [REDACTED:ssn]"
    assert R.text("ssn 123-00-4567 123-45-0000") == "ssn 123-00-4567 123-45-0000"


def test_mixed_separator_cards_pass_or_fail_by_luhn_alone() -> None:
    rng = random.Random(14)
    for _ in range(200):
        seps = [rng.choice(" -") for _ in range(3)]
        for number, card in (("4111111111111111", True), ("4111111111111112", False)):
            text = "".join(d + (seps[i // 4] if i % 4 == 3 and i < 15 else "")
                           for i, d in enumerate(number))
            assert (R.text(f"card {text}.") == "card [REDACTED:card].") is card, text


def test_a_text_without_digits_never_runs_a_digit_detector() -> None:
    ran: list[str] = []

    class Watched(redaction.Detector):
        __slots__ = ()

        def start(self, s: str, view: str | None = None) -> int:
            ran.append(self.name)
            return super().start(s, view)

    detectors = [
        Watched(d.name, d.kind, d.pattern, d.needles, gate=d.gate, replace=d.replace, digits=True)
        if d.digits else d
        for d in redaction.DETECTORS
    ]
    redactor = Redactor(detectors=detectors)
    assert redactor.text("Dear customer, your parcel is on its way (UPS); sk- xox @ :=") == (
        "Dear customer, your parcel is on its way (UPS); sk- xox @ :="
    )
    assert ran == []
    assert redactor.text("call 020 7946 0958") == "call [REDACTED:phone]"
    assert "phone-national" in ran


def test_a_redactor_runs_only_the_detectors_it_is_given() -> None:
    old = Redactor(detectors=[d for d in redaction.DETECTORS if d.kind not in ("iban", "ssn")])
    text = "ssn 123-45-6789, iban GB82WEST12345698765432, card 4111111111111111"
    assert old.text(text) == "ssn 123-45-6789, iban GB82WEST12345698765432, card [REDACTED:card]"
    assert R.text(text) == "ssn [REDACTED:ssn], iban [REDACTED:iban], card [REDACTED:card]"
    assert {d.kind for d in redaction.DETECTORS} == {"secret", "email", "card", "ssn", "iban", "phone"}


def test_detect_names_the_kind_found_first() -> None:
    assert redaction.detect("jane@example.com") == "email"
    assert redaction.detect("4111111111111111") == "card"
    assert redaction.detect("123-45-6789") == "ssn"
    assert redaction.detect("GB82WEST12345698765432") == "iban"
    assert redaction.detect("07700900123") == "phone"
    assert redaction.detect("token:abc123") == "secret"
    for harmless in ("C-100", "1234567890", "t_9ab8911835f24b47b141499fd6db1bda", "order-1042"):
        assert redaction.detect(harmless) is None


def test_timestamps_and_one_word_ids_are_found_as_without_the_shortcuts() -> None:
    """A whole ISO timestamp skips the digit detectors and a one-word id runs only the IBAN
    one: both must find exactly what the ungated detectors find."""
    rng = random.Random(1414)
    samples = ["NO9386011117947", "GB82WEST12345698765432", "gb82west12345698765432"]
    for _ in range(2000):
        digits = "".join(rng.choice("0123456789") for _ in range(40))
        samples += [
            f"20{digits[:2]}-{digits[2:4]}-{digits[4:6]}T{digits[6:8]}:{digits[8:10]}:"
            f"{digits[10:12]}{rng.choice(['', '.' + digits[12:18], '.' + digits[12:21]])}"
            f"{rng.choice(['', 'Z', '+00:00', '-05:30', '+' + digits[22:24] + ':' + digits[24:26]])}",
            rng.choice(["call_", "fc_", "t_", "trace_", "span_", "x", "C"]) + "".join(
                rng.choice("0123456789abcdef" + "0123456789" * 3) for _ in range(rng.randint(8, 32))),
            f"x{digits[:rng.randint(10, 20)]}",
        ]
    for text in samples:
        assert R.text(text) == _ungated(text), text
    assert R.text("NO9386011117947") == "[REDACTED:iban]"


# -- extra detectors (TURNFLEET_REDACT_DETECTORS) ----------------------------------------------


def test_extra_detectors_from_settings_run_after_the_built_in_ones() -> None:
    settings = CommonSettings(redact_detectors=["tests.redact_detectors:recognisers"])
    redactor = Redactor.from_settings(settings)
    text = "EMP-123456 (Dana Whitfield, dana@example.com) asked about order 1042"
    assert redactor.text(text) == (
        "[REDACTED:employee] ([REDACTED:person], [REDACTED:email]) asked about order 1042"
    )
    assert redactor.text(redactor.text(text)) == redactor.text(text)
    assert redactor.value({"note": "by Captain Refund"}) == {"note": "by [REDACTED:person]"}
    assert R.text(text) == "EMP-123456 (Dana Whitfield, [REDACTED:email]) asked about order 1042"
    one = Redactor.from_settings(CommonSettings(redact_detectors=["tests.redact_detectors:employee_ids"]))
    assert one.text("EMP-654321 and XEMP-654321") == "[REDACTED:employee] and XEMP-654321"


@pytest.mark.parametrize(("spec", "why"), [
    ("tests.redact_detectors", "is not 'module:callable'"),
    (":employee_ids", "is not 'module:callable'"),
    ("tests.no_such_module:x", "cannot be loaded"),
    ("tests.redact_detectors:missing", "cannot be loaded"),
    ("tests.redact_detectors:not_detectors", "returned str, not turnfleet.redaction.Detector"),
])
def test_an_unusable_extra_detector_is_refused_naming_it(spec: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"redact detector {spec!r} ") + ".*" + re.escape(why)):
        Redactor.from_settings(CommonSettings(redact_detectors=[spec]))


def test_extra_detectors_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("TURNFLEET_REDACT_DETECTORS", '["tests.redact_detectors:employee_ids"]')
    assert Redactor.from_settings(CommonSettings()).text("EMP-000001") == "[REDACTED:employee]"


@pytest.mark.parametrize(("name", "value", "says"), [
    ("TURNFLEET_REDACT_DETECTORS", '["tests.no_such_module:x"]',
     "redact detector 'tests.no_such_module:x' cannot be loaded"),
    ("TURNFLEET_REDACT_PATTERNS", '["(unclosed"]', "invalid redact pattern '(unclosed'"),
])
def test_the_cli_refuses_unusable_redaction_settings_in_one_line(fleet_env, name, value, says) -> None:
    proc = tf("apikey", "hash", "abc", env={**fleet_env, name: value})
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"turnfleet: {says}") and len(proc.stderr.strip().splitlines()) == 1


def test_json_text_parses_and_redacts_a_repeated_string_once(monkeypatch) -> None:
    """A tool's arguments and result repeat (its span, its events, the next model call's
    input): ``json_text`` remembers what each string became, as ``text`` does (issue 19)."""
    from types import SimpleNamespace

    stdlib_json = json
    parsed: list[str] = []

    def loads(s: str) -> object:
        parsed.append(s)
        return stdlib_json.loads(s)

    monkeypatch.setattr(redaction, "json", SimpleNamespace(loads=loads, dumps=stdlib_json.dumps))
    r = Redactor()
    raw = '{"card": "4111 1111 1111 1111", "order_id": "1042", "email": "ann@example.com"}'
    first, again = r.json_text(raw), r.json_text(raw)
    assert first == again == '{"card":"[REDACTED:card]","order_id":"1042","email":"[REDACTED:email]"}'
    assert parsed == [raw]


def test_a_dict_copied_whole_is_still_redacted_where_its_keys_or_values_say() -> None:
    """The walk copies a dict whose key names all stay as they are and replaces only its
    strings and containers; a dict with the same names plus a sensitive or redacted one, or a
    str subclass key, takes the entry by entry path: the results are the same as key by key."""

    class Name(str):
        pass

    r = Redactor()
    plain = {"model": "m", "temperature": None, "max_tokens": 5, "top_p": 0.5, "store": True,
             "metadata": {"note": "call +44 20 7946 0958"}, "tags": ["ann@example.com", 3]}
    assert r.value(plain) == {**plain, "metadata": {"note": "call [REDACTED:phone]"},
                              "tags": ["[REDACTED:email]", 3]}
    assert r.value({**plain, "api_key": "x"})["api_key"] == "[REDACTED:field]"
    assert "[REDACTED:email]" in r.value({**plain, "ann@example.com": 1})
    subclassed = r.value({Name("password"): "hunter2", Name("model"): "m"})
    assert list(subclassed.values()) == ["[REDACTED:field]", "m"]
    assert r.value(plain) == r.value(plain)  # the second time from the remembered names
