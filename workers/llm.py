"""Which model the agents call: the offline model by default, or any OpenAI-compatible endpoint.

Per workflow (``app_models``): a workflow's agents that name no model run on the workflow's
``model``, else the worker's; offline, on the ``OfflineModel`` following the workflow's
``offline_script``. Per agent: an agent's own ``model`` (a name, or a ``Model`` object, which
it keeps); ``litellm/<provider>/<model>`` names run the SDK's LiteLLM model.

A settings change (``TURNFLEET_MODEL_BASE_URL``, ``TURNFLEET_MODEL_NAME``,
``TURNFLEET_MODEL_API_KEY``, ``TURNFLEET_MODEL_API`` = ``chat`` | ``responses``) switches to
OpenAI, vLLM, Ollama or a LiteLLM proxy; nothing else changes.

What a caller may rely on for an endpoint model:

- **Timeout.** Each HTTP request to the endpoint is bounded by ``model_timeout_s`` (connect,
  read, write and pool each; a server that sends nothing for that long times out).
- **Retries inside one model call**, by the ``openai`` client itself (``max_retries =
  model_max_retries``): on 408, 409, 429 and 5xx answers, timeouts and connection errors, with
  exponential backoff and jitter (0.5 s × 2^n, at most 8 s, minus up to 25 %), honouring a
  server's ``Retry-After`` / ``retry-after-ms`` (up to the client's cap) and
  ``x-should-retry``. Only the answer that finally succeeds reaches the SDK: one model call is
  one ``llm_end`` with that answer's usage (``requests == 1``) and one generation span,
  whatever was retried underneath; when the retries run out, the last error propagates and
  the turn attempt fails (the job decides whether another attempt runs).
- **Malformed answers.** A 2xx answer whose body is not JSON, or is JSON without the shape of
  a Chat Completion (``choices``, each with a ``message``) or a Response (``output``), raises
  :class:`MalformedModelResponse` (an ``openai.APIResponseValidationError``) naming the
  endpoint, the content type and the start of the body. Without this check the SDK would fail
  with an ``AttributeError`` deep inside its converter, or read a schema-less body as "no
  choices" and raise ``ModelBehaviorError``, which the job treats as deterministic. The
  ``openai`` client does not retry it (a response did arrive); it is transient for the job
  (:func:`is_transient_model_error`).
- **Tracing.** The SDK's OpenAI models open their own generation spans (model, config, usage,
  and input/output when sensitive data is included). Nothing here registers the client or
  its key for trace export (no ``set_default_openai_client``); the worker replaces the SDK's
  processors with its own at startup, so no trace goes to api.openai.com.

Why the ``openai`` client's retries and not the Agents SDK's runner-managed retries
(``ModelSettings(retry=ModelRetrySettings(...))``, ``agents/retry.py``): the client's loop is
the long-standing, widely used one, and it retries *below* the SDK, so the SDK sees one call.
The runner's loop (opt-in and recent) adds each failed request to the response's
``usage.requests`` as a zero-token request entry, so ``requests`` would no longer equal the
number of ``llm_end`` events telemetry counts (the audit compares them); it is configured per
agent or per run (``ModelSettings``/``RunConfig``), not with the model; and on a first attempt
it keeps the client's own retries on, so both layers would multiply. Its one advantage, a
configurable backoff base, does not outweigh that: tests keep retry time small with a low
``TURNFLEET_MODEL_MAX_RETRIES`` and servers that send ``Retry-After``.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from typing import TYPE_CHECKING, Any

import openai
import structlog
from agents.models.interface import Model, ModelProvider

from turnfleet.offline_script import Script
from turnfleet.settings import WorkerProcessSettings
from turnfleet.workflow import App, Workflow, WorkflowError

if TYPE_CHECKING:
    import httpx2  # the openai client's HTTP library

log = structlog.get_logger(__name__)

OFFLINE_MODEL = "turnfleet-offline"
FLAWED_OFFLINE_MODEL = "turnfleet-offline-flawed"  # the Desk's script with a planted wrong refund
OFFLINE_MODELS = (OFFLINE_MODEL, FLAWED_OFFLINE_MODEL)
LITELLM_PREFIX = "litellm/"  # the SDK's MultiProvider prefix for its LiteLLM models
MODEL_APIS = ("chat", "responses")
MODEL_HTTP = ("aiohttp", "httpx")
_clients: weakref.WeakKeyDictionary[Model, openai.AsyncOpenAI] = weakref.WeakKeyDictionary()  # what close_models closes
BODY_SNIPPET_CHARS = 200

# Answers of these statuses are worth another try (the openai client retries the same set).
TRANSIENT_STATUSES = frozenset({408, 409, 429})


class MalformedModelResponse(openai.APIResponseValidationError):
    """The endpoint answered 2xx with a body that is not a Chat Completion / Response.

    Transient: a proxy's error page, a truncated body or an overloaded server's junk is not
    what the same request gets next time. ``body`` holds the decoded JSON when it parsed,
    else the raw text; ``status_code`` the HTTP status.
    """


def runs_offline(settings: WorkerProcessSettings) -> bool:
    """No endpoint configured and an offline model named: the fleet runs offline."""
    return settings.model_base_url is None and settings.model_name in OFFLINE_MODELS


def offline_script(model_name: str, script: Script | None) -> Script | None:
    """The script the offline model named ``model_name`` follows for a workflow whose script is
    ``script`` (None: the built-in app's). ``turnfleet-offline-flawed`` swaps the Desk's script
    for its flawed variant (``SUPPORT_DESK_FLAWED_SCRIPT``); other scripts run as they are."""
    if model_name != FLAWED_OFFLINE_MODEL:
        return script
    from turnfleet.workers.support_desk_script import (
        SUPPORT_DESK_FLAWED_SCRIPT,
        SUPPORT_DESK_SCRIPT,
    )

    return SUPPORT_DESK_FLAWED_SCRIPT if script is None or script is SUPPORT_DESK_SCRIPT else script


def http_client_class(transport: str) -> type[Any]:
    """The openai client's HTTP client class for ``TURNFLEET_MODEL_HTTP``: its aiohttp transport
    (the same httpx2 API, hooks and timeouts; less CPU a request: BENCHMARKS.md table 2b) or its
    httpx default."""
    return openai.DefaultAioHttpClient if transport == "aiohttp" else openai.DefaultAsyncHttpxClient


def make_model(settings: WorkerProcessSettings, script: Script | None = None) -> Model:
    """The worker's model, from settings (see the module docstring); offline, the
    ``OfflineModel`` following ``script`` (default: the built-in app's, the Desk's)."""
    if runs_offline(settings):
        from turnfleet.workers.model import OfflineModel

        return OfflineModel(model_name=settings.model_name,
                            script=offline_script(settings.model_name, script))
    if settings.model_api not in MODEL_APIS:
        raise ValueError(
            f"TURNFLEET_MODEL_API must be one of {', '.join(MODEL_APIS)}, not {settings.model_api!r}"
        )
    if settings.model_http not in MODEL_HTTP:
        raise ValueError(
            f"TURNFLEET_MODEL_HTTP must be one of {', '.join(MODEL_HTTP)}, not {settings.model_http!r}"
        )
    from agents import OpenAIChatCompletionsModel, OpenAIResponsesModel

    client = openai.AsyncOpenAI(
        base_url=settings.model_base_url,
        # A local endpoint usually wants no key, but the client insists on one; without a
        # base URL the client reads OPENAI_API_KEY itself, and fails at startup if unset.
        api_key=settings.model_api_key or ("not-needed" if settings.model_base_url else None),
        timeout=settings.model_timeout_s,
        max_retries=settings.model_max_retries,
        http_client=http_client_class(settings.model_http)(
            event_hooks={"response": [check_model_response]}
        ),
    )
    log.info(
        "model.endpoint",
        model=settings.model_name,
        api=settings.model_api,
        base_url=str(client.base_url),
        timeout_s=settings.model_timeout_s,
        max_retries=settings.model_max_retries,
    )
    model: Model
    if settings.model_api == "responses":
        model = OpenAIResponsesModel(model=settings.model_name, openai_client=client)
    else:
        model = OpenAIChatCompletionsModel(model=settings.model_name, openai_client=client)
    _clients[model] = client
    return model


async def close_models() -> None:
    """Close the HTTP client of every model this process made (the worker's shutdown): an
    aiohttp session left open holds its connections and warns when collected."""
    for model in list(_clients):
        client = _clients.pop(model, None)
        if client is not None:
            with contextlib.suppress(Exception):  # a client that cannot close has nothing left to free
                await client.close()


class WorkerModels(ModelProvider):
    """The models of one workflow's agents that name one, or none, instead of holding a
    ``Model`` object (a team's agents need not build clients); the attempt passes it to the
    SDK as ``RunConfig.model_provider``. Agents holding a ``Model`` object keep it.

    - none: the workflow's ``model`` (a name, resolved as below, or a ``Model`` object), else
      the worker's model (``TURNFLEET_MODEL_NAME``);
    - ``litellm/<provider>/<model>``: the SDK's LiteLLM model for that provider (the
      ``turnfleet[litellm]`` extra), as the SDK's own ``MultiProvider`` resolves the prefix;
    - the worker's model name: the worker's model; any other name: the same endpoint under
      that name, built once per name.

    Offline (no ``TURNFLEET_MODEL_BASE_URL``, model ``turnfleet-offline`` or
    ``turnfleet-offline-flawed``) every name is the ``OfflineModel`` under that name, following
    the workflow's ``offline_script`` (``offline_script()``: the flawed name, its flawed variant).
    ``default_name`` is what a call of an agent naming no model is counted under.
    """

    def __init__(self, settings: WorkerProcessSettings, default: Model | None = None, *,
                 script: Script | None = None, workflow_model: str | Model | None = None) -> None:
        from turnfleet.workers.hooks import model_name_of

        self.settings = settings
        self.script = script
        self._made: dict[str, Model] = {}
        self.worker_model = default if default is not None else make_model(settings, script)
        if isinstance(workflow_model, Model):
            self.default = workflow_model
        else:
            self.default = self.get_model(workflow_model) if workflow_model else self.worker_model
        self.default_name = model_name_of(workflow_model, settings.model_name)

    def get_model(self, model_name: str | None) -> Model:
        if not model_name:
            return self.default
        if model_name == self.settings.model_name:
            return self.worker_model
        model = self._made.get(model_name)
        if model is None:
            if model_name.startswith(LITELLM_PREFIX):
                from agents.extensions.models.litellm_provider import LitellmProvider

                model = LitellmProvider().get_model(model_name.removeprefix(LITELLM_PREFIX))
            elif runs_offline(self.settings):
                from turnfleet.workers.model import OfflineModel

                model = OfflineModel(model_name=model_name,
                                     script=offline_script(model_name, self.script))
            else:
                model = make_model(self.settings.model_copy(update={"model_name": model_name}))
            self._made[model_name] = model
        return model


def needs_script(workflow: Workflow, settings: WorkerProcessSettings) -> list[str]:
    """The agents of ``workflow`` that would run the offline model (they hold no ``Model``
    object) when the fleet runs offline; empty when it does not, or when none would."""
    if not runs_offline(settings):
        return []
    on_default = not isinstance(workflow.model, Model) and not (
        isinstance(workflow.model, str) and workflow.model.startswith(LITELLM_PREFIX))
    return [name for name, agent in workflow.agents.items()
            if (agent.model is None and on_default)
            or (isinstance(agent.model, str) and not agent.model.startswith(LITELLM_PREFIX))]


def check_offline_scripts(app: App, settings: WorkerProcessSettings) -> None:
    """Refuse (``WorkflowError``, one line naming the workflow) a workflow whose agents would
    run the offline model without a script: they would follow another workflow's decisions
    and silently never call their own tools."""
    for workflow in app.workflows:
        agents = needs_script(workflow, settings) if workflow.offline_script is None else []
        if agents:
            raise WorkflowError(
                f"Workflow {workflow.name!r}: agent(s) {', '.join(agents)} run on the offline model "
                f"but the workflow has no offline_script; give Workflow(offline_script=...) or "
                f"point the worker at a model (TURNFLEET_MODEL_BASE_URL)")


def app_models(app: App, settings: WorkerProcessSettings, model: Model) -> dict[str, WorkerModels]:
    """One ``WorkerModels`` per workflow of ``app``, by name: offline, each follows its own
    workflow's script; on an endpoint, they share the worker's ``model`` (one client)."""
    check_offline_scripts(app, settings)
    offline = runs_offline(settings)
    return {w.name: WorkerModels(settings, None if offline else model, script=w.offline_script,
                                 workflow_model=w.model)
            for w in app.workflows}


def is_transient_model_error(exc: BaseException) -> bool | None:
    """Whether a model endpoint error may go away on another attempt; ``None`` if ``exc`` is
    not a model endpoint error (the caller decides).

    Transient: :class:`MalformedModelResponse`, timeouts and connection errors, and answers
    408, 409, 429 and 5xx (what is left of them after the client's own retries). Deterministic:
    the other 4xx answers (bad request, authentication, permission, unknown model,
    unprocessable): the same request gets the same answer.
    """
    if isinstance(exc, (MalformedModelResponse, openai.APIConnectionError)):
        return True  # APITimeoutError is an APIConnectionError
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in TRANSIENT_STATUSES or exc.status_code >= 500
    return None


# --------------------------------------------------------------------------------------------
# Checking answers before the openai client parses them


def _expected_shape(path: str) -> str | None:
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/responses"):
        return "responses"
    return None


def shape_problem(shape: str, body: Any) -> str | None:
    """What keeps ``body`` (decoded JSON) from being a Chat Completion or a Response, if anything.

    Deliberately minimal: only what the SDK reads without checking. Providers differ in the
    optional fields they send, and the SDK handles an empty ``choices`` list itself.
    """
    if not isinstance(body, dict):
        return f"JSON {type(body).__name__}, not an object"
    if shape == "chat":
        choices = body.get("choices")
        if not isinstance(choices, list):
            return "no 'choices' list"
        if any(not isinstance(c, dict) or not isinstance(c.get("message"), dict) for c in choices):
            return "a choice without a 'message' object"
    elif not isinstance(body.get("output"), list):
        return "no 'output' list"
    usage = body.get("usage")
    if usage is not None and not isinstance(usage, dict):
        return "'usage' is not an object"
    return None


async def check_model_response(response: httpx2.Response) -> None:
    """httpx response hook: raise :class:`MalformedModelResponse` for a 2xx answer to a
    non-streaming completion request whose body has not the expected shape.

    Runs inside the client's send, before the openai client parses: an ``openai`` error
    raised here propagates as itself (the client neither wraps nor retries it).
    """
    request = response.request
    shape = _expected_shape(request.url.path)
    if shape is None or request.method != "POST" or not response.is_success:
        return
    content_type = response.headers.get("content-type", "")
    if content_type.startswith("text/event-stream"):
        return  # a stream: the SDK's stream handler reads it event by event
    await response.aread()
    text = response.text
    try:
        body: Any = json.loads(text)
    except ValueError:
        problem, body = "not JSON", text
    else:
        problem = shape_problem(shape, body)
    if problem is None:
        return
    snippet = text[:BODY_SNIPPET_CHARS] + ("…" if len(text) > BODY_SNIPPET_CHARS else "")
    what = "chat completion" if shape == "chat" else "response"
    raise MalformedModelResponse(
        response,
        body,
        message=(
            f"{request.url} answered {response.status_code} ({content_type or 'no content type'})"
            f" with a body that is not a {what}: {problem}: {snippet!r}"
        ),
    )
