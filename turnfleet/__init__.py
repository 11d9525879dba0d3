"""turnfleet: the contract shared by the producer, the workers and telemetry.

Importing this package must stay cheap and must not import the Agents SDK, arq's worker,
or any of the components: services that only enqueue turns depend on it.

What a team imports comes from here: ``Workflow`` and ``App`` (``turnfleet/workflow.py``),
``Check``/``check`` and ``FinishedTurn`` (``turnfleet/checks.py``), ``llm_judge``
(``turnfleet/judge.py``), loaded on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {name: "turnfleet.workflow" for name in ("Workflow", "App", "WorkflowError", "AppLoadError", "load_app")}
_LAZY |= {"TurnContext": "turnfleet.context"}
_LAZY |= {name: "turnfleet.side_effects" for name in ("once", "Once", "OnceError", "idempotency_key")}
_LAZY |= {name: "turnfleet.checks" for name in ("Check", "check", "CheckResult", "CheckOutcome", "FinishedTurn", "ToolCallView", "run_checks", "not_applicable")}
_LAZY |= {name: "turnfleet.judge" for name in ("llm_judge", "LlmJudge", "JudgeEndpoint")}
_LAZY |= {name: "turnfleet.offline_script" for name in ("Script", "Rule", "FollowUp", "Intent", "Step", "Call", "Outcome", "Slot", "Facts")}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'turnfleet' has no attribute {name!r}")
