"""Long-running processes freeze the heap they start with.

A worker or telemetry consumer imports a lot (the Agents SDK, pydantic's schemas, redis-py)
and builds its runtime once; none of that is ever garbage. CPython's cyclic collector still
walks all of it at every full collection, and the hot paths allocate enough (pydantic models
per event, dicts per aggregate op) to trigger one every few hundred turns: measured by
``make bench-compare``, that walk was most of what the typed event contract cost the consumer.
``gc.freeze()`` (Python 3.7+) moves every object alive now to a permanent generation the
collector skips; objects made later are collected as before. No collection first: it would
walk the whole heap once more (tens of ms in a process that already holds a lot), and what
little garbage startup leaves is kept, once.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Freeze every object alive now. Returns how many are frozen."""
    gc.freeze()
    return gc.get_freeze_count()
