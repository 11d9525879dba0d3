"""Redaction of what leaves a process as telemetry: span data, events, log lines, alerts.

Business data (the turn's text, the tool's real arguments, the stored result) is never
touched: redaction is a set of explicit calls (``Redactor.text``, ``.value``, ``.json_text``,
``.structlog_processor``) made where data becomes telemetry, not a global patch.

A detected secret becomes ``[REDACTED:<kind>]``. The built-in detectors are :data:`DETECTORS`,
small :class:`Detector` objects (kind, cheap gate, pattern); their kinds:

``card``
    13–19 digits, contiguous or in the usual 4-4-4-4(-3) / 4-6-5 / 4-6-4 groups split by
    spaces or dashes (mixed: ``4111 1111-1111 1111``), first digit 2–6 (Mastercard, Visa,
    Amex, Diners, JCB, Discover, UnionPay, Maestro), Luhn-valid. A number that fails Luhn is
    left alone.
``ssn``
    US social security numbers ``123-45-6789`` (or with spaces); never-issued areas (000, 666,
    900–999), group 00 and serial 0000 are left alone.
``iban``
    ``GB82 WEST 1234 5698 7654 32`` or ``GB82WEST12345698765432``: capitals, a known country at
    its registered length, and a valid mod-97 check; anything else is left alone.
``email``
    ``local@domain.tld``.
``phone``
    ``+`` followed by at least 10 digits (E.164, or grouped by spaces, dots or dashes, with an
    optional ``(area)``); North American ``(415) 555-2671``, ``415-555-2671``,
    ``415.555.2671``, ``415 555 2671``, with an optional leading ``1``; national numbers with a
    trunk ``0`` and 10–12 digits, grouped (UK ``020 7946 0958``, ``07700 900123``; DE
    ``030 12345678``, ``0151 23456789``, ``030/12345678``; FR ``01 23 45 67 89``,
    ``06.12.34.56.78``; IN ``098765 43210``) or, with 11–12 digits, in one run
    (``07700900123``, ``09876543210``); and a bare run of 10–12 digits (``9876543210``) when
    a phone word (phone, mobile, cell, tel, whatsapp, sms, fax, contact, call me/us, reach
    me) is within the 32 characters before it.
``secret``
    Provider keys with a recognisable prefix (OpenAI ``sk-``, Stripe ``sk_live_`` and
    friends, GitHub ``ghp_``/``github_pat_``, Slack ``xoxb-``, AWS ``AKIA``, Google ``AIza``),
    JWTs, the token after ``Bearer``, the value in ``api_key=…`` / ``password: …`` /
    ``"secret": "…"`` shapes and the password in ``redis://user:password@host`` (the word
    ``Bearer``, the key and the user stay readable).
``field``
    From :meth:`Redactor.value`: the whole value of a dict entry whose key is a sensitive
    field name.

User patterns (``TURNFLEET_REDACT_PATTERNS``) are regexes, applied before the built-in
detectors (so they see the raw text); the whole match is replaced and the kind is the name of
the pattern's named group if it has exactly one, else ``custom``.

A marker is never matched again, and the detectors treat a marker like the word it replaced,
so redacting redacted output changes nothing.

Not caught, on purpose: bare 10-digit numbers outside a phone context (``4155552671``,
``0612345678``: indistinguishable from ids and amounts in cents), numbers starting ``00``
(zero-padded ids), cards starting with 1, 7, 8 or 9 (no card network; epoch timestamps start
with 1), IBANs in lower case, SSNs without separators, numbers held as ints rather than text,
secrets without a known prefix outside a ``key=value`` shape, and postal addresses or names.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import Any, Protocol


__all__ = [
    "DETECTORS",
    "FIELD_MARK",
    "Detector",
    "SENSITIVE_FIELDS",
    "Redactor",
    "detect",
    "redactor_for",
    "load_detectors",
    "normalise_field",
    "outside_markers",
]

SENSITIVE_FIELDS: frozenset[str] = frozenset(
    {
        "password", "passwd", "secret", "api_key", "apikey", "access_token", "refresh_token",
        "token", "authorization", "auth", "cookie", "set_cookie", "card_number", "cvv", "cvc",
        "ssn",
        # Same family, common enough in headers and OAuth payloads to be worth naming.
        "client_secret", "x_api_key", "private_key", "proxy_authorization",
    }
)
"""Dict keys whose whole value is replaced by ``[REDACTED:field]``.

