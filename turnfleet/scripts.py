"""Lua scripts as files, called with named keys and arguments.

Every Redis script of the product is a ``.lua`` file shipped as package data, in the ``lua/``
folder beside the module that runs it (``turnfleet/lua/``, ``workers/lua/``,
``telemetry/lua/``). A file starts with a header that names what it takes::

    --! keys: turn, in_progress
    --! args: attempt, lease_ms, token
    --! returns: attempt, status          (optional: a list reply becomes a dict)
    --! include: fence_check             (optional: fragments from turnfleet/lua/fragments/)

The loader prepends the included fragments and a prologue binding ``K.turn = KEYS[1]``,
``A.attempt = ARGV[1]`` and so on, so a script body says ``K.turn`` and ``A.lease_ms``, never
``KEYS[1]`` or ``ARGV[3]``. A last name written ``*rest`` takes the remaining keys (or
arguments) as a Lua list (``K.rest``, ``A.rest``), for scripts that take a variable number.

From Python, ``script = load_script("renew")`` once (module level), ``bound = script.bind(redis)``
per client, then ``await bound(keys={...}, args={...})``: a missing or unknown name is a
``ValueError`` naming it before anything is sent. Fragments (``wake``, ``fence_check``,
``arq_job``...) are written once and included where needed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from turnfleet.connection import eval_raw

_HEADER = re.compile(r"^--!\s*(keys|args|returns|include)\s*:\s*(.*?)\s*$")
_NAME = re.compile(r"^\*?[A-Za-z_][A-Za-z0-9_]*$")
FRAGMENTS = "fragments"


class ScriptError(ValueError):
    """A script file, or a call of it, that does not match its header."""


def _names(value: str, where: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    for i, n in enumerate(names):
        if not _NAME.match(n) or (n.startswith("*") and i != len(names) - 1):
            raise ScriptError(f"{where}: bad name {n!r} (names are Lua identifiers; only the last may be *rest)")
    if len(set(n.lstrip("*") for n in names)) != len(names):
        raise ScriptError(f"{where}: a name is repeated in {value!r}")
    return names


def _bind_names(table: str, source: str, names: tuple[str, ...]) -> str:
    if not names:
        return f"local {table} = {{}}\n"
    fields, rest = [], ""
    for i, n in enumerate(names, 1):
        if n.startswith("*"):
            # A loop, not {unpack(...)}: Lua's unpack stops at ~8000 values (an erasure
            # passes every key of a customer's turns).
            fields.append(f"{n[1:]} = {{}}")
            rest = f"for i = {i}, #{source} do {table}.{n[1:]}[i - {i - 1}] = {source}[i] end\n"
        else:
            fields.append(f"{n} = {source}[{i}]")
    return f"local {table} = {{{', '.join(fields)}}}\n" + rest


@cache
def _fragment(name: str) -> str:
    path = resources.files("turnfleet").joinpath("lua", FRAGMENTS, f"{name}.lua")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScriptError(f"no Lua fragment {name!r} (turnfleet/lua/{FRAGMENTS}/{name}.lua)") from None


@dataclass(frozen=True)
class LuaScript:
    """One script file: its header and the body Redis runs (fragments and prologue included)."""

    name: str
    keys: tuple[str, ...]
    args: tuple[str, ...]
    returns: tuple[str, ...]
    body: str

    @classmethod
    def parse(cls, name: str, text: str) -> LuaScript:
        header: dict[str, str] = {}
        for line in text.splitlines():
            m = _HEADER.match(line)
            if m:
                if m.group(1) in header:
                    raise ScriptError(f"{name}: two '--! {m.group(1)}:' lines")
                header[m.group(1)] = m.group(2)
            elif line.strip() and not line.startswith("--"):
                break  # the header is the comments before the first statement
        keys_ = _names(header.get("keys", ""), f"{name} keys")
        args_ = _names(header.get("args", ""), f"{name} args")
        returns = _names(header.get("returns", ""), f"{name} returns")
        if any(n.startswith("*") for n in returns):
            raise ScriptError(f"{name} returns: *rest is not allowed there")
        includes = _names(header.get("include", ""), f"{name} include")
        body = "".join(_fragment(i) + "\n" for i in includes)
        body += _bind_names("K", "KEYS", keys_) + _bind_names("A", "ARGV", args_) + text
        return cls(name, keys_, args_, returns, body)

    def _positional(self, kind: str, names: tuple[str, ...], given: dict[str, Any]) -> list[Any]:
        fixed = [n for n in names if not n.startswith("*")]
        rest = names[-1][1:] if names and names[-1].startswith("*") else None
        expected = set(fixed) | ({rest} if rest else set())
        missing = [n for n in fixed if n not in given]
        unknown = sorted(set(given) - expected)
        if missing or unknown:
            raise ScriptError(f"{self.name}: {kind} missing {missing}, unknown {unknown} (header: {', '.join(names)})")
        out = [given[n] for n in fixed]
        if rest:
            out.extend(given.get(rest, ()))
        return out

    def positional(self, keys: dict[str, Any], args: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        """KEYS and ARGV lists for these named keys and arguments."""
        return self._positional("keys", self.keys, keys), self._positional("args", self.args, args)

    def named(self, reply: Any) -> Any:
        """A list reply as ``{name: value}`` when the header names what the script returns."""
        if not self.returns or not isinstance(reply, list | tuple):
            return reply
        if len(reply) != len(self.returns):
            raise ScriptError(f"{self.name}: replied {len(reply)} values, header names {len(self.returns)}")
        return dict(zip(self.returns, reply, strict=True))

    def bind(self, redis: Redis) -> BoundScript:
        return BoundScript(self, redis.register_script(self.body))


@dataclass(frozen=True)
class BoundScript:
    """A script registered on one client; call it with named keys and arguments."""

    script: LuaScript
    registered: AsyncScript

    async def __call__(self, keys: dict[str, Any] | None = None, args: dict[str, Any] | None = None,
                       client: Any = None) -> Any:
        k, a = self.script.positional(keys or {}, args or {})
        if client is not None:  # a pipeline: the reply comes from its execute()
            return await self.registered(keys=k, args=a, client=client)
        return self.script.named(await self.registered(keys=k, args=a))

    async def raw(self, redis: Redis, keys: dict[str, Any] | None = None,
                  args: dict[str, Any] | None = None) -> Any:
        """The reply as bytes (``RAW``): for scripts that return stored values to decode."""
        k, a = self.script.positional(keys or {}, args or {})
        return self.script.named(await eval_raw(redis, self.registered, k, a))


def load_script(name: str, package: str = "turnfleet") -> LuaScript:
    """``<package>/lua/<name>.lua``, parsed (once per process)."""
    return _load(name, package)


@cache
def _load(name: str, package: str) -> LuaScript:
    path = resources.files(package).joinpath("lua", f"{name}.lua")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScriptError(f"no Lua script {name!r} in {package} (lua/{name}.lua)") from None
    return LuaScript.parse(f"{package}:{name}", text)
