"""Workflow: a team's own agents, as the fleet runs them.

A workflow is a name and a starting agent; every agent a conversation can be resumed at is
reached from it through handoffs (``agent.handoffs`` holding ``Agent`` objects). That is all a
one-agent workflow needs: ``Workflow(name="it-helpdesk", agent=helpdesk_agent)``.

This module never imports the Agents SDK: agents are read by their public attributes (``name``,
``instructions``, ``tools``, ``handoffs``, ``model``, ``model_settings``, ``input_guardrails``),
so a service that only enqueues turns can import ``turnfleet`` without loading the SDK.

**Version.** ``version`` is what the team declares; :meth:`Workflow.fingerprint` is computed:
a digest of every agent's instructions, tools (names and JSON schemas), handoffs, guardrails,
model and model settings. A changed prompt is a new fingerprint without anyone bumping a
number. Instructions given as a function are fingerprinted by the function's qualified name
(its output can depend on the run; a changed body is not seen — declare a ``version`` then).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from turnfleet.checks import as_checks
from turnfleet.models import check_id

FINGERPRINT_CHARS = 16  # hex digits kept: 64 bits, for telling versions apart, not security


class WorkflowError(ValueError):
    """A workflow that cannot be run as declared; the message names what is wrong."""


class AppLoadError(ValueError):
    """``--app module:attr`` (``TURNFLEET_APP``) that does not name workflows; says why."""


@dataclass(frozen=True, eq=False)
class Workflow:
    """A named set of agents the fleet runs for turns whose ``agent`` is this ``name``."""

    name: str
    agent: Any  # the starting agents.Agent
    version: str | None = None
    # Agents reachable only through ``Handoff`` objects (``handoff(agent, ...)`` hides the agent
    # inside a closure): list them here so a conversation can be resumed at them by name.
    extra_agents: Sequence[Any] = ()
    model_settings: Any = None  # agents.ModelSettings for every agent of the workflow
    redaction_patterns: Sequence[str] = ()  # extra regexes redacted in this workflow's telemetry
    prices: Mapping[str, Any] | None = None  # model name -> price overrides
    # What a turn answers when a guardrail of this name trips (the default otherwise): a
    # tripped guardrail completes the turn with this safe reply, never the model's output.
    guardrail_replies: Mapping[str, str] = field(default_factory=dict)
    default_guardrail_reply: str = "I'm sorry, I can't help with that request."
    trace_name: str | None = None  # the SDK trace's workflow_name (default: ``name``)
    # The team's own agents.tracing.TracingProcessor objects (their vendor's exporter): each gets
    # this workflow's kept, redacted traces and spans (workers/trace_store.py); not fingerprinted.
    trace_processors: Sequence[Any] = ()
    # What the offline model decides for this workflow's agents (a ``turnfleet.Script``) when
    # the fleet runs offline; it stands in for the LLM, so it is not part of the fingerprint.
    offline_script: Any = None
    # The model of the workflow's agents that name none: a model name or an SDK ``Model``.
    model: Any = None
    # The team's own agents.RunHooks for this workflow's runs, called after turnfleet's own
    # telemetry hooks for every callback (workers/hooks.py ChainedHooks); not fingerprinted.
    hooks: Any = None
    # The workflow's checks (``turnfleet.Check`` or plain functions over a ``FinishedTurn``,
    # turnfleet/checks.py). Not fingerprinted: checks judge finished turns, they do not change
    # what the agents do, so adding or fixing a check is no new version of the workflow (and a
    # turn's checks can be re-judged against the same version).
    checks: Sequence[Any] = ()
    # The names of the workflow's tools that change the world (move money, open tickets, send
    # mail): ``turnfleet rerun`` never runs them for real (workers/rerun.py), every other tool
    # is taken as read-only. Validated against the workflow's tools; not fingerprinted (it
    # changes nothing the agents do).
    side_effect_tools: Sequence[str] = ()
    _agents: dict[str, Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            check_id(self.name)
        except ValueError as exc:
            raise WorkflowError(f"Workflow name: {exc}") from None
        if self.version is not None and not isinstance(self.version, str):
            raise WorkflowError(f"Workflow {self.name!r}: version must be a string, not {type(self.version).__name__}")
        if getattr(self.agent, "name", None) is None:
            raise WorkflowError(f"Workflow {self.name!r}: agent must be an Agents SDK Agent (it has no name)")
        try:
            object.__setattr__(self, "checks", as_checks(self.checks))
        except ValueError as exc:
            raise WorkflowError(f"Workflow {self.name!r}: {exc}") from None
        object.__setattr__(self, "_agents", _walk(self.name, [self.agent, *self.extra_agents]))
        if isinstance(self.side_effect_tools, str):
            raise WorkflowError(f"Workflow {self.name!r}: side_effect_tools must be a list of tool names, not a string")
        object.__setattr__(self, "side_effect_tools", tuple(self.side_effect_tools))
        unknown = sorted(set(self.side_effect_tools) - set(self.tool_names))
        if unknown:
            raise WorkflowError(f"Workflow {self.name!r}: side_effect_tools names no tool of its agents: "
                                f"{', '.join(unknown)} (its tools: {', '.join(sorted(self.tool_names)) or 'none'})")

    @property
    def tool_names(self) -> frozenset[str]:
        """The names of every tool of the workflow's agents."""
        return frozenset(getattr(t, "name", "") for a in self._agents.values() for t in getattr(a, "tools", ()))

    @property
    def agents(self) -> Mapping[str, Any]:
        """Every agent of the workflow by name, the starting agent first."""
        return self._agents

    def starting_agent(self, name: str | None = None) -> Any:
        """The agent named ``name`` (where the conversation stands), else the starting agent."""
        return self._agents.get(name or "", self.agent)

    def guardrail_reply(self, guardrail: str) -> str:
        """The reply a turn completes with when ``guardrail`` tripped."""
        return self.guardrail_replies.get(guardrail) or self.default_guardrail_reply

    def describe(self) -> dict[str, Any]:
        """What the fingerprint is computed from, as plain JSON types."""
        return {
            "workflow": self.name,
            "version": self.version,
            "start": self.agent.name,
            "guardrail_replies": dict(sorted(self.guardrail_replies.items())),
            "default_guardrail_reply": self.default_guardrail_reply,
            "model_settings": _settings(self.model_settings),
            **({"model": _model(self.model)} if self.model is not None else {}),
            "agents": [_agent(a) for a in sorted(self._agents.values(), key=lambda a: a.name)],
        }

    def fingerprint(self) -> str:
        text = json.dumps(self.describe(), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_CHARS]

    def version_label(self) -> str:
        """The version a turn records: ``<declared>@<fingerprint>``, or the fingerprint alone
        when nothing is declared (a changed prompt is a new label either way)."""
        fp = self.fingerprint()
        return f"{self.version}@{fp}" if self.version else fp


