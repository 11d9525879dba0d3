"""A worker's ``Runtime`` as the tests build it, to run turn jobs in this process (real Redis,
the real SDK): one definition for the tests that call ``run_turn`` directly (it was written
three times), and ``FlakyModel``, the real ``Model`` that fails once."""

from __future__ import annotations

from typing import Any

from agents.models.interface import Model

from turnfleet.queue import TurnQueue
from turnfleet.settings import WorkerProcessSettings
from turnfleet.workers.job import Runtime
from turnfleet.workers.model import OfflineModel
from turnfleet.workers.support_desk import builtin_app


def runtime(redis: Any, model: Model, *, worker_name: str = "test-worker",
            model_name: str = "turnfleet-offline", **settings: Any) -> dict[str, Any]:
    """arq's job context for ``run_turn``: a ``Runtime`` on ``redis`` with the Support Desk
    on ``model``; ``settings`` are ``WorkerProcessSettings`` fields."""
    return {"runtime": Runtime(
        settings=WorkerProcessSettings(**settings), redis=redis, queue=TurnQueue(redis),
        app=builtin_app(model), model_name=model_name, worker_name=worker_name,
    )}


class FlakyModel(OfflineModel):
    """The offline model, but call number ``fail_on`` raises a connection error once."""

    def __init__(self, fail_on: int) -> None:
        super().__init__()
        self.calls = 0
        self.fail_on = fail_on

    async def get_response(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        self.calls += 1
        if self.calls == self.fail_on:
            raise ConnectionError("model endpoint reset the connection")
        return await super().get_response(*args, **kwargs)
