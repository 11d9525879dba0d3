"""Where this process's traces go during a test, through the Agents SDK's public API only.

The SDK offers no public read of a provider's processors, so a test does not save and restore
them: it installs a provider of its own for the test (``set_trace_provider``) and puts back
the one it found. What the code under test registers meanwhile (a worker's ``startup`` calls
``set_trace_processors``) lands in the test's provider and leaves with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from agents.tracing import TracingProcessor, get_trace_provider, set_trace_provider
from agents.tracing.provider import DefaultTraceProvider


class TestTraceProvider(DefaultTraceProvider):
    """The SDK's default provider, keeping the list of processors it was given so a test can
    see what the code under test installed."""

    __test__ = False  # not a test class, whatever pytest's name pattern says

    def __init__(self, processors: list[TracingProcessor]) -> None:
        super().__init__()
        self.processors: list[TracingProcessor] = []
        self.set_processors(processors)

    def register_processor(self, processor: TracingProcessor) -> None:
        super().register_processor(processor)
        self.processors.append(processor)

    def set_processors(self, processors: list[TracingProcessor]) -> None:
        super().set_processors(processors)
        self.processors = list(processors)


@contextmanager
def traces_to(*processors: TracingProcessor) -> Iterator[TestTraceProvider]:
    """Send the traces made inside the block to ``processors`` (none: nowhere), then restore
    the provider that was in place."""
    saved = get_trace_provider()
    provider = TestTraceProvider(list(processors))
    set_trace_provider(provider)
    try:
        yield provider
    finally:
        set_trace_provider(saved)


class Collector(TracingProcessor):
    """A real trace processor that keeps what the SDK hands it, for assertions."""

    def __init__(self) -> None:
        self.traces: list[dict] = []
        self.spans: list = []

    def on_trace_start(self, trace) -> None:
        pass

    def on_trace_end(self, trace) -> None:
        self.traces.append(trace.export())

    def on_span_start(self, span) -> None:
        pass

    def on_span_end(self, span) -> None:
        self.spans.append(span)

    def shutdown(self) -> None:
        pass

    def force_flush(self) -> None:
        pass
