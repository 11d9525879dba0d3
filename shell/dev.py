"""``turnfleet dev --app module:attr``: a team's own app on a whole fleet, in one terminal.

What a team runs while writing its agents: Redis (the embedded one unless ``REDIS_URL`` is
set; the CLI starts it and stops it when this command ends), ``--workers`` worker processes
serving the app and one telemetry consumer — the same subprocesses a deployment and
``turnfleet demo`` run (``shell/fleet.py``) — in the foreground until Ctrl-C or SIGTERM.
It prints the ``REDIS_URL`` the fleet uses and how to hand it a turn: other ``turnfleet``
commands run from the same directory share the embedded Redis already (its state file under
``TURNFLEET_STATE_DIR``), so ``turnfleet enqueue`` / ``conversation`` need nothing else.

Stopping is a worker's drain (SIGTERM to each child, turns in flight finish), then the
embedded Redis. A child that exits on its own stops the others too: exit 1, naming its log.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import uuid
from pathlib import Path

from turnfleet import heartbeat
from turnfleet.connection import connect
from turnfleet.settings import CommonSettings
from turnfleet.shell.fleet import FleetProcess, fleet_env
from turnfleet.workflow import App

START_TIMEOUT_S = 60.0  # workers import the SDK and the app: seconds on a busy laptop


def _say(text: str) -> None:
    print(text, flush=True)  # a line at a time: a test (or a pipe) reads it as it comes


async def run_dev(redis_url: str, spec: str, app: App, workers: int) -> int:
    """Run the fleet for ``app`` (loaded from ``spec``) until stopped; the exit status."""
    run_id = uuid.uuid4().hex[:6]
    log_dir = Path(CommonSettings().state_dir) / "logs" / f"dev-{run_id}"
    env = fleet_env(redis_url, {"TURNFLEET_APP": spec})
    labels = [f"worker-{i}" for i in range(1, workers + 1)]
    names = [f"dev-{run_id}-{label}" for label in labels]  # TURNFLEET_WORKER_NAME: on every result
    procs = [FleetProcess("telemetry", ["telemetry"], env, log_dir / "telemetry.log")]
    procs += [FleetProcess(label, ["worker"], {**env, "TURNFLEET_WORKER_NAME": name}, log_dir / f"{label}.log")
              for label, name in zip(labels, names)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    redis = connect(redis_url)
    served = ", ".join(f"{w.name} ({w.version_label()})" for w in app.workflows)
    try:
        _say(f"turnfleet dev: {served} on {workers} worker(s) and telemetry; logs in {log_dir}")
        _say(f"REDIS_URL={redis_url}")
        for proc in procs:
            proc.start()
        _say("processes: " + ", ".join(f"{p.name} (pid {p.pid})" for p in procs))
        started = time.monotonic()
        while not set(names) <= set(await heartbeat.alive(redis, "worker", 10)):
            if stop.is_set():
                return 0
            dead = _exited(procs)
            if dead or time.monotonic() - started > START_TIMEOUT_S:
                return _stopped_early(dead, log_dir)
            await _wait(stop, 0.05)
        first = app.workflows[0].name
        if _embedded(redis_url):
            _say(f"ready: {served}. turnfleet commands run in this folder use this Redis by themselves "
                 "(elsewhere, export the REDIS_URL above).")
        else:
            _say(f"ready: {served}. turnfleet commands use it with the REDIS_URL above.")
        _say(f'  turnfleet enqueue --agent {first} --conversation c-1 --customer C-100 "hello"')
        _say("  turnfleet conversation c-1      # the replay; Ctrl-C here stops the fleet")
        while not stop.is_set():
            dead = _exited(procs)
            if dead:
                return _stopped_early(dead, log_dir)
            await _wait(stop, 0.5)
        _say("turnfleet dev: stopping (workers finish the turns they hold)")
        return 0
    finally:  # SIGTERM to all at once: the workers drain side by side, then each exits
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs))
        await redis.aclose()
        _say("turnfleet dev: stopped")


def _embedded(redis_url: str) -> bool:
    """Whether ``redis_url`` is the embedded Redis of this folder's state (which other
    commands find by themselves), not one given by ``REDIS_URL``."""
    try:
        state = json.loads((Path(CommonSettings().state_dir) / "redis.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("url") == redis_url


def _exited(procs: list[FleetProcess]) -> list[FleetProcess]:
    return [p for p in procs if p.process is not None and not p.running()]


def _stopped_early(dead: list[FleetProcess], log_dir: Path) -> int:
    what = ", ".join(f"{p.name} exited ({p.process.returncode if p.process else '?'})" for p in dead) \
        or f"workers not ready in {START_TIMEOUT_S:g} s"
    print(f"turnfleet dev: {what}; see {log_dir}", file=sys.stderr, flush=True)
    return 1


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    """Until ``event`` is set, at most ``timeout_s`` (then the caller looks at its children)."""
    try:
        await asyncio.wait_for(event.wait(), timeout_s)
    except TimeoutError:
        pass