def _walk(workflow: str, roots: Iterable[Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    todo = list(roots)
    while todo:
        agent = todo.pop(0)
        name = getattr(agent, "name", None)
        if name in found:
            if found[name] is not agent:
                raise WorkflowError(f"Workflow {workflow!r}: two different agents are named {name!r}")
            continue
        found[name] = agent
        todo.extend(h for h in getattr(agent, "handoffs", ()) if _is_agent(h))
    return found


def _is_agent(handoff: Any) -> bool:
    """An Agent object (a Handoff object only names its agent: ``agent_name``)."""
    return hasattr(handoff, "name") and hasattr(handoff, "instructions")


def _callable_name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _model(model: Any) -> Any:
    if model is None or isinstance(model, str):
        return model
    for attr in ("model", "model_name", "name"):
        value = getattr(model, attr, None)
        if isinstance(value, str):
            return value
    return type(model).__qualname__


def _settings(settings: Any) -> Any:
    if settings is None:
        return None
    to_json = getattr(settings, "to_json_dict", None)
    return to_json() if callable(to_json) else repr(settings)


def _tool(tool: Any) -> dict[str, Any]:
    return {"name": getattr(tool, "name", type(tool).__name__),
            "schema": getattr(tool, "params_json_schema", None)}


def _agent(agent: Any) -> dict[str, Any]:
    instructions = agent.instructions
    return {
        "name": agent.name,
        "instructions": instructions if instructions is None or isinstance(instructions, str)
        else f"callable:{_callable_name(instructions)}",
        "tools": sorted((_tool(t) for t in getattr(agent, "tools", ())), key=lambda t: t["name"]),
        "handoffs": sorted(getattr(h, "name", None) or getattr(h, "agent_name", "?")
                           for h in getattr(agent, "handoffs", ())),
        "guardrails": sorted(getattr(g, "name", None) or _callable_name(getattr(g, "guardrail_function", g))
                             for g in (*getattr(agent, "input_guardrails", ()),
                                       *getattr(agent, "output_guardrails", ()))),
        "model": _model(getattr(agent, "model", None)),
        "model_settings": _settings(getattr(agent, "model_settings", None)),
        "output_type": None if getattr(agent, "output_type", None) is None else repr(agent.output_type),
    }


@dataclass(frozen=True)
class App:
    """The workflows one worker pool serves (what ``--app module:attr`` may name)."""

    workflows: Sequence[Workflow]

    def __post_init__(self) -> None:
        names = [w.name for w in self.workflows]
        if not names:
            raise WorkflowError("App: no workflows")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise WorkflowError(f"App: workflow names used twice: {', '.join(dupes)}")

    def get(self, name: str) -> Workflow | None:
        return next((w for w in self.workflows if w.name == name), None)


def as_app(value: Any, where: str = "app") -> App:
    """A Workflow, a list of them, or an App (or anything with ``.workflows``) as an App."""
    if isinstance(value, App):
        return value
    if isinstance(value, Workflow):
        return App([value])
    if isinstance(value, list | tuple) and all(isinstance(w, Workflow) for w in value):
        return App(list(value))
    workflows = getattr(value, "workflows", None)
    if workflows is not None:
        return as_app(list(workflows), where)
    raise AppLoadError(f"{where} is a {type(value).__name__}; expected a turnfleet Workflow, a list of them, or an App")


def load_app(spec: str, app_dir: str | None = ".") -> App:
    """``module:attr`` (as ``uvicorn module:app``): import the module, read the attribute.

    Like uvicorn's ``--app-dir``, ``app_dir`` (the working directory by default) is put first
    on ``sys.path``, so ``turnfleet worker --app myteam.agents:app`` run in the team's
    checkout finds ``myteam`` without installing it; ``None`` leaves ``sys.path`` alone."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AppLoadError(f"--app {spec!r}: expected module:attribute, e.g. myteam.agents:app")
    if app_dir is not None:
        path = os.path.abspath(app_dir)
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise AppLoadError(f"--app {spec!r}: no module named {exc.name!r} (is it on PYTHONPATH?)") from None
        raise
    value: Any = module
    for part in attr.split("."):
        if not hasattr(value, part):
            raise AppLoadError(f"--app {spec!r}: module {module_name!r} has no attribute {attr!r}")
        value = getattr(value, part)
    return as_app(value, f"--app {spec!r}")
