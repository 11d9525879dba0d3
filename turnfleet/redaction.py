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
    JWTs, the token after ``Bearer``, and the value in ``api_key=…`` / ``password: …`` /
    ``"secret": "…"`` shapes (the word ``Bearer`` and the key stay readable).
``field``
    From :meth:`Redactor.value`: the whole value of a dict entry whose key is a sensitive
    field name.

User patterns (``TURNFLEET_REDACT_PATTERNS``) are regexes; the whole match is replaced and
the kind is the name of the pattern's named group if it has exactly one, else ``custom``.

A marker is never matched again, so redacting redacted output changes nothing.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
# Each detector is a regex behind a gate: byte strings of which one must occur in the text's
# gate view (UTF-8, ASCII letters lower-cased, ASCII digits turned into "0") before the regex
# runs at all. `bytes in bytes` scans at memchr speed, while a regex that may start at any
# letter or digit pays one engine attempt per position (one combined regex cost ~115 µs on a
# clean 500-character string; the gates cost a few µs). Each gate is a superset of its
# regex, so gating changes how fast nothing is found, never what is found.
#
# Boundaries are look-arounds so that digits inside our own ids (t_<hex>, trace_<hex>),
# stream ids (1732500000000-0), decimals and dates never start or end a match. Digit classes
# are [0-9], not \d: the gate view only maps ASCII digits.

_GATE_TABLE = bytes.maketrans(
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"0000000000abcdefghijklmnopqrstuvwxyz"
)

_NOT_AFTER = r"(?<![\w.+\-])"  # not glued to a word, a decimal point, a sign or a dash
_NOT_BEFORE = r"(?![\w]|[.\-][0-9])"  # not followed by a word character, nor by .5 or -0

_TOKEN = r"[A-Za-z0-9_\-]"

_PROVIDER_KEYS = re.compile(
    r"(?<![\w\-])(?:"
    r"sk-(?:proj-|svcacct-|admin-)?" + _TOKEN + r"{20,}+"  # OpenAI
    r"|[spr]k_(?:live|test)_[0-9A-Za-z]{10,}+"  # Stripe
    r"|gh[pousr]_[A-Za-z0-9]{20,}+"  # GitHub
    r"|github_pat_\w{22,}+"  # GitHub fine-grained
    r"|xox[abposr]-[A-Za-z0-9\-]{10,}+"  # Slack
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key id
    r"|AIza[0-9A-Za-z_\-]{35}"  # Google API key
    r"|eyJ" + _TOKEN + r"++\.eyJ" + _TOKEN + r"++\.[A-Za-z0-9_\-+/=]*+"  # JWT
    r")(?![\w\-])"
)
_PROVIDER_GATE = (
    b"sk-", b"k_live_", b"k_test_", b"ghp_", b"gho_", b"ghs_", b"ghu_", b"ghr_",
    b"github_pat_", b"xox", b"akia", b"asia", b"aiza", b"eyj",
)

# "Bearer <token>": the word stays, the token goes. Whether it looks like a token (has a
# digit or a symbol, or is 20+ characters) is decided in the replacement, so that prose
# ("Bearer authentication") stays.
_BEARER = re.compile(r"\b[Bb]earer[ \t]+(?P<tok>(?!\[REDACTED:)[A-Za-z0-9\-._~+/]{8,}+=*+)")
_BEARER_GATE = (b"bearer",)

# key=value, key: value, "key": "value", DB_PASSWORD=…, x-api-key: …; the value goes. The key
# may carry a prefix (preceded by _ or -), but a letter or digit before it means another word.
_KEY_VALUE = re.compile(
    r"(?<![A-Za-z0-9])(?i:api[_\-]?key|client[_\-]?secret|secret|(?:access|refresh)[_\-]?token"
    r"|token|password|passwd|pwd)[\"']?[ \t]*[:=][ \t]*(?![\"']?\[REDACTED:)"
    r"(?:\"(?P<dq>[^\"\n]+)\"|'(?P<sq>[^'\n]+)'|(?P<bare>[^\s\"'&,;)\]}]+))"
)
_KEY_VALUE_GATE = (b"key", b"secret", b"token", b"pass", b"pwd")
_KEY_VALUE_CONFIRM = re.compile(rb"(?:key|secret|token|passw(?:or)?d|pwd)[\"']?[ \t]*[:=]")

# Emails are found from the "@" (a literal the engine finds fast) forwards over the domain,
# and the local part is walked back by hand: a regex starting at the local part would be
# tried at every letter.
_EMAIL_DOMAIN = re.compile(
    r"@[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*"
    r"\.[A-Za-z]{2,24}(?![\w\-])"
)
_EMAIL_LOCAL_SYMBOLS = frozenset("._%+-")
_EMAIL_GATE = (b"@",)

_CARD = re.compile(
    _NOT_AFTER
    + r"(?:[2-6][0-9]{12,18}+"  # contiguous
    r"|[2-6][0-9]{3}(?P<sep>[ \-])[0-9]{4}(?P=sep)[0-9]{4}(?P=sep)[0-9]{1,4}+"  # 4-4-4-4
    r"(?P<tail>(?P=sep)[0-9]{3})?"  # 4-4-4-4-3
    r"|3[0-9]{3}(?P<asep>[ \-])[0-9]{6}(?P=asep)[0-9]{4,5}+)"  # Amex 4-6-5, Diners 4-6-4
    + _NOT_BEFORE
)
_CARD_GATE = (b"0" * 13, b"0000 0000", b"0000-0000")

