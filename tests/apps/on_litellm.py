"""A two-agent workflow on LiteLLM (issue 16, "Models"): Front names ``litellm/openai/tf-front``
(the SDK's prefix, resolved by the worker), Accounts holds a ``LitellmModel`` object on
``openai/tf-back``. Both reach the tests' local OpenAI-compatible server through LiteLLM's own
client: Front by ``OPENAI_BASE_URL``/``OPENAI_API_KEY`` (LiteLLM's environment for its
``openai`` provider), Accounts by its ``base_url``, read here from ``TF_TEST_LITELLM_URL``."""

from __future__ import annotations

import os

from agents import Agent
from agents.extensions.models.litellm_model import LitellmModel

from tests.apps.scripted import reset_password
from turnfleet import App, Workflow

FRONT_MODEL = "litellm/openai/tf-front"
BACK_MODEL = "openai/tf-back"

accounts = Agent(name="Accounts", instructions="You reset passwords with reset_password.",
                 tools=[reset_password],
                 model=LitellmModel(model=BACK_MODEL, base_url=os.environ.get("TF_TEST_LITELLM_URL"),
                                    api_key="sk-test-dummy"))
front = Agent(name="Front", instructions="You route IT requests to Accounts.", handoffs=[accounts],
              model=FRONT_MODEL)
accounts.handoffs = [front]
app = App([Workflow(name="it-litellm", agent=front)])
