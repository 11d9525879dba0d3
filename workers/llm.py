"""Which model the agents call: the offline model by default, or any OpenAI-compatible endpoint.

A settings change (``TURNFLEET_MODEL_BASE_URL``, ``TURNFLEET_MODEL_NAME``,
``TURNFLEET_MODEL_API_KEY``, ``TURNFLEET_MODEL_API``) switches to OpenAI, vLLM, Ollama or a
LiteLLM proxy; nothing else changes.
"""

from __future__ import annotations

from agents.models.interface import Model

from turnfleet.settings import WorkerProcessSettings

OFFLINE_MODEL = "turnfleet-offline"


def make_model(settings: WorkerProcessSettings) -> Model:
    if settings.model_base_url is None and settings.model_name == OFFLINE_MODEL:
        from workers.model import OfflineModel

        return OfflineModel(model_name=OFFLINE_MODEL)
    from agents import OpenAIChatCompletionsModel, OpenAIResponsesModel
    from openai import AsyncOpenAI

    client = AsyncOpenAI(
        base_url=settings.model_base_url,
        api_key=settings.model_api_key or "not-needed",
        timeout=settings.turn_timeout_s,
        max_retries=2,
    )
    if settings.model_api == "responses":
        return OpenAIResponsesModel(model=settings.model_name, openai_client=client)
    return OpenAIChatCompletionsModel(model=settings.model_name, openai_client=client)