_PHONE_NANP = re.compile(
    _NOT_AFTER
    + r"(?:1[ .\-]?)?"
    r"(?:\([0-9]{3}\)[ ]?[0-9]{3}[ .\-]"
    r"|[0-9]{3}-[0-9]{3}-"
    r"|[0-9]{3}\.[0-9]{3}\."
    r"|[0-9]{3} [0-9]{3} )"
    r"[0-9]{4}"
    + _NOT_BEFORE
)
_PHONE_NANP_GATE = (b"000-000-", b"000.000.", b"000 000 ", b"000)")

# "+" then digit groups split by single separators, with an optional "(area)"; at least 10
# digits, counted in the replacement (which keeps the pattern free of ambiguous backtracking).
_PHONE_INTL = re.compile(
    r"(?<![\w+])\+[0-9]++(?:[ .\-]?\([0-9]{1,4}+\)[ .\-]?[0-9]++)?(?:[ .\-][0-9]++)*+"
    + _NOT_BEFORE
)
_PHONE_INTL_GATE = (b"+",)
_PHONE_INTL_CONFIRM = re.compile(rb"\+0[0 .\-()]{9}")


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
    if tail and _luhn_ok(digits[: -len(tail) + 1]):
        # A 16-digit card followed by a separate 3-digit number.
        return _CARD_MARK + tail
    return raw


def _phone_intl(m: re.Match[str]) -> str:
    raw = m.group()
    return _PHONE_MARK if sum(ch.isdigit() for ch in raw) >= 10 else raw


def _splice(m: re.Match[str], group: str | None) -> str:
    """The match with only ``group`` replaced by the secret marker."""
    start, end = m.span()
    gstart, gend = m.span(group)
    s = m.string
    return s[start:gstart] + _SECRET_MARK + s[gend:end]


def _key_value(m: re.Match[str]) -> str:
    return _splice(m, m.lastgroup)


def _bearer(m: re.Match[str]) -> str:
    token = m.group("tok")
    if len(token) >= 20 or not token.isalpha():
        return _splice(m, "tok")
    return m.group()


def _emails(s: str) -> str:
    parts: list[str] = []
    pos = 0
    for m in _EMAIL_DOMAIN.finditer(s):
        at = m.start()
        start = at
        while start > pos and (s[start - 1].isalnum() or s[start - 1] in _EMAIL_LOCAL_SYMBOLS
                               or s[start - 1] == "_"):
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


_Pass = Callable[[str], str]
_DETECTORS: tuple[tuple[tuple[bytes, ...], re.Pattern[bytes] | None, _Pass], ...] = (
    # Order: the most specific first. A provider key after "Bearer " or "api_key=" becomes
    # one secret marker, and later passes skip what is already a marker.
    (_PROVIDER_GATE, None, functools.partial(_PROVIDER_KEYS.sub, _SECRET_MARK)),
    (_BEARER_GATE, None, functools.partial(_BEARER.sub, _bearer)),
    (_KEY_VALUE_GATE, _KEY_VALUE_CONFIRM, functools.partial(_KEY_VALUE.sub, _key_value)),
    (_EMAIL_GATE, None, _emails),
    (_CARD_GATE, None, functools.partial(_CARD.sub, _card)),
    (_PHONE_INTL_GATE, _PHONE_INTL_CONFIRM, functools.partial(_PHONE_INTL.sub, _phone_intl)),
    (_PHONE_NANP_GATE, None, functools.partial(_PHONE_NANP.sub, _PHONE_MARK)),
)


def _builtin(s: str) -> str:
    view = s.encode("utf-8", "surrogatepass").translate(_GATE_TABLE)
    for gate, confirm, redact in _DETECTORS:
        for needle in gate:
            if needle in view:
                if confirm is None or confirm.search(view) is not None:
                    s = redact(s)
                break
    return s


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

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> Redactor:
        """From ``redact_patterns`` and ``redact_fields`` (``TURNFLEET_REDACT_*``)."""
        return cls(patterns=settings.redact_patterns, fields=settings.redact_fields)

    # -- strings ------------------------------------------------------------------------------

    def text(self, s: str) -> str:
        """``s`` with every detected secret replaced by ``[REDACTED:<kind>]``."""
        if not s:
            return s
        s = _builtin(s)
        for pattern in self._patterns:
            s = pattern.apply(s)
        return s

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

        Strings go through :meth:`text`; dicts, lists, tuples and sets are copied recursively,
        string dict keys redacted as text; a dict entry whose key is a sensitive field name has
        its whole value replaced by ``[REDACTED:field]``. Numbers, booleans, ``None`` and bytes
        come back as they are (a 19-digit nanosecond timestamp is not a card). Any other object
        comes back as it is unless its ``str()`` carries a secret, in which case the redacted
        string replaces it.
        """
        if isinstance(obj, str):
            return self.text(obj)
        if obj is None or isinstance(obj, (bool, int, float, bytes, bytearray)):
            return obj
        if isinstance(obj, dict):
            out: dict[Any, Any] = {}
            for key, val in obj.items():
                if isinstance(key, str):
                    new_key = self._key(key)
                    if new_key is None:
                        out[self.text(key)] = FIELD_MARK
                        continue
                    out[new_key] = self.value(val)
                else:
                    out[key] = self.value(val)
            return out
        if isinstance(obj, list):
            return [self.value(v) for v in obj]
        if isinstance(obj, tuple):
            return tuple(self.value(v) for v in obj)
        if isinstance(obj, (set, frozenset)):
            return type(obj)(self.value(v) for v in obj)
        as_text = str(obj)
        redacted = self.text(as_text)
        return obj if redacted == as_text else redacted

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
    from turnfleet.settings import CommonSettings

    return Redactor.from_settings(CommonSettings())
