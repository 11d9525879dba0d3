"""API keys for the HTTP API: who may act for which customers.

Keys are configured as SHA-256 digests (``TURNFLEET_API_KEYS`` or ``TURNFLEET_API_KEYS_FILE``),
never in clear; a presented key is hashed and compared against every configured digest with
``hmac.compare_digest``, so the comparison takes the same time whichever key (if any) it
matches. A key is bound to customer ids, or to ``*`` (an operator key that sees everything).

Rotation without a restart: the keys file is re-read when its modification time changes,
checked every ``api_keys_reload_s`` seconds and at once on SIGHUP (``KeyStore.reload``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydantic import TypeAdapter, ValidationError

from turnfleet.settings import ApiKey, ProducerSettings

log = structlog.get_logger(__name__)

_KEYS = TypeAdapter(list[ApiKey])
KEY_PREFIX = "tfk_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random key (shown once; only its digest is stored)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a named key and the customers it may act for."""

    name: str
    customers: frozenset[str]
    unredacted: bool = False  # may ask for text as written (?unredacted=true); audited

    @property
    def operator(self) -> bool:
        return "*" in self.customers

    def may(self, customer_id: str | None) -> bool:
        """May act for this customer. ``None`` (fleet-wide things) is for operators only."""
        if self.operator:
            return True
        return customer_id is not None and customer_id in self.customers


class KeysFileError(ValueError):
    """The keys file cannot be used at start-up (missing, unreadable, not a list of keys)."""


class KeyStore:
    """The configured keys; ``authenticate`` maps a presented key to a ``Principal``.

    The keys file must be usable when the store is made: a server that started with no keys
    would look healthy and answer every request 401, so ``KeysFileError`` (naming the file)
    stops it instead. Later reloads of a file that has become unusable keep the last good
    keys and log ``auth.keys_file_unreadable``.
    """

    def __init__(self, settings: ProducerSettings) -> None:
        self.settings = settings
        self._keys: list[ApiKey] = []
        self._file_mtime: float | None = None
        self.reloaded = asyncio.Event()  # set by every reload (SIGHUP and file changes are async)
        self._load(at_start=True)

    def reload(self) -> None:
        """Re-read the keys: settings' list plus the keys file (if set and readable)."""
        self._load(at_start=False)

    def _load(self, at_start: bool) -> None:
        keys = list(self.settings.api_keys)
        path: Path | None = self.settings.api_keys_file
        if path is not None:
            try:
                mtime = path.stat().st_mtime
                keys += _KEYS.validate_python(json.loads(path.read_text()))
            except (OSError, ValueError) as exc:
                if at_start:
                    raise KeysFileError(f"TURNFLEET_API_KEYS_FILE {str(path)!r} cannot be used: "
                                        f"{_why(exc)}") from None
                with contextlib.suppress(OSError):
                    self._file_mtime = path.stat().st_mtime  # not re-read until it changes again
                log.error("auth.keys_file_unreadable", path=str(path), error=_why(exc),
                          action=f"kept the last good {len(self._keys)} keys")
                return  # keep the last good set rather than locking everyone out
            self._file_mtime = mtime
        self._keys = keys
        self.reloaded.set()
        log.info("auth.keys_loaded", count=len(keys))

    def reload_if_changed(self) -> bool:
        path = self.settings.api_keys_file
        if path is None:
            return False
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return False
        if mtime != self._file_mtime:
            self.reload()
            return True
        return False

    def authenticate(self, presented: str | None) -> Principal | None:
        if not presented:
            return None
        digest = hash_key(presented)
        found: ApiKey | None = None
        for key in self._keys:  # no early exit: the time does not depend on which key matched
            if hmac.compare_digest(digest, key.sha256.lower()):
                found = key
        if found is None:
            return None
        return Principal(found.name, frozenset(found.customers), found.unredacted)


def _why(exc: BaseException) -> str:
    """One line: what is wrong with the keys file (pydantic's first error, not all of them)."""
    if isinstance(exc, ValidationError):
        first = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "document"
        return f"not a JSON list of keys ({where}: {first['msg']})"
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON ({exc})"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)
