"""Redaction of what leaves a process as telemetry: span data, events, log lines, alerts.

Business data (the turn's text, the tool's real arguments, the stored result) is never
touched: redaction is a set of explicit calls (``Redactor.text``, ``.value``, ``.json_text``,
``.structlog_processor``) made where data becomes telemetry, not a global patch.

A detected secret becomes ``[REDACTED:<kind>]``. Built-in kinds:

``card``
    13–19 digits, contiguous or in the usual 4-4-4-4(-3) / 4-6-5 / 4-6-4 groups with one
    consistent space or dash, first digit 2–6 (Mastercard, Visa, Amex, Diners, JCB, Discover,
    UnionPay, Maestro), Luhn-valid. A number that fails Luhn is left alone.
``email``
    ``local@domain.tld``.
``phone``
    ``+`` followed by at least 10 digits (E.164, or grouped by spaces, dots or dashes, with an
    optional ``(area)``), and North American ``(415) 555-2671``, ``415-555-2671``,
    ``415.555.2671``, ``415 555 2671``, with an optional leading ``1``.
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

Not caught, on purpose: bare 10-digit phone numbers (``4155552671``, indistinguishable from
ids and amounts in cents), cards starting with 1, 7, 8 or 9 (no card network; epoch
timestamps start with 1), numbers held as ints rather than text, secrets without a known
prefix outside a ``key=value`` shape, and postal addresses or names.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

from turnfleet.settings import CommonSettings

__all__ = [
    "FIELD_MARK",
    "SENSITIVE_FIELDS",
    "Redactor",
    "default_redactor",
    "normalise_field",
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
# detector sits behind a gate, a few `in` checks that mostly look for one character (a memchr)
# before a longer needle, and every pattern starts with a literal or a character class, so the
# engine's own first-character scan skips the text between candidates. Look-behinds that
# check what precedes a match come after that first character, not before it (a leading
# look-behind would switch the scan off). Each gate is a superset of its pattern, so gating
# changes how fast nothing is found, never what is found; the tests compare against the
# ungated patterns.
#
# The digit detectors gate on a view of the text with ASCII letters lower-cased and ASCII
# digits turned into "0" (which is why their classes are [0-9], not \d).
#
# Boundaries are look-arounds so that digits inside our own ids (t_<hex>, trace_<hex>),
# stream ids (1732500000000-0), decimals and dates never start or end a match.

_GATE_TABLE = bytes.maketrans(
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"0000000000abcdefghijklmnopqrstuvwxyz"
)


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
    r"\.[A-Za-z]{2,24}(?![\w\-])"
)
_EMAIL_LOCAL_SYMBOLS = frozenset("._%+-")

# Cards: first digit 2–6 (the card networks; epoch timestamps start with 1), then the
# character before it must not be a word character, ".", "+" or "-".
_CARD = re.compile(
    r"[2-6](?<![\w.+\-\]].)(?:"
    r"[0-9]{12,18}+"  # contiguous
    r"|[0-9]{3}(?P<sep>[ \-])[0-9]{4}(?P=sep)[0-9]{4}(?P=sep)[0-9]{1,4}+"  # 4-4-4-4
    r"(?P<tail>(?P=sep)[0-9]{3})?"  # 4-4-4-4-3
    r"|(?<=3)[0-9]{3}(?P<asep>[ \-])[0-9]{6}(?P=asep)[0-9]{4,5}+"  # Amex 4-6-5, Diners 4-6-4
    r")" + _NOT_BEFORE
)
_CARD_GATE = ("0000000000000", "0000 0000", "0000-0000")

# "+" then digit groups split by single separators, with an optional "(area)"; at least 10
# digits, counted in the replacement (which keeps the pattern free of ambiguous backtracking).
_PHONE_INTL = re.compile(
    r"\+(?<![\w+\]]\+)[0-9]++(?:[ .\-]?\([0-9]{1,4}+\)[ .\-]?[0-9]++)?(?:[ .\-][0-9]++)*+"
    + _NOT_BEFORE
)
_PHONE_INTL_GATE = re.compile(r"\+0[0 .\-()]{9}")

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


def _phone_intl(m: re.Match[str]) -> str:
    raw = m.group()
    return _PHONE_MARK if sum(ch.isdigit() for ch in raw) >= 10 else raw


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


# --- passes ---------------------------------------------------------------------------------


def _provider_keys(s: str) -> str:
    if "-" in s:
        if "sk-" in s:
            s = _OPENAI.sub(_SECRET_MARK, s)
        if "xox" in s:
            s = _SLACK.sub(_SECRET_MARK, s)
    if "_" in s:
        if "k_live_" in s or "k_test_" in s:
            s = _STRIPE.sub(_SECRET_MARK, s)
        if "github_pat_" in s or ("gh" in s and _GITHUB_GATE.search(s) is not None):
            s = _GITHUB.sub(_SECRET_MARK, s)
    if "A" in s and ("AKIA" in s or "ASIA" in s or "AIza" in s):
        s = _AWS_GOOGLE.sub(_SECRET_MARK, s)
    if "J" in s and "eyJ" in s:
        s = _JWT.sub(_SECRET_MARK, s)
    return s


def _first(v: str, needles: tuple[str, ...]) -> int:
    """Where the first of ``needles`` occurs in ``v``, or -1."""
    first = -1
    for needle in needles:
        at = v.find(needle)
        if at >= 0 and (first < 0 or at < first):
            first = at
    return first


def _sub_from(pattern: re.Pattern[str], repl: Any, s: str, at: int) -> str:
    """``pattern.sub(repl, s)``, for a pattern that cannot match before ``at - 4``.

    A digit pass is often gated in by something harmless (an epoch timestamp); starting the
    scan near the gate's hit saves most of the work. View positions are positions in ``s``
    only when ``s`` is ASCII; otherwise the scan starts at 0. The 4 characters kept before
    ``at`` cover a leading "1 " and the character a look-behind inspects.
    """
    start = at - 4
    if start <= 0 or not s.isascii():
        return pattern.sub(repl, s)
    return s[:start] + pattern.sub(repl, s[start:])


def _digits(s: str) -> str:
    v = _gate_view(s)
    if "0" not in v:
        return s
    at = _first(v, _CARD_GATE)
    if at >= 0:
        redacted = _sub_from(_CARD, _card, s, at)
        if redacted != s:
            s, v = redacted, _gate_view(redacted)  # keep view positions in line with s
    if "+" in s:
        m = _PHONE_INTL_GATE.search(v)
        if m is not None:
            redacted = _sub_from(_PHONE_INTL, _phone_intl, s, m.start())
            if redacted != s:
                s, v = redacted, _gate_view(redacted)
    at = _first(v, _PHONE_NANP_GATE)
    if at >= 0:
        s = _sub_from(_PHONE_NANP, _PHONE_MARK, s, at)
    return s


def _builtin(s: str) -> str:
    """Every built-in detector, most specific first.

    A provider key after "Bearer " or "api_key=" thus becomes one secret marker, and the later
    passes skip what is already a marker.
    """
    s = _provider_keys(s)
    if "earer" in s:
        s = _BEARER.sub(_bearer, s)
    if ":" in s:
        s = _KEY_VALUE_COLON.sub(_key_value, s)
    if "=" in s:
        s = _KEY_VALUE_EQUALS.sub(_key_value, s)
    if "@" in s:
        if "://" in s:
            s = _URL_CREDENTIALS.sub(_url_credentials, s)
        s = _emails(s)
    return _digits(s)


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


TEXT_CACHE_MIN_CHARS = 64  # shorter strings are cheap to redact and mostly unique (ids)
TEXT_CACHE_ENTRIES = 4096


class Redactor:
    """Finds secrets and personal data in telemetry and replaces them with markers.

    Cheap to share between threads and tasks: construction compiles the user patterns once
    (an invalid one raises ``ValueError`` naming it), and no method changes its argument.
    """

    _KEY_CACHE_SIZE = 4096

    def __init__(self, patterns: Sequence[str] = (), fields: Sequence[str] = ()) -> None:
        if isinstance(patterns, str) or isinstance(fields, str):
            raise TypeError("patterns and fields are sequences of strings, not one string")
        self._patterns = tuple(_UserPattern(p) for p in patterns)
        self._fields = frozenset(normalise_field(f) for f in (*SENSITIVE_FIELDS, *fields))
        # Dict keys repeat (they are the telemetry's schema): remember what each one becomes,
        # None meaning "sensitive field".
        self._keys: dict[str, str | None] = {}
        # Long strings repeat too: every generation span carries the agent's instructions and
        # the conversation so far. Remember the latest results (cleared when full).
        self._texts: dict[str, str] = {}

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> Redactor:
        """From ``redact_patterns`` and ``redact_fields`` (``TURNFLEET_REDACT_*``)."""
        return cls(patterns=settings.redact_patterns, fields=settings.redact_fields)

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
        return _builtin(s)

    def json_text(self, s: str) -> str:
        """A JSON object or array held in a string, redacted by :meth:`value`, dumped compactly.

        Anything else (plain text, broken JSON, a bare JSON number or string) goes through
        :meth:`text`, so that ``"89.00"`` stays ``"89.00"``.
        """
        if s.lstrip()[:1] in ("{", "["):
            try:
                parsed = json.loads(s)
            except ValueError:
                pass
            else:
                return json.dumps(self.value(parsed), ensure_ascii=False, separators=(",", ":"))
        return self.text(s)

    # -- structures ---------------------------------------------------------------------------

    def is_sensitive_field(self, name: str) -> bool:
        """Whether a dict entry under ``name`` is replaced whole by ``[REDACTED:field]``."""
        return normalise_field(name) in self._fields

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
        if isinstance(obj, str):
            return self.text(obj)
        if obj is None or isinstance(obj, (bool, int, float, bytes, bytearray)):
            return obj
        if isinstance(obj, dict):
            return self._mapping(obj)
        if isinstance(obj, list):
            return [self.value(v) for v in obj]
        if isinstance(obj, tuple):
            return tuple(self.value(v) for v in obj)
        if isinstance(obj, (set, frozenset)):
            return type(obj)(self.value(v) for v in obj)
        if isinstance(obj, Mapping):
            return self._mapping(obj)
        as_text = str(obj)
        redacted = self.text(as_text)
        return obj if redacted == as_text else redacted

    def _mapping(self, obj: Mapping[Any, Any]) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key, val in obj.items():
            if isinstance(key, str):
                new_key = self._key(key)
                if new_key is None:
                    out[key] = FIELD_MARK
                else:
                    out[new_key] = self.value(val)
            else:
                out[key] = self.value(val)
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


@functools.lru_cache(maxsize=1)
def default_redactor() -> Redactor:
    """The redactor for this process's ``TURNFLEET_REDACT_*`` settings, built once."""
    return Redactor.from_settings(CommonSettings())