Compared after :func:`normalise_field`, exactly: ``API-Key`` is ``api_key``, while
``input_tokens`` or ``max_tokens`` (token counts) are not ``token``.
"""

FIELD_MARK = "[REDACTED:field]"
_CARD_MARK = "[REDACTED:card]"
_EMAIL_MARK = "[REDACTED:email]"
_PHONE_MARK = "[REDACTED:phone]"
_SSN_MARK = "[REDACTED:ssn]"
_IBAN_MARK = "[REDACTED:iban]"
_SECRET_MARK = "[REDACTED:secret]"
_MARKER_OPEN = "[REDACTED:"
_MARKER_SPLIT = re.compile(r"(\[REDACTED:\w{1,64}\])")

_FIELD_DROP = str.maketrans("", "", "-_ ")


def normalise_field(name: str) -> str:
    """Lower case without ``-``, ``_`` and spaces: the form field names are compared in."""
    return name.lower().translate(_FIELD_DROP)


# --- built-in detectors -------------------------------------------------------------------
#
# Speed: this runs on every string of every telemetry event, so the no-match path is what
# counts. A regex that may start at any letter or digit pays one engine attempt per position
# (one combined alternation cost ~115 µs on a clean 500-character string). Here every
# detector (a `Detector` in `DETECTORS`) sits behind a gate: a one-character trigger shared by
# its neighbours (a memchr), then its needles, then optionally a finer check; the digit
# detectors also turn away texts shorter, or with fewer digits, than any match, whole ISO
# timestamps and one-word ids. Every pattern starts with a literal or a character class, so the
# engine's own first-character scan skips the text between candidates. Look-behinds that
# check what precedes a match come after that first character, not before it (a leading
# look-behind would switch the scan off). Each gate is a superset of its pattern, so gating
# changes how fast nothing is found, never what is found; the tests compare against the
# ungated patterns. BENCHMARKS.md, table 9, has the cost per turn.
#
# The digit detectors gate on a view of the text with ASCII letters lower-cased and ASCII
# digits turned into "0" (which is why their classes are [0-9], not \d).
#
# Boundaries are look-arounds so that digits inside our own ids (t_<hex>, trace_<hex>),
# stream ids (1732500000000-0), decimals and dates never start or end a match.

_GATE_TABLE = bytes.maketrans(
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"0000000000abcdefghijklmnopqrstuvwxyz"
)


_CASE_TABLE = bytes.maketrans(
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
    b"0" * 10 + b"A" * 26 + b"a" * 26,
)


def _case_view(s: str) -> str:
    """Like :func:`_gate_view`, with capitals as ``A`` and small letters as ``a``."""
    return s.encode("utf-8", "surrogatepass").translate(_CASE_TABLE).decode("latin-1")


def _gate_view(s: str) -> str:
    # bytes.translate is ~10x faster than str.translate; latin-1 makes it a str again (whose
    # `in` is cheaper than bytes'), and non-ASCII bytes never equal an ASCII needle.
    return s.encode("utf-8", "surrogatepass").translate(_GATE_TABLE).decode("latin-1")


_TOKEN = r"[A-Za-z0-9_\-]"
_END = r"(?![\w\-\[])"
# Not followed by a word character, nor by ".5" or "-0" (a decimal, a stream id's sequence).
# "[" here and "]" in the look-behinds treat a marker like the word it replaced, so that a
# second pass cannot find what the first rightly skipped (idempotence).
_NOT_BEFORE = r"(?![\w\[]|[.\-][0-9])"

# Provider keys, one pattern per family, each starting with its literal prefix.
_OPENAI = re.compile(r"sk-(?<![\w\-\]]sk-)(?:proj-|svcacct-|admin-)?" + _TOKEN + r"{20,}+" + _END)
_STRIPE = re.compile(r"(?<![\w\-\]])[spr]k_(?:live|test)_[0-9A-Za-z]{10,}+" + _END)
_GITHUB = re.compile(r"g(?<![\w\-\]]g)(?:h[pousr]_[A-Za-z0-9]{20,}+|ithub_pat_\w{22,}+)" + _END)
_GITHUB_GATE = re.compile(r"gh[pousr]_")
_SLACK = re.compile(r"xox(?<![\w\-\]]xox)[abposr]-[A-Za-z0-9\-]{10,}+" + _END)
_AWS_GOOGLE = re.compile(  # AWS access key ids, Google API keys
    r"A(?<![\w\-\]]A)(?:[KS]IA[0-9A-Z]{16}|Iza[0-9A-Za-z_\-]{35})" + _END
)
_JWT = re.compile(
    r"eyJ(?<![\w\-\]]eyJ)" + _TOKEN + r"++\.eyJ" + _TOKEN + r"++\.[A-Za-z0-9_\-+/=]*+" + _END
)

# "Bearer <token>": the word stays, the token goes. Whether it looks like a token (a digit or
# a symbol, or 20+ characters) is decided in the replacement, so that prose ("Bearer
# authentication") stays.
_BEARER = re.compile(
    r"earer(?<=[Bb]earer)(?<![\w][Bb]earer)[ \t]+"
    r"(?P<tok>(?!\[REDACTED:)[A-Za-z0-9\-._~+/]{8,}+=*+)"
)

# key=value, key: value, "key": "value", DB_PASSWORD=…, x-api-key: …; the value goes. The
# pattern starts at the ":" or "=" (one pattern per separator, so it starts with a literal)
# and looks back for the key, allowing a quote and/or one blank in between. The key may carry
# a prefix joined by "_" or "-" (client_secret, access_token), but a letter or digit right
# before it makes another word (monkey=, mytoken=, input_tokens=).
_KV_KEYS = ("api_key", "api-key", "apikey", "secret", "token", "password", "passwd", "pwd")
_KV_GAPS = ("", "[\"' \t]", "[\"'][ \t]")


def _key_value_pattern(sep: str) -> re.Pattern[str]:
    keys = "|".join(
        rf"(?<=(?i:{key}){gap}{sep})(?<![A-Za-z0-9](?i:{key}){gap}{sep})"
        for key in _KV_KEYS
        for gap in _KV_GAPS
    )
    ends = "(?i:ey|et|en|wd|rd)"  # the last two letters of every key
    quick = "|".join(rf"(?<={ends}{gap}{sep})" for gap in _KV_GAPS)
    return re.compile(
        # The first look-behinds are a cheap filter (a timestamp's "12:" or JSON's "order_id":
        # fail them at once); the exact keys and their boundary come after.
        rf"{sep}(?:{quick})(?:{keys})"
        r"[ \t]*(?![\"']?\[REDACTED:)"
        r"(?:\"(?P<dq>[^\"\n]+)\"|'(?P<sq>[^'\n]+)'|(?P<bare>[^\s\"'&,;)\]}]+))"
    )


_KEY_VALUE_COLON = _key_value_pattern(":")
_KEY_VALUE_EQUALS = _key_value_pattern("=")

# The password in a URL's user info (redis://:pw@host, https://user:pw@host); the user stays.
_URL_CREDENTIALS = re.compile(r"://[^\s/:@\[\]]*:(?!\[REDACTED:)(?P<pw>[^\s/@]+)@")

# Emails are found from the "@" forwards over the domain; the local part is walked back by
# hand, since a pattern starting at the local part would be tried at every letter.
_EMAIL_DOMAIN = re.compile(
    r"@[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*"
    r"\.(?:[A-Za-z]{2,24}|[Xx][Nn]--[A-Za-z0-9]{1,59})(?![\w\-])"  # a TLD, or an IDN one (punycode)
)
_EMAIL_LOCAL_SYMBOLS = frozenset("._%+-")

# Cards: first digit 2–6 (the card networks; epoch timestamps start with 1), then the
# character before it must not be a word character, ".", "+" or "-".
# Mixed separators are allowed (4111 1111-1111 1111): Luhn decides, not the typing.
_CARD = re.compile(
    r"[2-6](?<![\w.+\-\]].)(?:"
    r"[0-9]{12,18}+"  # contiguous
    r"|[0-9]{3}[ \-][0-9]{4}[ \-][0-9]{4}[ \-][0-9]{1,4}+"  # 4-4-4-4
    r"(?P<tail>[ \-][0-9]{3})?"  # 4-4-4-4-3
    r"|(?<=3)[0-9]{3}[ \-][0-9]{6}[ \-][0-9]{4,5}+"  # Amex 4-6-5, Diners 4-6-4
    r")" + _NOT_BEFORE
)
_CARD_GATE = ("0000000000000", "0000 0000", "0000-0000")

# US social security numbers, 3-2-4 with one consistent dash or space. Areas 000, 666 and
# 900–999, group 00 and serial 0000 are never issued: such a number is left alone.
_SSN = re.compile(
    r"[0-8](?<![\w.+\-\]/].)[0-9]{2}(?P<sep>[ \-])[0-9]{2}(?P=sep)[0-9]{4}" + _NOT_BEFORE
)
_SSN_GATE = ("000-00-0000", "000 00 0000")

# IBANs: country code, two check digits and the account, upper case, contiguous or in groups
# of 4 split by single spaces. The replacement checks the country's length and mod 97.
_IBAN = re.compile(
    r"[A-Z](?<![\w\]].)[A-Z][0-9]{2}"
    r"(?:[A-Z0-9]{11,30}+|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,3})?)"
    r"(?![\w\[])"
)
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28,
    "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28,
    "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22,
    "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23,
    "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24,
    "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}
"""IBAN length by country (the SWIFT registry): a known country and its exact length."""

# "+" then digit groups split by single separators, with an optional "(area)"; at least 10
# digits, counted in the replacement (which keeps the pattern free of ambiguous backtracking).
_PHONE_INTL = re.compile(
    r"\+(?<![\w+\]]\+)[0-9]++(?:[ .\-]?\([0-9]{1,4}+\)[ .\-]?[0-9]++)?(?:[ .\-][0-9]++)*+"
    + _NOT_BEFORE
)
_PHONE_INTL_GATE = re.compile(r"\+0[0 .\-()]{9}")

# National numbers with a trunk 0 (UK 020 7946 0958, 07700 900123; DE 030 12345678,
# 0151 23456789, 030/12345678; FR 01 23 45 67 89, 06.12.34.56.78; IN 098765 43210): "0", a
# digit 1–9, a first group of 2–6 digits (or "(020) "), then groups of 2–8 digits split by one
# consistent space, dot or dash; or 11–12 digits in one run (07700900123). 10–12 digits in
# all, counted in the replacement. A leading "00" (zero-padded ids) never starts one, nor a
# "0" after a digit (or a marker) and ":" (the seconds of "T22:08:05.527000-05:30").
_PHONE_NATIONAL = re.compile(
    r"[0(](?<![\w.+\-\]/].)(?<![0-9\]]:.)(?:"
    r"(?:(?<=\()0[1-9][0-9]{0,4}\)[ ]?|(?<=0)[1-9][0-9]{0,4}[ .\-/])"
    r"[0-9]{2,8}(?:(?P<sep>[ .\-])[0-9]{2,8}(?:(?P=sep)[0-9]{2,8}){0,3})?"
    r"|(?<=0)[1-9][0-9]{9,10}+"
    r")" + _NOT_BEFORE
)
# Its start in the text: "0", 1–9, a few more digits and a separator or more digits (the
# hour in "T22:08:00" is followed by ":").
_PHONE_NATIONAL_ZERO = re.compile(r"0(?<![\w.+\-\]/]0)(?<![0-9\]]:0)[1-9][0-9]{0,4}[ .\-/0-9]")

# North American: (415) 555-2671, 415-555-2671, 415.555.2671, 415 555 2671, optional "1 ".
_PHONE_NANP = re.compile(
    r"[0-9(](?<![\w.+\-\]].)(?:"
    r"(?<=1)[ .\-]?(?:\([0-9]{3}\)[ ]?[0-9]{3}[ .\-]|[0-9]{3}-[0-9]{3}-|[0-9]{3}\.[0-9]{3}\."
    r"|[0-9]{3} [0-9]{3} )"
    r"|(?<=\()[0-9]{3}\)[ ]?[0-9]{3}[ .\-]"
    r"|(?<=[0-9])[0-9]{2}(?:-[0-9]{3}-|\.[0-9]{3}\.| [0-9]{3} )"
    r")[0-9]{4}" + _NOT_BEFORE
)
_PHONE_NANP_GATE = ("000-000-", "000.000.", "000 000 ", "(000)")

# A bare run of 10–12 digits (9876543210, 4155552671) is a phone only in a phone context: one
# of these words in the 32 characters before it. Elsewhere it is an id or an amount in cents.
# A "[REDACTED:phone]" marker is not a phone context (the ":" before "phone"): otherwise a
# second pass would find numbers the first left alone.
_PHONE_BARE = re.compile(r"[0-9](?<![\w.+\-\]/].)[0-9]{9,11}+" + _NOT_BEFORE)
_PHONE_WORDS = re.compile(
    r"(?<!:)phone|mobile|whatsapp|sms|fax|contact|\b(?:tel|mob|cell|call me|call us|reach me)\b",
    re.IGNORECASE | re.ASCII,
)
_PHONE_CONTEXT_CHARS = 32


# --- replacements ---------------------------------------------------------------------------


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i & 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match[str]) -> str:
    raw = m.group()
    digits = raw.replace(" ", "").replace("-", "")
    if _luhn_ok(digits):
        return _CARD_MARK
    tail = m.group("tail")
    if tail and _luhn_ok(digits[: 1 - len(tail)]):
        return _CARD_MARK + tail  # a 16-digit card followed by a separate 3-digit number
    return raw


def _ssn(m: re.Match[str]) -> str:
    raw = m.group()
    area, group, serial = raw[:3], raw[4:6], raw[7:]
    if area in ("000", "666") or group == "00" or serial == "0000":
        return raw
    return _SSN_MARK


def _iban_ok(iban: str) -> bool:
    if _IBAN_LENGTHS.get(iban[:2]) != len(iban):
        return False
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


def _iban(m: re.Match[str]) -> str:
    raw = m.group()
    length = _IBAN_LENGTHS.get(raw[:2])
    if length is None:
        return raw
    # Grouped, the match may run into a following word of 1–4 capitals ("… 7034 PAID"):
    # the IBAN is the prefix with the country's length, ending where a group ends.
    seen = 0
    for i, ch in enumerate(raw):
        if ch != " ":
            seen += 1
            if seen == length:
                end = i + 1
                if end < len(raw) and raw[end] != " ":
                    return raw
                return _IBAN_MARK + raw[end:] if _iban_ok(raw[:end].replace(" ", "")) else raw
    return raw


def _digit_count(s: str) -> int:
    return sum(ch.isdigit() for ch in s)


def _phone_intl(m: re.Match[str]) -> str:
    raw = m.group()
    return _PHONE_MARK if _digit_count(raw) >= 10 else raw


def _phone_national(m: re.Match[str]) -> str:
    raw = m.group()
    return _PHONE_MARK if 10 <= _digit_count(raw) <= 12 else raw


def _phone_bare(m: re.Match[str]) -> str:
    # Searched in place (not in a slice), so that the look-behind sees a marker's ":".
    start = m.start()
    near = _PHONE_WORDS.search(m.string, max(0, start - _PHONE_CONTEXT_CHARS), start)
    return m.group() if near is None else _PHONE_MARK


def _splice(m: re.Match[str], group: str | int | None) -> str:
    """The match with only ``group`` replaced by the secret marker."""
    start, end = m.span()
    gstart, gend = m.span(group or 0)
    s = m.string
    return s[start:gstart] + _SECRET_MARK + s[gend:end]


def _url_credentials(m: re.Match[str]) -> str:
    return _splice(m, "pw")


def _key_value(m: re.Match[str]) -> str:
    return _splice(m, m.lastgroup)  # dq, sq or bare: whichever value form matched


def _bearer(m: re.Match[str]) -> str:
    token = m.group("tok")
    if len(token) >= 20 or not token.isalpha():
        return _splice(m, "tok")
    return m.group()


def _emails(s: str) -> str:
    parts: list[str] = []
    pos = 0
    for m in _EMAIL_DOMAIN.finditer(s):
        at = start = m.start()
        while start > pos and (
            s[start - 1].isalnum() or s[start - 1] == "_" or s[start - 1] in _EMAIL_LOCAL_SYMBOLS
        ):
            start -= 1
        if start == at:
            continue
        parts.append(s[pos:start])
        parts.append(_EMAIL_MARK)
        pos = m.end()
    if not parts:
        return s
    parts.append(s[pos:])
    return "".join(parts)


# --- detectors ------------------------------------------------------------------------------


def _first(v: str, needles: tuple[str, ...]) -> int:
    """Where the first of ``needles`` occurs in ``v``, or -1."""
    first = -1
    for needle in needles:
        at = v.find(needle)
        if at >= 0 and (first < 0 or at < first):
            first = at
    return first


_BACK = 8
"""How far before a gate's hit a digit detector's scan starts (see :class:`Detector`)."""


def _sub_from(pattern: re.Pattern[str], repl: Any, s: str, at: int) -> str:
    """``pattern.sub(repl, s)``, for a pattern that cannot match before ``at - 6``.

    A digit pass is often gated in by something harmless (an epoch timestamp); starting the
    scan near the gate's hit saves most of the work. View positions are positions in ``s``
    only when ``s`` is ASCII; otherwise the scan starts at 0. The scan starts a few
    characters early (a needle may sit up to 6 characters into a match: "07700 " of a UK
    mobile) and runs over the whole string from there, not over a slice, so a look-behind
    sees what precedes the start (a slice would make the middle of a number look like the
    start of one).
    """
    start = at - _BACK
    if start <= 0 or not s.isascii():
        return pattern.sub(repl, s)
    parts: list[str] = []
    end = 0
    for m in pattern.finditer(s, start):
        parts.append(s[end : m.start()])
        parts.append(repl if isinstance(repl, str) else repl(m))
        end = m.end()
    if not parts:
        return s
    parts.append(s[end:])
    return "".join(parts)


Gate = Callable[[str, str, int], int]
"""A finer gate after the needles: (text, what the needles were found in: the text or its digit
view, the first needle's position) → a position at most 6 characters after the start of the
first match, or -1 for "no match possible"."""


class Detector:
    """One shape of secret: its kind, a cheap gate, a pattern and what a match becomes.

    The gate is ``needles`` (substrings, one of which every match contains) and optionally a
    finer ``gate``; only when it passes does the pattern run. A ``digits`` detector gates on
    the digit view of the text (ASCII digits as ``0``, ASCII letters lower-cased) and, in
    ASCII text, scans from a few characters before the gate's hit, so every one of its
    matches must contain a needle within its first 6 characters. Each gate is a superset of its
    pattern: gating changes how fast nothing is found, never what is found.
    ``replace`` is the marker string or a function of the match (which may leave the match
    as it was: a Luhn-invalid number); ``scan`` replaces the pattern when the search is
    not one regex (e-mails are walked back from the "@").
    """

    __slots__ = (
        "name", "kind", "pattern", "needles", "gate", "replace", "digits", "scan", "trigger",
        "min_length", "min_digits", "in_words", "_needle",
    )

    def __init__(
        self,
        name: str,
        kind: str,
        pattern: re.Pattern[str] | None,
        needles: tuple[str, ...],
        *,
        gate: Gate | None = None,
        replace: str | Callable[[re.Match[str]], str] | None = None,
        digits: bool = False,
        scan: Callable[[str], str] | None = None,
        trigger: str | None = None,
        min_length: int = 0,
        min_digits: int = 0,
        in_words: bool = False,
    ) -> None:
        if (pattern is None) == (scan is None):
            raise ValueError(f"detector {name!r}: give a pattern or a scan function, not both")
        self.name = name
        self.kind = kind
        self.pattern = pattern
        self.needles = needles
        self.gate = gate
        self.replace = f"[REDACTED:{kind}]" if replace is None else replace
        self.digits = digits
        self.scan = scan
        # A substring of every needle, checked first: one character is a memchr, several
        # take a slower search, and neighbours sharing a trigger are gated by one check.
        self.trigger = trigger if trigger is not None else "0" if digits else None
        self._needle = needles[0] if len(needles) == 1 else None
        # The shortest text, and the fewest ASCII digits, a match can have: most telemetry
        # strings are short ids and numbers, turned away by len() and one count.
        self.min_length = min_length
        self.min_digits = min_digits
        # Whether a match can start at a letter inside one ASCII word (an IBAN can; a number
        # must start a token): ids like call_a8b8bce0003dd188 skip the others.
        self.in_words = in_words

    def __repr__(self) -> str:
        return f"Detector({self.name!r}, kind={self.kind!r})"

    def start(self, s: str, view: str | None = None) -> int:
        """Where (about) a match may start in ``s``, or -1. A digit detector needs ``view``."""
        text = view if self.digits else s
        assert text is not None
        needle = self._needle
        if needle is not None:
            at = text.find(needle)
        else:
            at = _first(text, self.needles) if self.needles else 0  # no needles: always run
        if at >= 0 and self.gate is not None:
            at = self.gate(s, text, at)
        return at

    def apply(self, s: str, at: int = 0) -> str:
        """``s`` with every match replaced, scanning from ``at`` (see the class docstring)."""
        if self.scan is not None:
            return self.scan(s)
        assert self.pattern is not None
        if self.digits:
            return _sub_from(self.pattern, self.replace, s, at)
        return self.pattern.sub(self.replace, s)


def _regex_gate(gate: re.Pattern[str]) -> Gate:
    def at(s: str, text: str, first: int) -> int:
        m = gate.search(text, max(0, first - 6))
        return -1 if m is None else m.start()

    return at


def _github_gate(s: str, text: str, first: int) -> int:
    return first if "github_pat_" in s or _GITHUB_GATE.search(s) is not None else -1


def _iban_gate(s: str, view: str, first: int) -> int:
    if s.islower():  # letters, none of them capitals: ids in hex, prose
        return -1
    # Two capitals and two digits, in a view that keeps case: hex ids have the shape in lower
    # case, and a regex scan for capitals costs more than building the view.
    at = _case_view(s).find("AA00", max(0, first - 6))
    return at if at < 0 or s.isascii() else 0  # non-ASCII: view positions are not s positions


def _national_gate(s: str, view: str, first: int) -> int:
    # A "0" that may start a group, in the text itself (in the view every digit is a 0).
    m = _PHONE_NATIONAL_ZERO.search(s)
    at = -1 if m is None else m.start()
    if "(" in s:
        paren = s.find("(0")
        if paren >= 0 and (at < 0 or paren < at):
            at = paren
    return at


def _phone_words_gate(s: str, view: str, first: int) -> int:
    # 0: the replacement reads the words before a match, so the scan must keep them.
    return 0 if _PHONE_WORDS.search(view) is not None else -1


DETECTORS: tuple[Detector, ...] = (
    # Provider keys first: a key after "Bearer " or "api_key=" becomes one secret marker, and
    # the later passes skip what is already a marker.
    Detector("openai-key", "secret", _OPENAI, ("sk-",), trigger="-"),
    Detector("slack-token", "secret", _SLACK, ("xox",), trigger="-"),  # xoxb-…
    Detector("stripe-key", "secret", _STRIPE, ("k_live_", "k_test_"), trigger="_"),
    Detector("github-token", "secret", _GITHUB, ("gh",), gate=_github_gate, trigger="_"),
    Detector("aws-google-key", "secret", _AWS_GOOGLE, ("AKIA", "ASIA", "AIza"), trigger="A"),
    Detector("jwt", "secret", _JWT, ("eyJ",), trigger="J"),
    Detector("bearer", "secret", _BEARER, ("earer",), replace=_bearer),
    Detector("key-colon-value", "secret", _KEY_VALUE_COLON, (":",), replace=_key_value),
    Detector("key-equals-value", "secret", _KEY_VALUE_EQUALS, ("=",), replace=_key_value),
    Detector("url-password", "secret", _URL_CREDENTIALS, ("://",), replace=_url_credentials,
             trigger="@"),
    Detector("email", "email", None, ("@",), scan=_emails, trigger="@"),
    # Digit detectors, on the digit view. IBANs before cards: a grouped IBAN's digits could
    # otherwise pass for a card.
    Detector("iban", "iban", _IBAN, ("00",), gate=_iban_gate, replace=_iban, digits=True,
             min_length=15, min_digits=2, in_words=True),
    Detector("card", "card", _CARD, _CARD_GATE, replace=_card, digits=True,
             min_length=13, min_digits=13),
    Detector("ssn", "ssn", _SSN, _SSN_GATE, replace=_ssn, digits=True,
             min_length=11, min_digits=9),
    # National before international: an international number's digit groups run on without
    # bound, and a national number after it ("+1415555267 0161 496 0123") must not be the
    # marker that lets a second pass find what the first did not.
    Detector("phone-national", "phone", _PHONE_NATIONAL, ("0",), gate=_national_gate,
             replace=_phone_national, digits=True, min_length=10, min_digits=10),
    Detector("phone-intl", "phone", _PHONE_INTL, ("+",), gate=_regex_gate(_PHONE_INTL_GATE),
             replace=_phone_intl, digits=True, min_length=11, min_digits=10),
    Detector("phone-nanp", "phone", _PHONE_NANP, _PHONE_NANP_GATE, digits=True,
             min_length=10, min_digits=10),
    Detector("phone-context", "phone", _PHONE_BARE, ("0000000000",), gate=_phone_words_gate,
             replace=_phone_bare, digits=True, min_length=10, min_digits=10),
)
"""The built-in detectors, most specific first (a later one skips what is already a marker)."""


Plan = tuple[tuple[bool, "str | None", int, tuple[Detector, ...]], ...]


def plan(detectors: Sequence[Detector]) -> Plan:
    """``detectors`` in order, neighbours with the same trigger grouped behind one check
    (and the group's shortest possible match)."""
    groups: list[tuple[bool, str | None, list[Detector]]] = []
    for d in detectors:
        if groups and d.trigger is not None and groups[-1][:2] == (d.digits, d.trigger):
            groups[-1][2].append(d)
        else:
            groups.append((d.digits, d.trigger, [d]))
    return tuple(
        # A lone detector whose trigger is its only needle needs no second look.
        (digits, None if len(ds) == 1 and ds[0].needles == (trigger,) else trigger,
         min(d.min_length for d in ds), tuple(ds))
        for digits, trigger, ds in groups
    )


# A whole string that is one ISO timestamp (span and event times) holds no number a digit
# detector matches: every digit group is preceded by a digit, a letter or one of - : . +
# in a way no pattern starts after (the tests check this against the ungated patterns).
_ISO_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,9})?)?"
    r"(?:Z|[+\-][0-9]{2}:[0-9]{2})?"
)


