"""turnfleet processes the tests run: the CLI, ``turnfleet worker|telemetry --burst``.

One place for them (the burst runs were written three times, the CLI call five): a burst run
must end with exit status 0, else the assertion shows the end of its log.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from tests import waiting
from turnfleet.shell.fleet import FleetProcess

CLI = [sys.executable, "-m", "turnfleet.shell.cli"]  # the CLI with this interpreter


def tf(*args: str, env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run ``turnfleet ARGS`` to its end, capturing its text output (``timeout`` is a safety
    net for a process that would hang, never a measure)."""
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)


def start_burst(verb: str, env: dict[str, str], tmp_path: Path, name: str) -> FleetProcess:
    """Start ``turnfleet VERB --burst`` (logging to ``tmp_path/<name>.log``); do not wait."""
    return FleetProcess(name, [verb, "--burst"], env, tmp_path / f"{name}.log").start()


def run_burst(verb: str, env: dict[str, str], tmp_path: Path, name: str | None = None,
              timeout: float = 120) -> FleetProcess:
    """Run ``turnfleet VERB --burst`` to its end; it must exit 0."""
    proc = start_burst(verb, env, tmp_path, name or verb)
    code = proc.wait(timeout)
    assert code == 0, proc.output()[-3000:]
    return proc


async def run_burst_in_thread(verb: str, env: dict[str, str], tmp_path: Path, name: str | None = None) -> FleetProcess:
    """``run_burst`` off the event loop: for tests whose loop also serves the HTTP app."""
    return await asyncio.to_thread(run_burst, verb, env, tmp_path, name)


async def until_or_exit(check: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = 20.0,
                        proc: FleetProcess | None = None) -> None:
    """``waiting.until`` for a process's doing (a key written, a log line logged): fails at
    once, with the end of its log, when ``proc`` exits first."""

    def exited() -> str | None:
        if proc is None or proc.running():
            return None
        return f"{proc.name} exited ({proc.process.returncode}): {proc.output()[-3000:]}"

    await waiting.until(check, what, timeout, gave_up=exited)
