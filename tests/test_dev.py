"""``turnfleet dev`` and the README's "Run your own agents": the example file and the three
commands, exactly as written there, run for real.

The README's code block is written to a fresh folder as ``my_agents.py``; the commands run in
that folder through a shell with this interpreter's ``turnfleet`` first on ``PATH`` and no
``REDIS_URL``: ``dev`` starts the embedded Redis and the others find it by themselves, as a
reader's would. Ctrl-C (SIGINT) ends ``dev`` cleanly, and no process it started is left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.processes import tf

ROOT = Path(__file__).resolve().parent.parent


def readme_section() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Run your own agents\n", 1)[1]
    return re.split(r"\n##+ ", section, maxsplit=1)[0]  # up to the next heading, subsections too


def readme_example() -> tuple[str, list[str]]:
    """The section's Python file and its shell commands (comments dropped)."""
    section = readme_section()
    [code] = re.findall(r"```python\n(# my_agents\.py\n.*?)```", section, re.S)
    [sh] = re.findall(r"```sh\n(.*?)```", section, re.S)
    commands = [line.split("  #")[0].strip() for line in sh.splitlines() if line.strip()]
    return code, commands


def reader_env(fleet_env: dict[str, str]) -> dict[str, str]:
    """A reader's shell: turnfleet on PATH, no REDIS_URL, the default state folder (./.turnfleet)."""
    env = {k: v for k, v in fleet_env.items() if k not in ("REDIS_URL", "TURNFLEET_STATE_DIR")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_the_readmes_example_runs_with_its_three_commands(fleet_env, tmp_path):
    code, commands = readme_example()
    assert len(code.splitlines()) <= 40 and len(commands) == 3
    assert commands[0] == "turnfleet dev --app my_agents:app"
    (tmp_path / "my_agents.py").write_text(code)
    env = reader_env(fleet_env)
    dev = subprocess.Popen(["bash", "-c", f"exec {commands[0]}"], cwd=tmp_path, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        said = []
        while not said or not said[-1].startswith("ready:"):
            line = dev.stdout.readline()
            assert line, f"turnfleet dev ended before it was ready: {''.join(said)}"
            said.append(line)
        redis = json.loads((tmp_path / ".turnfleet" / "redis.json").read_text())
        assert f"REDIS_URL={redis['url']}\n" in said  # what it prints is what the others use
        pids = [int(p) for p in re.findall(r"pid (\d+)", "".join(said))] + [redis["pid"]]
        assert len(pids) == 3  # telemetry, one worker, the embedded Redis

        result = subprocess.run(["bash", "-c", commands[1]], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "completed" in result.stdout and "Room orion is free until 15:00." in result.stdout
        replay = subprocess.run(["bash", "-c", commands[2]], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=60)
        assert replay.returncode == 0, replay.stderr
        assert all(word in replay.stdout for word in ("Concierge", "room_status", "Room orion is free"))

        dev.send_signal(signal.SIGINT)  # Ctrl-C
        rest, _ = dev.communicate(timeout=60)
    finally:
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait()
    assert dev.returncode == 0, "".join(said) + rest
    assert "stopped" in rest
    assert [pid for pid in pids if not gone(pid)] == []
    assert not (tmp_path / ".turnfleet" / "redis.json").exists()


def test_dev_refuses_a_bad_app_or_worker_count_in_one_line(fleet_env, tmp_path):
    for args, message in ((["--app", "tests.apps.tiny:nothing"], "has no attribute 'nothing'"),
                          (["--app", "tests.apps.tiny:app", "--workers", "0"], "--workers: must be at least 1")):
        proc = tf("dev", *args, env=fleet_env)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr

