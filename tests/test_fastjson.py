"""turnfleet/fastjson.py: orjson's speed, json's output (what a trace record or a batch decodes to)."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone

import pytest

from turnfleet import fastjson


@dataclasses.dataclass
class Point:
    x: int


def test_it_decodes_to_what_json_dumps_writes_for_the_same_default() -> None:
    value = {"spans": [{"id": "span_1", "t": datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc), "p": Point(1),
                        "n": 1.5, "none": None, "ok": True, "é": "naïve café ✓"}], 3: "int key", None: "none key"}
    ours = fastjson.dumps(value, default=str)
    assert json.loads(ours) == json.loads(json.dumps(value, default=str, separators=(",", ":")))
    assert ours == json.dumps(value, default=str, separators=(",", ":"), ensure_ascii=False)  # compact, same text


def test_what_orjson_refuses_falls_back_to_json() -> None:
    big = {"n": 2 ** 70}
    assert json.loads(fastjson.dumps(big)) == big


def test_an_unknown_type_without_default_raises_type_error_as_json_does() -> None:
    with pytest.raises(TypeError):
        fastjson.dumps({"x": object()})


def test_the_fallback_writes_text_as_orjson_does_utf8_not_escapes() -> None:
    """What orjson refuses (a non-string key, an int past 64 bits) goes to json with the same
    text form as orjson's: a record's non-ASCII text is the same bytes whichever wrote it."""
    assert fastjson.dumps({"n": 2 ** 70, "é": "naïve ✓"}) == '{"n":1180591620717411303424,"é":"naïve ✓"}'
    assert fastjson.dumps({1: "ü", "k": "ü"}) == '{"1":"ü","k":"ü"}'
    assert fastjson.dumps({"k": "ü"}) == '{"k":"ü"}'