def _run(steps: Plan, s: str) -> str:
    view: str | None = None  # the digit view of s, built when a digit detector first needs it
    digit_count = 0
    one_word = False
    for digits, trigger, min_length, group in steps:
        if len(s) < min_length:
            continue
        if digits:
            if _ISO_TIME.fullmatch(s):
                continue
            if view is None:
                view = _gate_view(s)
                digit_count = view.count("0")
                one_word = s.isascii() and s.isidentifier()
            if trigger is not None and trigger not in view:
                continue
        elif trigger is not None and trigger not in s:
            continue
        for d in group:
            if digits:
                if view is None:
                    view = _gate_view(s)
                    digit_count = view.count("0")
                    one_word = s.isascii() and s.isidentifier()
                if digit_count < d.min_digits or len(s) < d.min_length or (
                    one_word and not d.in_words
                ):
                    continue
                at = d.start(s, view)
            else:
                at = d.start(s)
            if at < 0:
                continue
            redacted = d.apply(s, at)
            if redacted != s:
                s, view = redacted, None  # rebuilt when needed, its positions in line with s
    return s


_BUILTIN_PLAN = plan(DETECTORS)


class _UserPattern:
    __slots__ = ("regex", "mark")

    def __init__(self, pattern: str) -> None:
        if not isinstance(pattern, str):
            raise ValueError(f"redact pattern {pattern!r} is not a string")
        try:
            self.regex = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid redact pattern {pattern!r}: {exc}") from exc
        names = list(self.regex.groupindex)
        self.mark = f"[REDACTED:{names[0] if len(names) == 1 else 'custom'}]"

    def _repl(self, m: re.Match[str]) -> str:
        # A pattern that can match nothing (``a*``) must not sprinkle markers between chars.
        return self.mark if m.end() > m.start() else ""

    def apply(self, s: str) -> str:
        if _MARKER_OPEN not in s:
            return self.regex.sub(self._repl, s)
        # Leave markers alone, so that a pattern like \w+ cannot eat them.
        parts = _MARKER_SPLIT.split(s)
        for i in range(0, len(parts), 2):
            if parts[i]:
                parts[i] = self.regex.sub(self._repl, parts[i])
        return "".join(parts)


# Every non-empty string is remembered: telemetry repeats its short strings (event kinds,
# agent and tool names, a turn's ids in each of its events) far more often than it has unique
# ones, and a lookup costs less than running the detectors even on "turn".
TEXT_CACHE_MIN_CHARS = 1
TEXT_CACHE_ENTRIES = 4096

# What :meth:`Redactor.value` passes through as it is, by exact type.
_ATOMS = frozenset({type(None), bool, int, float, bytes, bytearray})
_UNSEEN = object()  # a key the key cache has not seen (its None means "sensitive field")


class RedactionSettings(Protocol):
    """What a redactor is built from: ``turnfleet.settings.CommonSettings`` has these (the
    ``TURNFLEET_REDACT_*`` settings). A protocol, so that this module imports no settings."""

    redact_patterns: list[str]
    redact_fields: list[str]
    redact_detectors: list[str]


class Redactor:
    """Finds secrets and personal data in telemetry and replaces them with markers.

    Cheap to share between threads and tasks: construction compiles the user patterns once
    (an invalid one raises ``ValueError`` naming it), and no method changes its argument.
    ``detectors`` defaults to every built-in one; a subset is for measuring what each costs
    (``bench``), not a setting.
    """

    _KEY_CACHE_SIZE = 4096

    def __init__(
        self,
        patterns: Sequence[str] = (),
        fields: Sequence[str] = (),
        detectors: Sequence[Detector] = DETECTORS,
    ) -> None:
        if isinstance(patterns, str) or isinstance(fields, str):
            raise TypeError("patterns and fields are sequences of strings, not one string")
        self._patterns = tuple(_UserPattern(p) for p in patterns)
        self._plan = plan(detectors)
        self._fields = frozenset(normalise_field(f) for f in (*SENSITIVE_FIELDS, *fields))
        # Dict keys repeat (they are the telemetry's schema): remember what each one becomes,
        # None meaning "sensitive field".
        self._keys: dict[str, str | None] = {}
        self._plain: dict[tuple[Any, ...], bool] = {}  # a dict's key names -> all kept as they are
        # Long strings repeat too: every generation span carries the agent's instructions and
        # the conversation so far. Remember the latest results (cleared when full).
        self._texts: dict[str, str] = {}
        self._json_texts: dict[str, str] = {}  # json_text's results, as _texts

    @classmethod
    def from_settings(cls, settings: RedactionSettings) -> Redactor:
        """From ``redact_patterns``, ``redact_fields`` and ``redact_detectors``
        (``TURNFLEET_REDACT_*``); the extra detectors run after the built-in ones."""
        return cls(patterns=settings.redact_patterns, fields=settings.redact_fields,
                   detectors=(*DETECTORS, *load_detectors(settings.redact_detectors)))

    # -- strings ------------------------------------------------------------------------------

    def text(self, s: str) -> str:
        """``s`` with every detected secret replaced by ``[REDACTED:<kind>]``."""
        if not s:
            return s
        if len(s) < TEXT_CACHE_MIN_CHARS:
            return self._text(s)
        done = self._texts.get(s)
        if done is None:
            if len(self._texts) >= TEXT_CACHE_ENTRIES:
                self._texts.clear()
            done = self._texts[s] = self._text(s)
        return done

    def _text(self, s: str) -> str:
        # User patterns first: they are written against the raw text, not against markers.
        for pattern in self._patterns:
            s = pattern.apply(s)
        return _run(self._plan, s)

    def json_text(self, s: str) -> str:
        """A JSON object or array held in a string, redacted by :meth:`value`, dumped compactly.

        Anything else (plain text, broken JSON, a bare JSON number or string) goes through
        :meth:`text`, so that ``"89.00"`` stays ``"89.00"``.
        """
        if s.lstrip()[:1] in ("{", "["):
            done = self._json_texts.get(s)
            if done is not None:
                return done
            try:
                parsed = json.loads(s)
            except ValueError:
                pass
            else:
                # A tool's arguments and result repeat (in its span, its events, the next model
                # call's input): parsed, redacted and dumped once.
                if len(self._json_texts) >= TEXT_CACHE_ENTRIES:
                    self._json_texts.clear()
                done = self._json_texts[s] = json.dumps(self.value(parsed), ensure_ascii=False,
                                                        separators=(",", ":"))
                return done
        return self.text(s)

    # -- structures ---------------------------------------------------------------------------

    def is_sensitive_field(self, name: str) -> bool:
        """Whether a dict entry under ``name`` is replaced whole by ``[REDACTED:field]``."""
        return normalise_field(name) in self._fields

    def _remember_plain(self, names: tuple[Any, ...]) -> bool:
        plain = all(type(name) is str and self._key(name) == name for name in names)
        if len(self._plain) >= self._KEY_CACHE_SIZE:
            self._plain.clear()
        self._plain[names] = plain
        return plain

    def _key(self, key: str) -> str | None:
        try:
            return self._keys[key]
        except KeyError:
            pass
        out = None if normalise_field(key) in self._fields else self.text(key)
        if len(self._keys) >= self._KEY_CACHE_SIZE:
            self._keys.clear()
        self._keys[key] = out
        return out

    def value(self, obj: Any) -> Any:
        """A redacted deep copy of ``obj``.

        Strings go through :meth:`text`; mappings (as dicts), lists, tuples and sets are copied
        recursively, string dict keys redacted as text; a dict entry whose key is a sensitive
        field name has its whole value replaced by ``[REDACTED:field]``. Numbers, booleans,
        ``None`` and bytes come back as they are (a 19-digit nanosecond timestamp is not a
        card). Any other object comes back as it is unless its ``str()`` carries a secret, in
        which case the redacted string replaces it.
        """
        # The exact JSON types first, by ``type() is``: a trace record is ~400 nodes a turn,
        # and the walk (not the detectors: their results are cached) was most of its cost.
        kind = type(obj)
        if kind is str:
            done = self._texts.get(obj)
            return self.text(obj) if done is None else done
        if kind is dict:
            return self._mapping(obj)
        if kind is list:
            return self._list(obj)
        if kind in _ATOMS:
            return obj
        return self._other(obj)

    def _other(self, obj: Any) -> Any:
        """:meth:`value` of anything but an exact str, dict, list or atom (subclasses too)."""
        if isinstance(obj, str):
            return self.text(obj)
        if obj is None or isinstance(obj, (bool, int, float, bytes, bytearray)):
            return obj
        if isinstance(obj, dict):
            return self._mapping(obj)
        if isinstance(obj, list):
            return self._list(obj)
        if isinstance(obj, tuple):
            return tuple(self.value(v) for v in obj)
        if isinstance(obj, (set, frozenset)):
            return type(obj)(self.value(v) for v in obj)
        if isinstance(obj, Mapping):
            return self._mapping(obj)
        as_text = str(obj)
        redacted = self.text(as_text)
        return obj if redacted == as_text else redacted

    def _list(self, obj: list[Any]) -> list[Any]:
        texts = self._texts
        out = []
        append = out.append
        for val in obj:
            kind = type(val)
            if kind is str:
                done = texts.get(val)
                append(self.text(val) if done is None else done)
            elif kind is dict:
                append(self._mapping(val))
            elif kind in _ATOMS:
                append(val)
            else:
                append(self.value(val))
        return out

    def _mapping(self, obj: Mapping[Any, Any]) -> dict[Any, Any]:
        texts = self._texts
        if type(obj) is dict:
            # A dict whose keys all stay as they are (the schema's names: neither sensitive nor
            # redacted) is copied whole, then only its strings and containers are replaced:
            # most of a trace record is such dicts of numbers and None (model settings, usage).
            names = tuple(obj)
            plain = self._plain.get(names)
            if plain is None:
                plain = self._remember_plain(names)
            if plain:
                out = obj.copy()
                for key, val in obj.items():
                    kind = type(val)
                    if kind is str:
                        done = texts.get(val)
                        out[key] = self.text(val) if done is None else done
                    elif kind not in _ATOMS:
                        out[key] = self.value(val)
                return out
        keys = self._keys
        out: dict[Any, Any] = {}
        for key, val in obj.items():
            if type(key) is str:
                new_key = keys.get(key, _UNSEEN)
                if new_key is _UNSEEN:
                    new_key = self._key(key)
            elif isinstance(key, str):
                new_key = self._key(key)
            else:
                out[key] = self.value(val)
                continue
            if new_key is None:
                out[key] = FIELD_MARK
                continue
            kind = type(val)
            if kind is str:
                done = texts.get(val)
                out[new_key] = self.text(val) if done is None else done
            elif kind in _ATOMS:
                out[new_key] = val
            elif kind is dict:
                out[new_key] = self._mapping(val)
            elif kind is list:
                out[new_key] = self._list(val)
            else:
                out[new_key] = self.value(val)
        return out

    # -- logging ------------------------------------------------------------------------------

    def structlog_processor(
        self,
    ) -> Callable[[Any, str, MutableMapping[str, Any]], MutableMapping[str, Any]]:
        """A structlog processor redacting the event message and every value of a log line.

        An entry whose key is a sensitive field name (``log.info("x", password=...)``) is
        replaced whole. Place it after ``format_exc_info`` (tracebacks are text by then) and
        before the renderer, as ``configure_logging(extra_processors=...)`` does.
        """
        value = self.value
        fields = self._fields

        def redact_event(
            logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
        ) -> MutableMapping[str, Any]:
            for key, val in event_dict.items():
                if isinstance(key, str) and normalise_field(key) in fields:
                    event_dict[key] = FIELD_MARK
                else:
                    event_dict[key] = value(val)
            return event_dict

        return redact_event




