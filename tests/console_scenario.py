"""The web console's data: the demo scenario through a real fleet, plus a retried turn.

Used by ``tests/test_console.py`` (browser and HTTP tests) and ``tests/console_screenshots.py``
(the README's pictures), so both show the same, real data:

1. the five conversations of ``turnfleet demo`` (``turnfleet.shell.demo.SCENARIO``), on the offline
   model, through a real ``turnfleet worker --burst``;
2. one more conversation for customer C-100 whose text carries a card number and an email
   address (redacted in telemetry) and whose first attempt fails: its worker talks to the
   local OpenAI-compatible endpoint of ``tests/llm_server.py``, told to answer its first
   request 500, with client retries off, so attempt 1 fails and attempt 2 completes; and one
   for C-101 (``FAILED``) whose every request gets a 500, so both its attempts fail and the
   turn ends failed;
3. one refund on the flawed offline model (``turnfleet-offline-flawed``) for C-103
   (``WRONG_REFUND``): asked for order 1050, it refunds 1049, and the check
   ``refund_order_named_by_customer`` fails on that turn (the money view's anomaly);
4. with ``markup=True``, a conversation whose text is HTML (``MARKUP_TEXT``), for the tests
   that check every page escapes what it shows;
5. one ``turnfleet telemetry --burst`` over all of it (the demo's low conversation-cost
   threshold, so the long conversation raises a real ``conversation_cost`` alert).

Conversation ids are fixed (``console-<label>``), turn ids ``<conversation>-t<n>``.

:func:`console_fleet` does the rest of what a browser test needs: its own ``redis-server``,
the scenario, then a real ``turnfleet serve`` subprocess with the test keys; and
:func:`launch_chromium` starts Debian's Chromium (``/usr/bin/chromium``, never a downloaded
browser) under Playwright.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from turnfleet.producer import Producer
from tests.llm_server import LLMServer
from turnfleet.auth import hash_key
from turnfleet.shell.demo import DEMO_CONVERSATION_COST_ALERT_USD, SCENARIO
from turnfleet.shell.embedded import RedisServer
from turnfleet.shell.fleet import FleetProcess, listening_socket
from turnfleet.shell.story import refund_text

CHROMIUM = "/usr/bin/chromium"  # Debian's package; `make test` installs it
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

OPERATOR = "tfk_console-operator"
C100 = "tfk_console-c100"  # customer A
C102 = "tfk_console-c102"  # customer B
API_KEYS = [
    {"name": "ops", "sha256": hash_key(OPERATOR), "customers": ["*"]},
    {"name": "portal-c100", "sha256": hash_key(C100), "customers": ["C-100"]},
    {"name": "portal-c102", "sha256": hash_key(C102), "customers": ["C-102"]},
]

PREFIX = "console-"
RETRIED = f"{PREFIX}dana-card"
RETRIED_CUSTOMER = "C-100"
RETRIED_TEXT = ("Please refund order 1042, it was charged twice to my card 4242 4242 4242 4242. "
                "Send the receipt to dana.whitfield@example.com")
RETRIED_MODEL = "gpt-4o-mini"  # priced, so the spend table shows a second model
FAILED = f"{PREFIX}erin-failed"  # every attempt of its one turn gets a 500: the turn fails
FAILED_CUSTOMER = "C-101"
FAILED_TEXT = "Is my order 1044 on its way?"
FAILED_ATTEMPTS = 2
WRONG_REFUND = f"{PREFIX}tomas-wrong-refund"  # on the flawed model: asks for 1050, gets 1049 refunded
WRONG_REFUND_CUSTOMER = "C-103"
WRONG_REFUND_ASKED, WRONG_REFUND_ORDER = "1050", "1049"
MARKUP = f"{PREFIX}markup"
MARKUP_TEXT = '<img src=x onerror="alert(1)"> <b>Where</b> is order 1043?'


@dataclass
class Scenario:
    """What ran: conversation id -> customer, and every turn id per conversation."""

    conversations: dict[str, str] = field(default_factory=dict)
    turns: dict[str, list[str]] = field(default_factory=dict)

    def conversation(self, label: str) -> str:
        return f"{PREFIX}{label}"


def _batch(items: list[tuple[str, str, list[str]]], scenario: Scenario) -> list[dict[str, object]]:
    batch: list[dict[str, object]] = []
    for label, customer, texts in items:
        cid = scenario.conversation(label)
        scenario.conversations[cid] = customer
        scenario.turns[cid] = []
        for i, text in enumerate(texts, 1):
            tid = f"{cid}-t{i}"
            scenario.turns[cid].append(tid)
            batch.append({"conversation_id": cid, "customer_id": customer, "text": text,
                          "turn_id": tid, "metadata": {"channel": "console-test"}})
    return batch


async def _enqueue(redis_url: str, batch: list[dict[str, object]]) -> None:
    async with Producer(redis_url) as producer:
        await producer.enqueue_turns(batch)


def _burst(verb: str, env: Mapping[str, str], log_dir: Path, name: str) -> None:
    proc = FleetProcess(name, [verb, "--burst"], env, log_dir / f"{name}.log").start()
    code = proc.wait(120)
    if code != 0:
        raise RuntimeError(f"{name} exited {code}:\n{proc.output()[-3000:]}")


def run_console_scenario(redis_url: str, env: Mapping[str, str], log_dir: Path,
                         markup: bool = False) -> Scenario:
    """Run everything (module docstring) against ``redis_url``; ``env`` is the processes'
    environment (``REDIS_URL`` and nothing else of turnfleet's). Blocks until telemetry has
    aggregated every turn."""
    scenario = Scenario()
    env = {**env, "REDIS_URL": redis_url,
           "TURNFLEET_ALERT_CONVERSATION_COST_USD": DEMO_CONVERSATION_COST_ALERT_USD}
    extra = [(MARKUP.removeprefix(PREFIX), "C-103", [MARKUP_TEXT])] if markup else []
    asyncio.run(_enqueue(redis_url, _batch(SCENARIO + extra, scenario)))
    _burst("worker", env, log_dir, "worker-offline")
    asyncio.run(_enqueue(redis_url, _batch(
        [(WRONG_REFUND.removeprefix(PREFIX), WRONG_REFUND_CUSTOMER,
          [refund_text(WRONG_REFUND_ASKED, wrong=True)])], scenario)))
    _burst("worker", {**env, "TURNFLEET_MODEL_NAME": "turnfleet-offline-flawed"}, log_dir,
           "worker-flawed")

    llm = LLMServer().start()
    try:
        llm.inject("500", times=1, match=RETRIED_TEXT[:40])  # attempt 1 fails, attempt 2 completes
        llm.inject("500", times=None, match=FAILED_TEXT)  # every attempt fails
        asyncio.run(_enqueue(redis_url, _batch(
            [(RETRIED.removeprefix(PREFIX), RETRIED_CUSTOMER, [RETRIED_TEXT]),
             (FAILED.removeprefix(PREFIX), FAILED_CUSTOMER, [FAILED_TEXT])], scenario)))
        _burst("worker", llm.worker_env(env, model=RETRIED_MODEL, TURNFLEET_MODEL_MAX_RETRIES="0",
                                        TURNFLEET_RETRY_DELAY_S="0.05",
                                        TURNFLEET_MAX_ATTEMPTS=str(FAILED_ATTEMPTS)),
               log_dir, "worker-endpoint")
    finally:
        llm.stop()
    _burst("telemetry", env, log_dir, "telemetry")
    return scenario


@dataclass
class ConsoleFleet:
    """A served console: its base URL, its Redis, what ran, and the server's log."""

    url: str
    redis_url: str
    scenario: Scenario
    serve: FleetProcess


def process_env(redis_url: str, state_dir: Path) -> dict[str, str]:
    """This environment without any ``TURNFLEET_*`` / ``REDIS_URL`` of the caller's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNFLEET_") and k != "REDIS_URL"}
    env.update(REDIS_URL=redis_url, TURNFLEET_STATE_DIR=str(state_dir),
               TURNFLEET_LOG_FORMAT="json", PYTHONUNBUFFERED="1")
    return env


@contextlib.contextmanager
def console_fleet(workdir: Path, markup: bool = False) -> Iterator[ConsoleFleet]:
    """Redis, the scenario, and ``turnfleet serve`` on a free port, ready when it yields."""
    redis = RedisServer(workdir / "redis")
    redis.start()
    serve: FleetProcess | None = None
    try:
        env = process_env(redis.url, workdir / "state")
        scenario = run_console_scenario(redis.url, env, workdir / "logs", markup=markup)
        sock = listening_socket()  # requests queue on it until serve is up: no probing
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        serve = FleetProcess("serve", ["serve", "--fd", str(sock.fileno())],
                             {**env, "TURNFLEET_API_KEYS": json.dumps(API_KEYS)},
                             workdir / "logs" / "serve.log", pass_fds=(sock.fileno(),)).start()
        sock.close()  # the child holds it now: if it dies, requests fail instead of waiting
        wait_ready(url, serve)
        yield ConsoleFleet(url, redis.url, scenario, serve)
    finally:
        if serve is not None:
            serve.stop()
        redis.kill()


def wait_ready(url: str, serve: FleetProcess, timeout_s: float = 30.0) -> None:
    """``/healthz`` answers 200 (the request waits on the listening socket while the server
    starts), or fail with the server's log."""
    try:
        status = httpx.get(f"{url}/healthz", timeout=timeout_s).status_code
    except httpx.TransportError as exc:
        status = f"{type(exc).__name__}: {exc}"
    if status != 200:
        raise RuntimeError(f"turnfleet serve did not start ({status}):\n{serve.output()[-3000:]}")


def launch_chromium(playwright: Any) -> Any:
    """Debian's Chromium under Playwright, headless, talking to nothing but this machine."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
