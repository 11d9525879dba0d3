"""Table 4b: HTTP enqueue load from a second process (``wrk``) against one ``turnfleet serve``.

``wrk`` (Debian's package; ``make bench`` installs it) runs a Lua script that posts a new
conversation each request (a counter per wrk thread), with an operator key. Afterwards the
bench counts the turns in Redis: every 202 must be one turn, so the rate is of turns really
enqueued, not of answers.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx

from turnfleet.auth import hash_key
from turnfleet.shell.fleet import FleetProcess, fleet_env, listening_socket

KEY = "tf_bench_operator_key_0123456789"

LUA = r"""
local counter = 0
local tid = 0
setup = function(thread)
  thread:set("tid", tid)
  tid = tid + 1
end
init = function(args)
  batch = tonumber(args[1]) or 0
end
request = function()
  counter = counter + 1
  local conv = "http-" .. tid .. "-" .. counter
  if batch > 0 then
    local items = {}
    for i = 1, batch do
      items[i] = '{"conversation_id":"' .. conv .. '-' .. i .. '","customer_id":"C-100","text":"Where is order 1043?"}'
    end
    return wrk.format("POST", "/v1/turns:batch", nil, '{"turns":[' .. table.concat(items, ",") .. ']}')
  end
  return wrk.format("POST", "/v1/turns", nil,
    '{"conversation_id":"' .. conv .. '","customer_id":"C-100","text":"Where is order 1043?"}')
end
"""


def wrk_path() -> str | None:
    return shutil.which("wrk")


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def parse_wrk(out: str) -> dict[str, float]:
    res: dict[str, float] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["req_s"] = float(m.group(1)) if m else 0.0
    m = re.search(r"(\d+) requests in", out)
    res["requests"] = float(m.group(1)) if m else 0.0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non2xx"] = float(m.group(1)) if m else 0.0
    for p in ("50", "99"):
        m = re.search(rf"^\s+{p}(?:\.000)?%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        res[f"p{p}_ms"] = _ms(*m.groups()) if m else float("nan")
    return res


def run(url: str, base: Path, tag: str, duration_s: int, connections: int, batch: int = 0) -> dict[str, float]:
    """Start ``turnfleet serve``, load it with wrk for ``duration_s``, count the turns."""
    import asyncio

    from redis.asyncio import Redis

    from turnfleet import keys

    env = fleet_env(url, {"TURNFLEET_API_KEYS": json.dumps([{"name": "bench", "sha256": hash_key(KEY),
                                                             "customers": ["*"]}]),
                          "TURNFLEET_LOG_LEVEL": "WARNING"})
    script = base / "post.lua"
    script.write_text(LUA)
    sock = listening_socket()  # requests queue on it until serve is up
    port = sock.getsockname()[1]
    proc = FleetProcess(f"serve-{tag}", ["serve", "--fd", str(sock.fileno())], env,
                        base / "logs" / f"serve-{tag}.log", pass_fds=(sock.fileno(),)).start()
    sock.close()
    try:
        if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code != 200:
            raise RuntimeError(f"serve did not start:\n{proc.output()[-2000:]}")
        cmd = [wrk_path() or "wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency",
               "-H", f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json",
               "-s", str(script), f"http://127.0.0.1:{port}", "--", str(batch)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60)
        if out.returncode != 0:
            raise RuntimeError(f"wrk failed: {out.stderr[-1000:]}")
        res = parse_wrk(out.stdout)
    finally:
        proc.stop()

    async def count() -> int:
        r = Redis.from_url(url)
        try:
            return int(await r.zcard(keys.ARQ_QUEUE))
        finally:
            await r.aclose()

    turns = asyncio.run(count())
    per = batch or 1
    ok = res["requests"] - res["non2xx"]
    # wrk does not count the requests still in flight when it stops (at most one per
    # connection), though the server may have enqueued them.
    if res["non2xx"] or not ok * per <= turns <= (ok + connections) * per:
        raise RuntimeError(f"HTTP {tag}: {res['non2xx']:.0f} non-2xx answers, {turns} turns queued "
                           f"for {ok:.0f} accepted requests of {per}")
    res["turns_s"] = res["req_s"] * per
    return res
