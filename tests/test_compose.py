"""The production shape (docker-compose.yml, Dockerfile) runs what this repository has.

No Docker engine is needed: the compose file is read as YAML (anchors and merge keys resolved,
``${VAR:-default}`` interpolated to its default as compose does with the variable unset),
and every command, healthcheck and environment variable it names is checked against the real
CLI and the real settings classes. ``turnfleet health``, which the healthchecks call, is run
for real against a real Redis and a real HTTP server.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices, AliasPath, ValidationError
from pydantic_settings import BaseSettings, SettingsError
from redis import Redis

import turnfleet.settings as settings_module
from turnfleet import keys
from turnfleet.shell.cli import build_parser
from turnfleet.shell.fleet import FleetProcess
from tests.processes import CLI

ROOT = Path(__file__).resolve().parent.parent
TURNFLEET_SERVICES = {"producer", "worker", "telemetry"}
HEALTH_ROLE = {"producer": "producer", "worker": "worker", "telemetry": "telemetry"}

# -- reading the compose file as compose does ---------------------------------------------

_INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def interpolate(value: str) -> str:
    """Compose's variable substitution with every variable unset: defaults apply."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        op, arg = match.group("op"), match.group("arg")
        if op in (":?", "?"):
            pytest.fail(f"{match.group(0)!r}: compose refuses to start without this variable")
        return arg if op in (":-", "-") else ""

    return _INTERPOLATION.sub(one, value)


