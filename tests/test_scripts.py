"""The Lua script loader (``turnfleet/scripts.py``) and the rules every script file follows.

Against the test's own redis-server: a script is run for real, never parsed only.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from turnfleet import keys
from turnfleet.scripts import LuaScript, ScriptError, load_script

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"turnfleet": "turnfleet", "workers": "turnfleet.workers", "telemetry": "turnfleet.telemetry"}
POSITIONAL = re.compile(r"\b(KEYS|ARGV)\s*\[")


def script_files() -> list[tuple[str, str]]:
    """(package, name) of every script file the product ships (fragments apart)."""
    return sorted(
        (package, path.stem)
        for folder, package in FOLDERS.items()
        for path in (ROOT / folder / "lua").glob("*.lua")
    )


def test_a_header_names_keys_and_args_and_the_body_reads_them_by_name():
    s = LuaScript.parse("t", "--! keys: a, b\n--! args: x, *more\n--! returns: one, two\nreturn {K.a, A.x}\n")
    assert (s.keys, s.args, s.returns) == (("a", "b"), ("x", "*more"), ("one", "two"))
    assert "local K = {a = KEYS[1], b = KEYS[2]}" in s.body
    assert "local A = {x = ARGV[1], more = {}}\nfor i = 2, #ARGV do A.more[i - 1] = ARGV[i] end\n" in s.body
    assert s.positional({"a": "ka", "b": "kb"}, {"x": 1, "more": [2, 3]}) == (["ka", "kb"], [1, 2, 3])
    assert s.named(["p", "q"]) == {"one": "p", "two": "q"}


@pytest.mark.parametrize("keys_, args_, message", [
    ({"a": 1}, {"x": 1}, "missing ['b']"),
    ({"a": 1, "b": 2, "c": 3}, {"x": 1}, "unknown ['c']"),
    ({"a": 1, "b": 2}, {}, "args missing ['x']"),
])
def test_a_call_with_a_missing_or_unknown_name_is_refused_naming_it(keys_, args_, message):
    s = LuaScript.parse("t", "--! keys: a, b\n--! args: x\nreturn 1\n")
    with pytest.raises(ScriptError, match=re.escape(message)):
        s.positional(keys_, args_)


@pytest.mark.parametrize("text, message", [
    ("--! keys: a, a\nreturn 1", "repeated"),
    ("--! keys: *a, b\nreturn 1", "only the last may be"),
    ("--! keys: a-b\nreturn 1", "bad name"),
    ("--! include: no_such_fragment\nreturn 1", "no Lua fragment 'no_such_fragment'"),
    ("--! keys: a\n--! keys: b\nreturn 1", "two '--! keys:' lines"),
])
def test_a_bad_header_is_refused_when_loaded(text, message):
    with pytest.raises(ScriptError, match=re.escape(message)):
        LuaScript.parse("t", text)


def test_a_missing_script_file_is_named():
    with pytest.raises(ScriptError, match="no Lua script 'nope'"):
        load_script("nope")


@pytest.mark.parametrize("package, name", script_files())
def test_every_script_file_loads_uses_its_names_and_indexes_nothing_by_position(package, name):
    """Each declared key and argument is read by name in the body, and the body never says
    ``KEYS[n]`` or ``ARGV[n]``: positions live in the header only."""
    script = load_script(name, package)
    text = (ROOT / next(f for f, p in FOLDERS.items() if p == package) / "lua" / f"{name}.lua").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    assert POSITIONAL.findall(body) == []
    unused = [n for n in script.keys if not re.search(rf"\bK\.{n.lstrip('*')}\b", body)]
    unused += [n for n in script.args if not re.search(rf"\bA\.{n.lstrip('*')}\b", body)]
    assert unused == []


async def test_the_renew_script_renews_only_the_running_attempts_lease(redis):
    renew = load_script("renew").bind(redis)
    await redis.hset(keys.turn("t-1"), mapping={"status": "running", "attempts": "2"})
    in_progress = keys.ARQ_IN_PROGRESS_PREFIX + "t-1"
    named = {"turn": keys.turn("t-1"), "in_progress": in_progress}
    assert await renew(keys=named, args={"attempt": 2, "lease_ms": 60_000, "token": "w#2"}) == 1
    assert await redis.get(in_progress) == "w#2"
    assert 0 < await redis.pttl(in_progress) <= 60_000
    # A stale attempt (1) renews nothing; nor does any attempt once the turn has ended.
    assert await renew(keys=named, args={"attempt": 1, "lease_ms": 60_000, "token": "w#1"}) == 0
    await redis.hset(keys.turn("t-1"), "status", "completed")
    assert await renew(keys=named, args={"attempt": 2, "lease_ms": 60_000, "token": "w#2"}) == 0
    assert await redis.get(in_progress) == "w#2"


async def test_an_included_fragment_and_a_rest_list_run_in_redis(redis):
    s = LuaScript.parse("t", "--! include: fence_check\n--! keys: turn\n--! args: fence, *extra\n"
                        "return {fence_check(K.turn, A.fence), #A.extra, A.extra[2]}\n").bind(redis)
    await redis.hset("tf:test:turn", mapping={"status": "running", "attempts": "3"})
    assert await s(keys={"turn": "tf:test:turn"}, args={"fence": "3", "extra": ["a", "b"]}) == ["ok", 2, "b"]
    assert await s(keys={"turn": "tf:test:turn"}, args={"fence": "2"}) == ["fenced", 0]  # Lua drops a trailing nil


async def test_a_rest_list_takes_more_values_than_lua_can_unpack(redis):
    """An erasure passes every key of a customer's turns: tens of thousands, past the ~8000
    values Lua's ``unpack`` can return at once."""
    s = LuaScript.parse("t", "--! keys: a, *rest\nreturn {#K.rest, K.rest[1], K.rest[#K.rest]}\n").bind(redis)
    assert await s(keys={"a": "x", "rest": [f"k{i}" for i in range(20_000)]}) == [20_000, "k0", "k19999"]


def test_no_lua_is_left_in_python_strings():
    """Every script is a .lua file: no product module calls Redis from Lua text of its own."""
    lua = re.compile(r"redis\.p?call\s*\(")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in (*FOLDERS, "producer", "shell", "bench")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if lua.search(line)
    ]
    assert offenders == []
