"""Where a worker's CPU goes, per turn: one ``turnfleet worker --burst`` sampled by py-spy.

py-spy (``make bench`` installs it) samples the worker's Python stacks from outside, only
while the process is on the CPU, so ``samples / rate`` is CPU seconds. Each sample is given
to one part by walking its stack from the innermost frame outwards and taking the first
frame that belongs to a part (a Redis call made by a tool is the SDK run's; a span made in
the model is tracing's); only the frames of the task the event loop is running count, so a
sample in the loop's own select/dispatch is "event loop". Imports (startup) are left out of
the per-turn figures.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path

RATE = 200

# (part, path prefixes). Order matters only for prefixes that nest (agents/tracing/).
PARTS: list[tuple[str, tuple[str, ...]]] = [
    ("telemetry and tracing", ("workers/hooks.py", "workers/trace_store.py", "workers/otlp.py",
                               "turnfleet/redaction.py", "agents/tracing/", "structlog/",
                               "turnfleet/logging.py", "logging/")),
    ("conversation memory", ("workers/memory.py",)),
    ("Agents SDK run (model, tools)", ("agents/", "workers/model.py", "turnfleet/offline_script.py",
                                       "workers/support_desk_script.py", "workers/tools.py",
                                       "workers/support_desk.py", "workers/orderbook.py",
                                       "turnfleet/context.py", "turnfleet/side_effects.py")),
    ("queue and turn bookkeeping", ("arq/", "turnfleet/queue.py", "workers/job.py", "workers/attempt.py",
                                    "workers/settings.py", "workers/supervisor.py",
                                    "workers/reconcile.py", "turnfleet/heartbeat.py",
                                    "turnfleet/models.py", "turnfleet/connection.py")),
]
REDACTION = "of which redaction (turnfleet/redaction.py)"
STARTUP = ("_find_and_load", "_call_with_frames_removed")
FRAME = re.compile(r"^(?P<fn>.*) \((?P<path>.*?)(?::\d+)?\)$")


def py_spy() -> str | None:
    """py-spy from the virtualenv this runs in, else from PATH."""
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")


def part_of(stack: list[str]) -> str:
    if any(f.startswith(STARTUP) for f in stack):
        return "startup (imports)"
    # Only the running task's frames: below the event loop's callback dispatch.
    runs = [i for i, f in enumerate(stack) if f.startswith("Handle._run ")]
    if not runs:
        # uvloop (the worker's loop) dispatches in C: a task's frames follow the frame that
        # started the loop (asyncio.Runner.run), with nothing of the loop's own between.
        runs = [i for i, f in enumerate(stack) if "asyncio/runners.py" in f]
    stack = stack[runs[-1] + 1:] if runs else []
    for frame in reversed(stack):
        m = FRAME.match(frame)
        path = m.group("path") if m else frame
        for part, prefixes in PARTS:
            if path.startswith(prefixes):
                return part
    return "event loop and I/O (asyncio, redis-py) not owned by a part"


def split(raw: str) -> collections.Counter[str]:
    """Samples per part from py-spy's ``--format raw`` (collapsed stacks with counts)."""
    parts: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if stack and n.isdigit():
            frames = stack.split(";")
            parts[part_of(frames)] += int(n)
            if any("turnfleet/redaction.py" in f for f in frames):
                parts[REDACTION] += int(n)  # a sub-share of the parts above, not a part
    return parts


def record(cmd: list[str], env: dict[str, str], out: Path, log: Path, timeout_s: float) -> collections.Counter[str]:
    """Run ``cmd`` under ``py-spy record`` and split its samples."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        subprocess.run([py_spy() or "py-spy", "record", "-r", str(RATE), "-f", "raw", "-o", str(out),
                        "--", *cmd], env=env, stdout=fh, stderr=subprocess.STDOUT,
                       timeout=timeout_s, check=True)
    return split(out.read_text())
