"""Hostile bodies against a real ``turnfleet serve``: every one gets a 4xx with the documented
JSON error body (``{"error", "message"}``), nothing is written, and the server's log has no
traceback. (Before: 100000 ``[`` gave a 500 with a ``RecursionError`` traceback, a lone
surrogate in a string a 500 when Redis could not encode it, any Content-Type was read as JSON.)
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.serve_process import turnfleet_serve
from turnfleet.auth import hash_key, new_key

OPERATOR = new_key()
HEADERS = {"Authorization": f"Bearer {OPERATOR}", "Content-Type": "application/json"}
DEEP = 100_000
TURN = {"conversation_id": "c-1", "customer_id": "C-100", "text": "hello"}


@pytest.fixture
def server(fleet_env, tmp_path):  # type: ignore[no-untyped-def]
    keys = [{"name": "ops", "sha256": hash_key(OPERATOR), "customers": ["*"]}]
    with turnfleet_serve(fleet_env, tmp_path / "serve.log", keys) as (url, proc):
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client, proc


def _error(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["error"] == code and isinstance(body["message"], str) and body["message"]
    return body


def _no_traceback(proc) -> None:  # type: ignore[no-untyped-def]
    log = proc.output()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


def _fields(body: dict[str, Any]) -> list[str]:
    return [e["field"] for e in body["errors"]]


DEEP_BODIES = [
    b"[" * DEEP,
    b'{"a":' * DEEP,
    b'{"conversation_id": "c-1", "customer_id": "C-100", "text": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    b'{"turns": ' + b"[" * DEEP,
]


async def test_deeply_nested_json_is_422_naming_the_body(server, redis):
    client, proc = server
    for path in ("/v1/turns", "/v1/turns:batch"):
        for raw in DEEP_BODIES:
            body = _error(client.post(path, content=raw, headers=HEADERS), 422, "validation")
            assert _fields(body) == ["body"] and "nested too deeply" in body["message"], (path, raw[:40])
    assert await redis.dbsize() == 0
    _no_traceback(proc)


SURROGATES = [
    ({**TURN, "text": "refund \ud800 please"}, "text"),
    ({**TURN, "text": "\udcff"}, "text"),  # what invalid UTF-8 in argv becomes
    ({**TURN, "metadata": {"channel": "\ud83d"}}, "metadata"),
    ({**TURN, "metadata": {"\udfff": "x"}}, "metadata"),
    ({**TURN, "conversation_id": "c-\ud800"}, "conversation_id"),
    ({**TURN, "turn_id": "\ud800"}, "turn_id"),
    ({**TURN, "\ud800": "x"}, "\\ud800"),  # an unknown field, named as it can be printed
]


async def test_lone_surrogates_are_422_naming_the_field(server, redis):
    client, proc = server
    for turn, field in SURROGATES:
        raw = json.dumps(turn).encode()  # ensure_ascii: the surrogate travels as a \ud800 escape
        one = _error(client.post("/v1/turns", content=raw, headers=HEADERS), 422, "validation")
        assert _fields(one) == [field], one
        batch = client.post("/v1/turns:batch", content=json.dumps({"turns": [turn, TURN]}).encode(),
                            headers=HEADERS)
        assert batch.status_code == 200, batch.text
        bad, good = batch.json()["results"]
        assert bad["status"] == 422 and [e["field"] for e in bad["errors"]] == [field], bad
        assert good["status"] in (200, 202)
    assert await redis.llen("tf:conv:{c-1}:turns") == len(SURROGATES)  # only the good items
    _no_traceback(proc)


NOT_JSON = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
            "application/xml", "application/jsonx", ""]


async def test_a_body_that_is_not_json_by_content_type_is_415(server, redis):
    client, proc = server
    for path, body in (("/v1/turns", TURN), ("/v1/turns:batch", {"turns": [TURN]})):
        for content_type in NOT_JSON:
            resp = client.post(path, content=json.dumps(body).encode(),
                               headers={**HEADERS, "Content-Type": content_type})
            _error(resp, 415, "unsupported_media_type")
    assert await redis.dbsize() == 0
    # JSON, with parameters or as a +json type, is read as JSON.
    for i, content_type in enumerate(["application/json; charset=utf-8", "Application/JSON",
                                      "application/vnd.turnfleet+json"]):
        resp = client.post("/v1/turns", content=json.dumps({**TURN, "turn_id": f"t-{i}"}).encode(),
                           headers={**HEADERS, "Content-Type": content_type})
        assert resp.status_code == 202, (content_type, resp.text)
    _no_traceback(proc)


async def test_a_stream_id_is_ascii_digits_and_nothing_else(server):
    client, proc = server
    for after in ("1700000000000-0\n", "\u0661\u0662\u0663-0", "1-\uff10", "1-0 ", " 1-0"):
        by_query = client.get("/v1/alerts", params={"after": after}, headers=HEADERS)
        assert _fields(_error(by_query, 422, "validation")) == ["after"], after
        if after != after.strip():
            continue  # a header cannot carry a newline, and its outer spaces are not its value
        by_header = client.get("/v1/alerts", params={"follow": "true"},
                               headers={**HEADERS, "Last-Event-ID": after.encode("utf-8")})
        assert _fields(_error(by_header, 422, "validation")) == ["Last-Event-ID"], after
    _no_traceback(proc)