def redactor_for(settings: RedactionSettings, extra: Iterable[str] = ()) -> Redactor:
    """:meth:`Redactor.from_settings` plus ``extra`` patterns (the fleet's workflows' own,
    ``Workflow.redaction_patterns``, from ``turnfleet.registry``), applied after the settings'.

    Built once per distinct set of settings and patterns, so a reader may ask for it on every
    request: only a changed set builds (and compiles) a new one.
    """
    return _built(tuple(settings.redact_patterns), tuple(sorted(set(extra))),
                  tuple(settings.redact_fields), tuple(settings.redact_detectors))


@functools.lru_cache(maxsize=32)
def _built(patterns: tuple[str, ...], extra: tuple[str, ...], fields: tuple[str, ...],
           detectors: tuple[str, ...]) -> Redactor:
    return Redactor(patterns=(*patterns, *extra), fields=fields,
                    detectors=(*DETECTORS, *load_detectors(detectors)))


def outside_markers(scan: Callable[[str], str]) -> Callable[[str], str]:
    """``scan`` applied to the text between ``[REDACTED:…]`` markers, leaving them as they are.

    For an extra detector's ``scan`` (a named-entity recogniser, say): it sees the text after
    the built-in detectors, and must neither redact their markers nor find them again.
    """

    def between(s: str) -> str:
        if _MARKER_OPEN not in s:
            return scan(s)
        parts = _MARKER_SPLIT.split(s)
        for i in range(0, len(parts), 2):
            if parts[i]:
                parts[i] = scan(parts[i])
        return "".join(parts)

    return between


