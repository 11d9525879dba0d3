"""The README and CI entry point say what the code does."""

from __future__ import annotations

import re
from pathlib import Path

from turnfleet.settings import CommonSettings, ProducerSettings, TelemetrySettings, WorkerProcessSettings

ROOT = Path(__file__).resolve().parent.parent


def setting_env_names() -> set[str]:
    names = set()
    for cls in (CommonSettings, ProducerSettings, WorkerProcessSettings, TelemetrySettings):
        for field in cls.model_fields:
            names.add("REDIS_URL" if field == "redis_url" else f"TURNFLEET_{field.upper()}")
    return names


def test_readme_settings_table_lists_exactly_the_settings():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Settings", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `((?:TURNFLEET_|REDIS_URL)[A-Z0-9_]*)`", section, re.M))
    assert documented == setting_env_names()


def test_readme_opens_with_the_two_commands_and_ci_runs_make_test():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```", 2)[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()[1:] if line.strip()]
    assert commands == ["make demo", "make test"]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == ["exec make test"]
