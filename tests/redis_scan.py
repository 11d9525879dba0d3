"""Read every key of a Redis: what the erasure test (and later ones) assert with.

``find_mentions`` reads every key of each server — its name and every value of strings,
hashes, lists, sets, zsets (members) and streams (every field and value of every entry) — as
raw bytes, and reports each place a needle occurs. Nothing is sampled: a key of a kind added
later is read too, so a test that says "no mention of X anywhere" keeps meaning it.
``dump_keys`` is every key and its whole value as text: "nothing changed" is two equal dumps.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence

from redis.asyncio import Redis

CHUNK = 500


async def _values(redis: Redis, key: bytes) -> list[bytes]:
    kind = (await redis.type(key)).decode()
    if kind == "string":
        value = await redis.get(key)
        return [value] if value is not None else []
    if kind == "hash":
        return [x for pair in (await redis.hgetall(key)).items() for x in pair]
    if kind == "list":
        return list(await redis.lrange(key, 0, -1))
    if kind == "set":
        return list(await redis.smembers(key))
    if kind == "zset":
        return list(await redis.zrange(key, 0, -1))
    if kind == "stream":
        out: list[bytes] = []
        start: bytes | str = "-"
        while True:
            page = await redis.xrange(key, min=start, max="+", count=CHUNK)
            for entry_id, fields in page:
                out.append(entry_id)
                out += [x for pair in fields.items() for x in pair]
            if len(page) < CHUNK:
                return out
            start = b"(" + page[-1][0]
    if kind == "none":  # expired or deleted between SCAN and TYPE
        return []
    raise AssertionError(f"key {key!r} has a type the scan does not read: {kind}")


async def find_mentions(urls: Sequence[str], needles: Iterable[str],
                        except_prefixes: Sequence[str] = ()) -> list[str]:
    """``"<url> <key>: <needle> in name|value"`` for every occurrence of a needle, in every key
    of every server (keys starting with one of ``except_prefixes`` are not read)."""
    wanted = [(n, n.encode()) for n in needles]
    skip = tuple(p.encode() for p in except_prefixes)
    found: list[str] = []
    for url in urls:
        redis = Redis.from_url(url)  # raw bytes: nothing is decoded away
        try:
            async for key in redis.scan_iter(count=1000):
                if skip and key.startswith(skip):
                    continue
                values = await _values(redis, key)
                for text, raw in wanted:
                    if raw in key:
                        found.append(f"{url} {key.decode(errors='replace')}: {text} in name")
                    if any(raw in v for v in values):
                        found.append(f"{url} {key.decode(errors='replace')}: {text} in value")
        finally:
            await redis.aclose()
    return found


async def dump_keys(redis: Redis, skip: Callable[[str], bool] = lambda key: False) -> dict[str, str]:
    """Every key (but those ``skip`` names) and its whole value, as text."""
    out = {}
    async for key in redis.scan_iter(count=1000):
        if skip(key):
            continue
        kind = await redis.type(key)
        if kind == "string":
            value = await redis.get(key)
        elif kind == "hash":
            value = await redis.hgetall(key)
        elif kind == "list":
            value = await redis.lrange(key, 0, -1)
        elif kind == "set":
            value = sorted(await redis.smembers(key))
        elif kind == "zset":
            value = await redis.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = await redis.xrange(key)
        else:
            value = kind
        out[key] = json.dumps(value, default=str)
    return out