def _resolved(node: Any) -> Any:
    if isinstance(node, str):
        return interpolate(node)
    if isinstance(node, list):
        return [_resolved(item) for item in node]
    if isinstance(node, dict):
        return {key: _resolved(value) for key, value in node.items()}
    return node


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _resolved(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def turnfleet_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services built from this repository (``build: .``): the turnfleet image."""
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the ["KEY=value", ...] form
        env = dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


# -- what the settings classes accept ------------------------------------------------------


def settings_classes() -> list[type[BaseSettings]]:
    """Every pydantic-settings class defined in turnfleet/settings.py (found, not listed)."""
    return [
        cls for _, cls in inspect.getmembers(settings_module, inspect.isclass)
        if issubclass(cls, BaseSettings) and cls.__module__ == settings_module.__name__
    ]


def env_names(cls: type[BaseSettings]) -> set[str]:
    """The environment variables ``cls`` reads: prefix + field name, or the field's aliases."""
    prefix = cls.model_config.get("env_prefix", "")
    names: set[str] = set()
    for field_name, field in cls.model_fields.items():
        alias = field.validation_alias or field.alias
        if alias is None:
            names.add(f"{prefix}{field_name}".upper())
        elif isinstance(alias, str):
            names.add(alias.upper())
        elif isinstance(alias, AliasChoices):
            names |= {choice.upper() for choice in alias.choices if isinstance(choice, str)}
        elif isinstance(alias, AliasPath):
            names.add(str(alias.path[0]).upper())
    return names


def known_env_names() -> set[str]:
    return set().union(*(env_names(cls) for cls in settings_classes()))


def instantiate_all(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Every settings class validates with exactly ``env`` (nothing inherited)."""
    for name in list(os.environ):
        if name.startswith("TURNFLEET_") or name == "REDIS_URL":
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for cls in settings_classes():
        try:
            cls()
        except (ValidationError, SettingsError) as exc:
            pytest.fail(f"{where}: {cls.__name__} rejects the environment: {exc}")


# -- what the CLI accepts -----------------------------------------------------------------


def assert_real_verb(argv: list[str], where: str) -> None:
    """``turnfleet argv[0] --help`` exits 0 in a fresh process, and the parser takes all of argv."""
    run = subprocess.run([*CLI, argv[0], "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"{where}: `turnfleet {argv[0]} --help` failed: {run.stderr.strip()}"
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: `turnfleet {shlex.join(argv)}` is not a valid command line (exit {exc.code})")


def healthcheck_argv(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return shlex.split(test)
    if test[0] == "CMD":
        return list(test[1:])
    if test[0] == "CMD-SHELL":
        return shlex.split(test[1])
    pytest.fail(f"healthcheck test form not understood: {test!r}")


def host_port_published(entry: Any) -> bool:
    if isinstance(entry, dict):
        return entry.get("published") not in (None, "")
    return ":" in str(entry)  # "8080:8080" / "127.0.0.1:8080:8080"; "8080" alone is container-only


# -- the compose file ---------------------------------------------------------------------


def test_compose_has_the_four_services_and_one_image_for_every_turnfleet_role(compose):
    assert set(compose["services"]) == {"redis", *TURNFLEET_SERVICES}
    built = turnfleet_services(compose)
    assert set(built) == TURNFLEET_SERVICES
    for name, svc in built.items():
        context = svc["build"] if isinstance(svc["build"], str) else svc["build"].get("context", ".")
        assert context == ".", name
    assert len({svc.get("image") for svc in built.values()}) == 1, "one image for every role"


def test_redis_is_the_official_image_with_aof_on_a_named_volume(compose):
    redis = compose["services"]["redis"]
    assert re.fullmatch(r"redis:\d+(\.\d+)*", redis["image"]), redis["image"]  # docker.io/library/redis
    command = redis["command"] if isinstance(redis["command"], list) else shlex.split(redis["command"])
    assert command[command.index("--appendonly") + 1] == "yes"
    volume, _, target = redis["volumes"][0].partition(":")
    assert target.split(":")[0] == "/data"
    assert volume in (compose.get("volumes") or {}), "a named volume, declared at the top level"
    assert healthcheck_argv(redis) == ["redis-cli", "ping"]


def test_workers_and_telemetry_scale_no_container_name_no_fixed_host_port(compose):
    for name in ("worker", "telemetry"):
        svc = compose["services"][name]
        assert "container_name" not in svc, f"{name}: --scale needs distinct container names"
        fixed = [p for p in svc.get("ports", []) if host_port_published(p)]
        assert not fixed, f"{name}: a fixed host port stops a second replica: {fixed}"
    assert "stop_grace_period" in compose["services"]["worker"]


KILL_MARGIN_S = 10.0  # after its own drain: heartbeat removal, OTLP / trace flush, closing


def duration_s(value: str) -> float:
    """A compose duration (``1m30s``, ``60s``, ``500ms``) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", str(value))
    assert parts and "".join(n + u for n, u in parts) == str(value), f"not a duration: {value!r}"
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[u] for n, u in parts)


def test_docker_kills_no_service_before_its_drain_ends(compose, monkeypatch):
    """SIGKILL after ``stop_grace_period``: it must land after the service's own drain
    (worker: drain grace, then requeueing the cancelled turns; producer: the longest long
    poll) plus a margin for flushing, or turns are lost mid-requeue and traces unflushed."""
    from turnfleet.shell.cli import serve_shutdown_s
    from turnfleet.settings import ProducerSettings, WorkerProcessSettings
    from turnfleet.workers.supervisor import CANCELLED_CLEANUP_S

    drains = {
        "worker": lambda: WorkerProcessSettings().drain_grace_s + CANCELLED_CLEANUP_S,
        "producer": lambda: serve_shutdown_s(ProducerSettings()),
    }
    for name, drain in drains.items():
        svc = compose["services"][name]
        instantiate_all(environment(svc), monkeypatch, f"service {name}")
        grace = duration_s(svc["stop_grace_period"])
        assert grace > drain() + KILL_MARGIN_S, (
            f"{name}: stop_grace_period {grace:g}s must exceed its drain {drain():g}s + {KILL_MARGIN_S:g}s")


def test_turnfleet_services_wait_for_a_healthy_redis_and_restart(compose):
    for name, svc in turnfleet_services(compose).items():
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert svc.get("restart") in ("always", "unless-stopped", "on-failure"), name


def test_producer_publishes_its_port_and_reads_api_keys_from_a_mounted_file(compose):
    producer = compose["services"]["producer"]
    command = producer["command"]
    port = command[command.index("--port") + 1]
    assert any(str(p).endswith(f":{port}") for p in producer["ports"])
    keys_file = environment(producer)["TURNFLEET_API_KEYS_FILE"]
    mounts = [str(v).split(":")[1] for v in producer.get("volumes", [])]
    assert any(keys_file.startswith(target.rstrip("/") + "/") for target in mounts), (keys_file, mounts)
    assert environment(producer)["TURNFLEET_HTTP_PORT"] == port  # where the health probe looks


def test_every_service_command_is_a_real_turnfleet_verb(compose):
    for name, svc in turnfleet_services(compose).items():
        command = svc["command"] if isinstance(svc["command"], list) else shlex.split(svc["command"])
        assert_real_verb(command, f"service {name} command")


def test_every_turnfleet_healthcheck_is_a_real_verb_checking_its_own_role(compose):
    for name, svc in compose["services"].items():
        if "healthcheck" not in svc:
            assert name not in TURNFLEET_SERVICES, f"{name} has no healthcheck"
            continue
        argv = healthcheck_argv(svc)
        if argv[0] != "turnfleet":
            assert name not in TURNFLEET_SERVICES, f"{name}: healthcheck should call turnfleet: {argv}"
            continue
        assert_real_verb(argv[1:], f"service {name} healthcheck")
        assert argv[1] == "health" and argv[argv.index("--role") + 1] == HEALTH_ROLE[name], argv


def test_every_environment_variable_is_a_known_setting_and_parses(compose, monkeypatch):
    known = known_env_names()
    assert {"REDIS_URL", "TURNFLEET_LOG_FORMAT", "TURNFLEET_TRACE_SAMPLE_RATE"} <= known
    for name, svc in turnfleet_services(compose).items():
        env = environment(svc)
        assert env, f"{name}: configured through TURNFLEET_* environment"
        unknown = sorted(set(env) - known)
        assert not unknown, f"{name}: not settings of turnfleet/settings.py: {unknown}"
        assert env["REDIS_URL"].startswith("redis://redis:"), name
        assert env["TURNFLEET_LOG_FORMAT"] == "json", name
        instantiate_all(env, monkeypatch, f"service {name}")


# -- the Dockerfile -----------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")
    ))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_one_image_entrypoint_turnfleet_installed_with_the_constraints(monkeypatch):
    instructions = dockerfile_instructions()
    by_kind: dict[str, list[str]] = {}
    for kind, rest in instructions:
        by_kind.setdefault(kind, []).append(rest)
    assert by_kind["FROM"] == ["python:3.11-slim"]
    assert json.loads(by_kind["ENTRYPOINT"][-1]) == ["turnfleet"]
    installs = [r for r in by_kind["RUN"] if "pip install" in r]
    assert any("-c constraints.txt" in r and "'.[otlp]'" in r for r in installs), installs
    assert any("constraints.txt" in c for c in by_kind["COPY"])
    user = by_kind["USER"][-1]
    assert user not in ("root", "0"), "the processes run as a non-root user"
    assert "8080" in by_kind["EXPOSE"][-1].split()

    env: dict[str, str] = {}
    for rest in by_kind.get("ENV", []):
        for token in shlex.split(rest):
            key, _, value = token.partition("=")
            env[key] = value
    ours = {k: v for k, v in env.items() if k.startswith("TURNFLEET_") or k == "REDIS_URL"}
    assert ours.get("TURNFLEET_STATE_DIR", "").startswith("/tmp/"), "the state folder is writable"
    assert not set(ours) - known_env_names(), set(ours) - known_env_names()
    instantiate_all(ours, monkeypatch, "Dockerfile ENV")