def load_detectors(specs: Sequence[str]) -> tuple[Detector, ...]:
    """Extra detectors from ``"module:callable"`` specs (``TURNFLEET_REDACT_DETECTORS``).

    Each callable is called once, without arguments, and returns a :class:`Detector` or an
    iterable of them; a spec that is malformed, cannot be imported or returns anything else is
    a ``ValueError`` naming it. This is the hook for a heavier detector (Presidio, a spaCy
    model): it runs in-process, so whatever it needs (a model package) must be installed
    beforehand; turnfleet downloads nothing.
    """
    if isinstance(specs, str):
        raise TypeError("specs is a sequence of strings, not one string")
    found: list[Detector] = []
    for spec in specs:
        module_name, _, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
        if not module_name or not attr:
            raise ValueError(f"redact detector {spec!r} is not 'module:callable'")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"redact detector {spec!r} cannot be loaded: {exc}") from None
        made = factory()
        try:
            items = [made] if isinstance(made, (Detector, str)) else list(made)
        except TypeError:
            items = [made]
        for item in items:
            if not isinstance(item, Detector):
                raise ValueError(f"redact detector {spec!r} returned {type(item).__name__}, "
                                 "not turnfleet.redaction.Detector")
        found += items
    return tuple(found)


_MARKER_KIND = re.compile(r"\[REDACTED:(\w{1,64})\]")


def detect(s: str) -> str | None:
    """The kind of secret the built-in detectors find first in ``s`` (``"email"``...), or None.

    For checks that refuse rather than redact (ids must be pseudonymous: ``models.check_new_id``).
    """
    redacted = _run(_BUILTIN_PLAN, s)
    if redacted == s:
        return None
    m = _MARKER_KIND.search(redacted)
    return m.group(1) if m else "custom"
