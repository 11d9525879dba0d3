"""Operations (issue 12, item 7): processes that must end do, misconfiguration is one line.

Real ``turnfleet`` subprocesses against a Redis that is not there (a free port nobody
listens on), then a real Redis started on that port; a real ``serve`` with a broken keys
file. A subprocess ``timeout`` is only a safety net so that a process that would wait
forever fails the test instead of hanging it; nothing asserts how long anything took.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.processes import tf, until_or_exit
from turnfleet.shell.embedded import RedisServer, free_port
from turnfleet.shell.fleet import FleetProcess

def one_line(run: subprocess.CompletedProcess[str]) -> str:
    """stderr is exactly one line, and no traceback."""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    return lines[0]


@pytest.fixture
def nowhere(fleet_env: dict[str, str]) -> dict[str, str]:
    """An environment whose REDIS_URL points at a port nobody listens on."""
    return {**fleet_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
            "TURNFLEET_CONNECT_TIMEOUT_S": "0.5"}


@pytest.mark.parametrize("verb", ["worker", "telemetry"])
def test_a_burst_run_gives_up_on_an_absent_redis_with_one_line_and_exit_1(nowhere, verb):
    run = tf(verb, "--burst", env=nowhere, timeout=30)
    assert run.returncode == 1, run.stderr[-3000:]
    line = one_line(run)
    assert line.startswith(f"turnfleet {verb}: cannot reach Redis") and "TURNFLEET_CONNECT_TIMEOUT_S" in line


MALFORMED = ["redis://:99999", "notaurl", "redis://host:port/notadb", "redis://localhost/notadb"]
VERBS = [
    ["worker", "--burst"], ["telemetry", "--burst"], ["serve"], ["demo"],
    ["enqueue", "--conversation", "c-1", "--customer", "C-100", "hello"],
    ["result", "t-1"], ["turn", "t-1"], ["conversation", "c-1"], ["find"], ["stats"], ["alerts"],
]


@pytest.mark.parametrize("url", MALFORMED)
def test_a_malformed_redis_url_is_one_line_naming_it_and_exit_2(fleet_env, url):
    for argv in VERBS if url == MALFORMED[0] else VERBS[:2]:  # every verb once, every URL on two
        run = tf(*argv, env={**fleet_env, "REDIS_URL": url})
        assert run.returncode == 2, (argv, run.stderr[-3000:])
        line = one_line(run)
        assert f"REDIS_URL {url!r}" in line and "not a usable Redis URL" in line, (argv, line)


def test_health_reports_a_malformed_redis_url_as_one_line_and_exit_1(fleet_env):
    run = tf("health", "--role", "worker", env={**fleet_env, "REDIS_URL": "redis://:99999"})
    assert run.returncode == 1 and "REDIS_URL" in one_line(run)


@pytest.mark.parametrize("verb,event", [("worker", "worker.redis_lost"), ("telemetry", "telemetry.redis_error")])
async def test_a_long_running_process_keeps_retrying_says_so_and_recovers(nowhere, tmp_path, verb, event):
    port = int(nowhere["REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    proc = FleetProcess(verb, [verb], nowhere, tmp_path / f"{verb}.log").start()
    server = RedisServer(tmp_path / "redis", port=port)
    try:
        def retries() -> list[dict]:
            return [json.loads(line) for line in proc.output().splitlines()
                    if line.startswith("{") and f'"event": "{event}"' in line]

        await until_or_exit(lambda: len(retries()) >= 2, f"two {event} lines", timeout=60, proc=proc)
        assert all((r.get("retry_in_s") or r.get("restart_in_s") or 0) > 0 for r in retries()), retries()
        health = tf("health", "--role", verb, env=nowhere)
        assert health.returncode == 1 and "unreachable" in one_line(health)

        server.start()  # Redis comes back on the same port: the process carries on by itself
        await until_or_exit(lambda: tf("health", "--role", verb, env=nowhere).returncode == 0,
                    f"{verb} healthy once Redis is back", timeout=60, proc=proc)
    finally:
        code = proc.stop()
        server.kill()
    assert code == 0, proc.output()[-3000:]


# -- the HTTP API's keys file --------------------------------------------------------------


@pytest.mark.parametrize("content", [None, "not json", '{"name": "x"}', '[{"name": "x"}]'])
def test_serve_refuses_to_start_with_a_keys_file_it_cannot_use(fleet_env, tmp_path, content):
    path = tmp_path / "keys" / "api-keys.json"
    if content is not None:
        path.parent.mkdir()
        path.write_text(content)
    run = tf("serve", "--port", "0", env={**fleet_env, "TURNFLEET_API_KEYS_FILE": str(path)})
    assert run.returncode == 1, run.stderr[-3000:]
    line = one_line(run)
    assert line.startswith("turnfleet serve: TURNFLEET_API_KEYS_FILE") and str(path) in line


def test_a_keys_file_that_breaks_later_keeps_the_last_good_keys(tmp_path: Path):
    from turnfleet.auth import KeyStore, hash_key, new_key
    from turnfleet.settings import ProducerSettings

    key = new_key()
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([{"name": "portal", "sha256": hash_key(key), "customers": ["C-100"]}]))
    store = KeyStore(ProducerSettings(api_keys=[], api_keys_file=path))
    assert store.authenticate(key) is not None
    for broken in ("not json", "[1]"):
        path.write_text(broken)
        store.reload()
        assert store.authenticate(key) is not None, broken
    path.unlink()
    store.reload()
    assert store.authenticate(key) is not None