def test_dockerignore_keeps_local_state_and_secrets_out_of_the_build():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", ".turnfleet", ".pytest_cache", "keys", ".env"} <= ignored


# -- turnfleet health, for real -----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "health", *args], env=env, capture_output=True, text=True, timeout=60
    )


def assert_unhealthy(run: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert run.returncode == 1, (run.returncode, run.stdout, run.stderr)
    reason = run.stderr.strip()
    assert reason and "\n" not in reason, f"one line on stderr, got {run.stderr!r}"
    assert reason.startswith("turnfleet health: ")
    for fragment in fragments:
        assert fragment in reason, reason


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def sync_redis(redis_url: str):
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


def test_worker_health_needs_a_fresh_heartbeat_of_this_host(fleet_env, sync_redis):
    host = socket.gethostname()
    sync_redis.zadd(keys.WORKERS, {"elsewhere:1": now_ms(), f"{host}x:1": now_ms()})  # not this host
    assert_unhealthy(health(fleet_env, "--role", "worker"), "no worker heartbeat", repr(host))

    sync_redis.zadd(keys.WORKERS, {f"{host}:123": now_ms()})
    ok = health(fleet_env, "--role", "worker")
    assert ok.returncode == 0, ok.stderr
    assert f"worker {host}:123 beat" in ok.stdout

    sync_redis.zadd(keys.WORKERS, {f"{host}:123": now_ms() - 60_000})
    assert_unhealthy(health(fleet_env, "--role", "worker"), f"{host}:123", "max 15 s")
    assert health(fleet_env, "--role", "worker", "--max-age", "90").returncode == 0


def test_telemetry_health_reads_the_consumer_heartbeats(fleet_env, sync_redis):
    host = socket.gethostname()
    sync_redis.zadd(keys.WORKERS, {f"{host}:7": now_ms()})  # a worker's beat is not a consumer's
    assert_unhealthy(health(fleet_env, "--role", "telemetry"), "no telemetry heartbeat")
    sync_redis.zadd(keys.TELEMETRY_CONSUMERS, {f"{host}:7": now_ms()})
    assert health(fleet_env, "--role", "telemetry").returncode == 0


def test_health_looks_for_the_configured_name_when_one_is_set(fleet_env, sync_redis):
    host = socket.gethostname()
    env = {**fleet_env, "TURNFLEET_WORKER_NAME": "worker-a"}
    sync_redis.zadd(keys.WORKERS, {f"{host}:1": now_ms()})
    assert_unhealthy(health(env, "--role", "worker"), "'worker-a'")
    sync_redis.zadd(keys.WORKERS, {"worker-a": now_ms()})
    assert health(env, "--role", "worker").returncode == 0


def test_health_fails_when_redis_is_unreachable_without_showing_the_password(fleet_env):
    env = {**fleet_env, "REDIS_URL": f"redis://:s3cret@127.0.0.1:{free_port()}/0"}
    run = health(env, "--role", "worker", "--timeout", "2")
    assert_unhealthy(run, "unreachable", ":***@127.0.0.1")
    assert "s3cret" not in run.stderr


def test_health_without_redis_url_fails_and_starts_no_redis(fleet_env, tmp_path):
    env = {k: v for k, v in fleet_env.items() if k != "REDIS_URL"}
    env["TURNFLEET_STATE_DIR"] = str(tmp_path / "probe-state")
    assert_unhealthy(health(env, "--role", "worker"), "no Redis: set REDIS_URL")
    assert not (tmp_path / "probe-state").exists(), "a probe must not start the embedded Redis"


def test_producer_health_fails_against_a_closed_port(fleet_env):
    url = f"http://127.0.0.1:{free_port()}"
    assert_unhealthy(health(fleet_env, "--role", "producer", "--url", url), f"GET {url}/healthz failed")
    env = {**fleet_env, "TURNFLEET_HTTP_PORT": url.rsplit(":", 1)[1]}
    assert_unhealthy(health(env, "--role", "producer"), f"GET {url}/healthz failed")


def test_producer_health_passes_against_turnfleet_serve(fleet_env, tmp_path):
    port = free_port()
    env = {**fleet_env, "TURNFLEET_HTTP_PORT": str(port)}
    log = open(tmp_path / "http.log", "wb")
    server = subprocess.Popen(  # what the producer container runs, on a free local port
        [*CLI, "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        deadline = time.monotonic() + 30
        while True:  # the probe itself is the readiness check
            run = health(env, "--role", "producer", "--timeout", "1")
            if run.returncode == 0 or time.monotonic() > deadline or server.poll() is not None:
                break
        assert run.returncode == 0, (run.stderr, (tmp_path / "http.log").read_text())
        assert f"GET http://127.0.0.1:{port}/healthz answered 200" in run.stdout
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_health_agrees_with_real_worker_and_telemetry_processes(fleet_env, tmp_path):
    """The probes find the heartbeats the real processes write under their default names,
    and a worker that stopped is unhealthy at once (it removes its heartbeat on the way out)."""
    procs = {
        role: FleetProcess(role, [role], fleet_env, tmp_path / f"{role}.log").start()
        for role in ("worker", "telemetry")
    }
    try:
        for role, proc in procs.items():
            deadline = time.monotonic() + 60
            while True:  # the probe itself is the readiness check
                run = health(fleet_env, "--role", role)
                if run.returncode == 0 or time.monotonic() > deadline or not proc.running():
                    break
            assert run.returncode == 0, (run.stderr, proc.output()[-2000:])
            assert f"{role} {socket.gethostname()}:{proc.pid} beat" in run.stdout
        assert procs["worker"].stop() == 0
        assert_unhealthy(health(fleet_env, "--role", "worker"), "no worker heartbeat")
    finally:
        for proc in procs.values():
            proc.stop()
