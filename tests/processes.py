"""turnfleet processes the tests run: ``turnfleet worker|telemetry --burst`` as subprocesses.

One place for them (they were written three times): a burst run must end with exit status 0,
else the assertion shows the end of its log.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from turnfleet.shell.fleet import FleetProcess


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
