"""A local OpenAI-compatible model endpoint for tests and drills: an offline script over HTTP.

``LLMServer`` answers ``POST /v1/chat/completions`` and ``POST /v1/responses`` with the
decisions of the offline model (``turnfleet.workers.model.decide``) following ``script`` (a
``turnfleet.Script``; default: the Support Desk's), so a team's workflow runs on it with its
own decisions: ``llm_server(script=HELPDESK_SCRIPT)``. The request's messages (tool calls
and tool results included) and its tools (handoffs are the ``transfer_to_*`` tools) are turned
into the offline model's input, and the decision comes back as ``tool_calls`` or a message,
with usage counted by the offline model's formula (so for the same conversation the numbers
equal the offline model's). It can be slow, fail, or hold requests, as a test says::

    server = llm_server(latency=0.02)              # fixture factory; stopped after the test
    env = server.worker_env(fleet_env)             # TURNFLEET_MODEL_BASE_URL=<server.url>, ...
    server.inject("500", times=2)                  # the next 2 requests answer 500
    server.inject("429", retry_after=0.1)          # then one 429 with Retry-After: 0.1
    server.inject("timeout")                       # one request stalls past any client timeout
    server.inject("garbage")                       # 200, body not JSON
    server.inject("schemaless")                    # 200, JSON without 'choices' / 'output'
    server.inject("503", times=None, match="1099") # every request of a turn whose latest user
                                                   # message contains "1099"
    server.inject("400", echo=True)                # the error message quotes the user's message,
                                                   # as providers' content errors do
    server.error_rate = 0.1                        # and 10% of the others (seeded RNG) fail
    server.reply('{"score": 0.9}', match="grade")  # requests whose latest user message contains
                                                   # "grade" get this text as the answer (an LLM
                                                   # judge's JSON), usage by the same formula
    server.hold(match="refund")                    # matching requests wait at a gate...
    server.hold(after_tool="process_refund")       # (or: only those that follow that tool's
                                                   # result in this turn, i.e. after it ran)
    await server.wait_held(1)                      # ...until one is waiting (kill a worker now)
    server.release()                               # let held (and later) requests through
    await server.wait_for(lambda s: s.counts["ok"] >= 5)
    server.counts                                  # Counter: ok, 500, 429, timeout, garbage, ...

Faults are tried in the order injected; the first whose ``match`` fits and which has
``times`` left answers the request. A request no fault took may fail by ``error_rate``
(``error_kind``), else it is served after ``latency`` seconds.

What the counters mean: every request lands in ``log`` (a :class:`Served` each) and in
``counts`` under its outcome: ``ok`` (a completion was sent: its usage is in the record), a
status code string (``"500"``, ``"429"``, ...), ``timeout`` (counted when the stall begins;
the answer never comes, the server gives up after ``stall_s`` or at stop), ``garbage``,
``schemaless``, ``bad_request`` (not a completion request we understand) or ``not_found``.
``ok`` means the server answered, not that the client read it: a client that timed out or
died while the server was sleeping or holding does not see its answer, so compare usage
with what the worker recorded only when no answer can have been lost that way.

The server runs uvicorn on its own thread and event loop (tests block on subprocesses), on a
socket bound and listening before ``start`` returns, so it is ready at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
from openai.types.responses import (
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from turnfleet.offline_script import Script
from turnfleet.workers.model import (
    Decision,
    HandoffOption,
    canonical_json,
    compute_usage,
    decide,
    item_text,
)

HANDOFF_PREFIX = "transfer_to_"
_HANDOFF_AGENT = re.compile(r"^Handoff to the (.+?) agent\b")
FAULT_KINDS = ("timeout", "garbage", "schemaless")  # besides HTTP status codes ("500", "429")


@dataclass
class Fault:
    """One injected fault: what the matching requests get, and how many of them."""

    kind: str  # an HTTP status ("500", "503", "429", "400") or one of FAULT_KINDS
    times: int | None = 1  # requests it answers; None: all matching ones, until cleared
    retry_after: float | None = None  # seconds, sent as Retry-After with a status answer
    match: str | None = None  # only requests whose latest user message contains this
    echo: bool = False  # the error message quotes the latest user message (status faults)
    served: int = 0

    def takes(self, user_text: str) -> bool:
        if self.times is not None and self.served >= self.times:
            return False
        return self.match is None or self.match in user_text


@dataclass
class Served:
    """What happened to one request."""

    number: int  # 1-based arrival order
    path: str
    outcome: str  # "ok", a status code, "timeout", "garbage", "schemaless", ...
    user_text: str = ""
    retry_count: int = 0  # the openai client's x-stainless-retry-count: 0 first try, n retry n
    arrived: float = 0.0  # time.monotonic()
    usage: dict[str, int] | None = None  # on ok: input, output, cached tokens
    decision: str = ""  # on ok: "message", or the tool / handoff called
    model: str = ""  # the model the request named


class LLMServer:
    """An OpenAI-compatible endpoint serving the offline model's decisions (module docstring).

    Attributes a test may change at run time: ``latency`` (s per request), ``error_rate``
    (0–1, seeded by ``seed``), ``error_kind`` (the fault a random error is), ``stall_s`` (how
    long a ``timeout`` fault stalls). Everything else through the methods; all are
    thread-safe.
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        error_rate: float = 0.0,
        error_kind: str = "500",
        seed: int = 0,
        stall_s: float = 30.0,
        script: Script | None = None,
    ) -> None:
        self.script = script  # whose decisions it serves (None: the Support Desk's)
        self.latency = latency
        self.error_rate = error_rate
        self.error_kind = error_kind
        self.stall_s = stall_s
        self._rng = random.Random(seed)
        self._faults: list[Fault] = []
        self._replies: list[tuple[str | None, str]] = []  # (match, text): scripted answers
        self._changed = threading.Condition()
        self.log: list[Served] = []
        self.counts: Counter[str] = Counter()
        self.held = 0  # requests waiting at the gate now
        self._arrivals = 0
        self._hold: str | None | bool = False  # False: open; None: hold all; str: hold matching
        self._hold_after: str | None = None  # and only requests after this tool's result
        self._gate: asyncio.Event | None = None
        self._closing: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/responses", self._responses, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
        ])

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._socket is not None, "start() the server first"
        return self._socket.getsockname()[1]

    @property
    def url(self) -> str:
        """The base URL a client is given: ``http://127.0.0.1:<port>/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def worker_env(self, env: Mapping[str, str], model: str = "gpt-4o-mini",
                   **extra: str) -> dict[str, str]:
        """``env`` plus what points a worker at this server: base URL, ``model`` (gpt-4o-mini
        has a price, so cost is known) and a dummy API key; ``extra`` variables last."""
        return {
            **env,
            "TURNFLEET_MODEL_BASE_URL": self.url,
            "TURNFLEET_MODEL_NAME": model,
            "TURNFLEET_MODEL_API_KEY": "sk-test-dummy",
            **extra,
        }

    def start(self) -> LLMServer:
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only
        # when the socket says TCP, and without it every answer waits ~40 ms (Nagle against
        # the client's delayed ACK).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)  # connections queue from now on: ready before uvicorn runs
        self._socket = sock
        config = uvicorn.Config(self.app, lifespan="off", log_level="warning",
                                access_log=False, timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(sock, started), daemon=True,
                                        name=f"llm-server-{self.port}")
        self._thread.start()
        started.wait(10)
        return self

    def _run(self, sock: socket.socket, started: threading.Event) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._closing = asyncio.Event()
            started.set()
            assert self._server is not None
            await self._server.serve(sockets=[sock])

        asyncio.run(serve())

    def stop(self) -> None:
        """Wake held and stalled requests, stop serving, join the thread."""
        if self._server is None:
            return
        self._server.should_exit = True
        self.release()
        if self._loop is not None and self._closing is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._closing.set)
        if self._thread is not None:
            self._thread.join(15)
        if self._socket is not None:
            self._socket.close()
        self._server = None

    def __enter__(self) -> LLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control -----------------------------------------------------------------------

    def inject(self, kind: str | int, times: int | None = 1, *, retry_after: float | None = None,
               match: str | None = None, echo: bool = False) -> Fault:
        """Answer the next ``times`` matching requests with a fault (module docstring)."""
        kind = str(kind)
        if kind not in FAULT_KINDS and not (kind.isdigit() and 400 <= int(kind) <= 599):
            raise ValueError(f"fault kind must be an HTTP error status or one of {FAULT_KINDS}")
        fault = Fault(kind, times, retry_after, match, echo)
        with self._changed:
            self._faults.append(fault)
        return fault

    def reply(self, text: str, *, match: str | None = None) -> None:
        """From now on, answer requests whose latest user message contains ``match`` (all, if
        None) with the message ``text`` instead of the offline model's decision (the first
        matching reply given wins; a later call for the same ``match`` replaces it)."""
        with self._changed:
            self._replies = [(m, t) for m, t in self._replies if m != match] + [(match, text)]

    def clear_faults(self) -> None:
        with self._changed:
            self._faults.clear()

    def hold(self, match: str | None = None, *, after_tool: str | None = None) -> None:
        """From now on, requests (those whose latest user message contains ``match``, if
        given; with ``after_tool``, only those whose turn already holds that tool's result:
        the model call after the tool ran) wait at a gate until :meth:`release`; ``held``
        counts those waiting."""
        with self._changed:
            self._hold, self._hold_after = match, after_tool

    def release(self) -> None:
        """Open the gate: held requests go on, new ones are not held."""
        with self._changed:
            self._hold = False
            gate, self._gate = self._gate, None  # a later hold() gets a new gate
        if gate is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(gate.set)

    def wait_for_sync(self, predicate: Callable[[LLMServer], bool], timeout: float = 10.0) -> None:
        """Block until ``predicate(server)`` holds (checked on every change); ``TimeoutError``
        after ``timeout`` seconds, with the counters in the message."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self), timeout):
                raise TimeoutError(f"LLMServer: condition not met in {timeout}s; "
                                   f"counts={dict(self.counts)} held={self.held}")

    async def wait_for(self, predicate: Callable[[LLMServer], bool], timeout: float = 10.0) -> None:
        """:meth:`wait_for_sync` without blocking the caller's event loop."""
        await asyncio.to_thread(self.wait_for_sync, predicate, timeout)

    async def wait_held(self, n: int = 1, timeout: float = 10.0) -> None:
        """Until at least ``n`` requests are waiting at the gate."""
        await self.wait_for(lambda s: s.held >= n, timeout)

    # -- figures -----------------------------------------------------------------------

    @property
    def requests(self) -> int:
        """Requests received so far, whatever became of them (waiting ones included)."""
        return self._arrivals

    def served(self, outcome: str | None = None) -> list[Served]:
        with self._changed:
            return [s for s in self.log if outcome is None or s.outcome == outcome]

    def usage_served(self) -> dict[str, int]:
        """Sum of the usage the server reported in its ``ok`` answers, plus ``requests``."""
        total = Counter({"input_tokens": 0, "output_tokens": 0, "cached_tokens": 0, "requests": 0})
        for record in self.served("ok"):
            total.update(record.usage or {})
            total["requests"] += 1
        return dict(total)

    # -- serving -----------------------------------------------------------------------

    def _record(self, served: Served) -> None:
        with self._changed:
            self.log.append(served)
            self.counts[served.outcome] += 1
            self._changed.notify_all()

    async def _gatekeeper(self, user_text: str, items: Sequence[dict[str, Any]] = ()) -> None:
        with self._changed:
            hold = self._hold
            if hold is False or (hold is not None and hold not in user_text):
                return
            if self._hold_after is not None and self._hold_after not in _answered_tools(items):
                return
            if self._gate is None:
                self._gate = asyncio.Event()
            gate = self._gate
            self.held += 1
            self._changed.notify_all()
        try:
            await self._until(gate)
        finally:
            with self._changed:
                self.held -= 1
                self._changed.notify_all()

    async def _until(self, event: asyncio.Event, timeout: float | None = None) -> None:
        """Wait for ``event`` (or the server closing), at most ``timeout`` seconds."""
        assert self._closing is not None
        waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(self._closing.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _serve(self, request: Request, shape: str) -> Response:
        try:
            body = await request.json()
            system, items, tools = (_read_chat if shape == "chat" else _read_responses)(body)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            self._record(Served(self._number(), request.url.path, "bad_request"))
            return _error(400, f"cannot read the request: {exc}", "invalid_request_error")
        if body.get("stream"):
            self._record(Served(self._number(), request.url.path, "bad_request"))
            return _error(400, "this test server does not stream", "invalid_request_error")
        user_text = _latest_user_text(items)
        retry = request.headers.get("x-stainless-retry-count", "0")
        record = Served(self._number(), request.url.path, "", user_text,
                        int(retry) if retry.isdigit() else 0, time.monotonic(),
                        model=str(body.get("model") or ""))
        with self._changed:
            self._changed.notify_all()  # a request arrived (wait_for predicates may read log)
        await self._gatekeeper(user_text, items)
        kind, retry_after, echo = self._take_fault(user_text)
        if kind == "timeout":
            record.outcome = "timeout"
            self._record(record)
            assert self._closing is not None
            await self._until(self._closing, timeout=self.stall_s)
            return _error(504, "the test server stalled on purpose", "timeout")
        if self.latency > 0:
            await asyncio.sleep(self.latency)  # simulated model time, not synchronisation
        if kind is not None:
            record.outcome = kind
            self._record(record)
            return _fault_response(kind, retry_after, user_text if echo else None)
        with self._changed:
            scripted = next((t for m, t in self._replies if m is None or m in user_text), None)
        answer, usage, decision = _answer(shape, body, system, items, tools, self.script, scripted)
        record.outcome, record.usage, record.decision = "ok", usage, decision
        self._record(record)
        return JSONResponse(answer, headers={"x-request-id": f"req_{record.number}"})

    def _number(self) -> int:
        with self._changed:
            self._arrivals += 1
            return self._arrivals

    def _take_fault(self, user_text: str) -> tuple[str | None, float | None, bool]:
        with self._changed:
            for fault in self._faults:
                if fault.takes(user_text):
                    fault.served += 1
                    return fault.kind, fault.retry_after, fault.echo
            if self.error_rate > 0 and self._rng.random() < self.error_rate:
                return self.error_kind, None, False
        return None, None, False

    async def _chat(self, request: Request) -> Response:
        return await self._serve(request, "chat")

    async def _responses(self, request: Request) -> Response:
        return await self._serve(request, "responses")

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": []})


# --------------------------------------------------------------------------------------------
# Requests in, the offline model's input out


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(str(part.get("text") or part.get("refusal") or "") for part in content)


def _read_chat(body: dict[str, Any]) -> tuple[str | None, list[dict[str, Any]], list[dict[str, Any]]]:
    """System instructions, Responses-format items and flat tools of a Chat Completions request."""
    messages = body["messages"]
    system: str | None = None
    items: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        role = message["role"]
        if role in ("system", "developer") and index == 0:
            system = _text_of(message.get("content"))
        elif role == "assistant":
            if message.get("content"):
                items.append({"role": "assistant", "content": message["content"]})
            for call in message.get("tool_calls") or []:
                items.append({"type": "function_call", "call_id": call["id"],
                              "name": call["function"]["name"],
                              "arguments": call["function"].get("arguments") or ""})
        elif role == "tool":
            items.append({"type": "function_call_output", "call_id": message.get("tool_call_id"),
                          "output": _text_of(message.get("content"))})
        else:
            items.append({"role": role, "content": message.get("content")})
    tools = [t["function"] for t in body.get("tools") or [] if t.get("type") == "function"]
    return system, items, tools


def _read_responses(body: dict[str, Any]) -> tuple[str | None, list[dict[str, Any]], list[dict[str, Any]]]:
    """The same for a Responses request (its input already is in the offline model's format)."""
    raw = body["input"]
    items = [{"role": "user", "content": raw}] if isinstance(raw, str) else list(raw)
    tools = [t for t in body.get("tools") or [] if t.get("type") == "function"]
    return body.get("instructions"), items, tools


def _latest_user_text(items: Sequence[dict[str, Any]]) -> str:
    for item in reversed(items):
        if item.get("role") == "user" and item.get("type", "message") == "message":
            return _text_of(item.get("content"))
    return ""


def _answered_tools(items: Sequence[dict[str, Any]]) -> set[str]:
    """Tools called since the latest user message whose result is in ``items``."""
    start = max((i for i, item in enumerate(items) if item.get("role") == "user"), default=-1)
    turn = items[start + 1:]
    answered = {item.get("call_id") for item in turn if item.get("type") == "function_call_output"}
    return {str(item.get("name")) for item in turn
            if item.get("type") == "function_call" and item.get("call_id") in answered}


def handoff_option(tool: dict[str, Any]) -> HandoffOption:
    """A ``transfer_to_*`` tool as the handoff it is; the agent name comes from the SDK's
    default description ("Handoff to the Billing agent ..."), else from the tool name."""
    description = str(tool.get("description") or "")
    named = _HANDOFF_AGENT.match(description)
    agent = named.group(1) if named else tool["name"][len(HANDOFF_PREFIX):].replace("_", " ").title()
    return HandoffOption(tool["name"], agent, description)


def _answer(shape: str, body: dict[str, Any], system: str | None, items: list[dict[str, Any]],
            tools: list[dict[str, Any]], script: Script | None = None, scripted: str | None = None,
            ) -> tuple[dict[str, Any], dict[str, int], str]:
    """The answer body, the usage reported in it, and the decision in short (``scripted``: a
    message with that text, not the offline model's decision)."""
    names = [str(t["name"]) for t in tools]
    handoffs = [handoff_option(t) for t in tools if str(t["name"]).startswith(HANDOFF_PREFIX)]
    decision = (Decision("message", "scripted", text=scripted) if scripted is not None else
                decide(items, [n for n in names if not n.startswith(HANDOFF_PREFIX)], handoffs, script))
    digest = hashlib.sha256(canonical_json(
        [system, [item_text(i) for i in items], decision.kind, decision.name, decision.arguments,
         decision.text]).encode()).hexdigest()[:24]
    output = _output_items(decision, digest)
    # The offline model's formula, on the same text: tools count name + description + schema.
    as_tools = [SimpleNamespace(name=t["name"], description=t.get("description") or "",
                                params_json_schema=t.get("parameters")) for t in tools]
    usage = compute_usage(system, items, as_tools, [], output)  # type: ignore[arg-type]
    cached = usage.input_tokens_details.cached_tokens
    reported = {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
                "cached_tokens": cached}
    short = "message" if decision.kind == "message" else decision.name
    model = str(body.get("model") or "test-model")
    if shape == "responses":
        return {
            "id": f"resp_{digest}", "object": "response", "created_at": int(time.time()),
            "model": model, "status": "completed", "instructions": system,  # echoed, as OpenAI does
            "output": [item.model_dump(exclude_none=True) for item in output],
            "tool_choice": "auto", "tools": [], "parallel_tool_calls": True,
            "usage": {"input_tokens": usage.input_tokens,
                      "input_tokens_details": {"cached_tokens": cached},
                      "output_tokens": usage.output_tokens,
                      "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": usage.total_tokens},
        }, reported, short
    if decision.kind == "message":
        message: dict[str, Any] = {"role": "assistant", "content": decision.text}
        finish = "stop"
    else:
        message = {"role": "assistant", "content": None, "tool_calls": [{
            "id": f"call_{digest}", "type": "function",
            "function": {"name": decision.name, "arguments": decision.arguments_json}}]}
        finish = "tool_calls"
    return {
        "id": f"chatcmpl-{digest}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens,
                  "total_tokens": usage.total_tokens,
                  "prompt_tokens_details": {"cached_tokens": cached},
                  "completion_tokens_details": {"reasoning_tokens": 0}},
    }, reported, short


def _output_items(decision: Decision, digest: str) -> list[Any]:
    if decision.kind == "message":
        return [ResponseOutputMessage(
            id=f"msg_{digest}", type="message", role="assistant", status="completed",
            content=[ResponseOutputText(type="output_text", text=decision.text, annotations=[])])]
    return [ResponseFunctionToolCall(
        id=f"fc_{digest}", call_id=f"call_{digest}", type="function_call", name=decision.name,
        arguments=decision.arguments_json, status="completed")]


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                        status_code=status, headers=headers)


def _fault_response(kind: str, retry_after: float | None, echo: str | None = None) -> Response:
    if kind == "garbage":
        return Response("<html><body>502 Bad Gateway</body></html>\n{not json",
                        media_type="application/json")
    if kind == "schemaless":
        return JSONResponse({"status": "ok", "result": None})
    status = int(kind)
    headers = {"retry-after": f"{retry_after:g}"} if retry_after is not None else None
    error_type = "rate_limit_error" if status == 429 else "server_error" if status >= 500 \
        else "invalid_request_error"
    message = f"injected fault: {status}" + (f"; could not process input: {echo}" if echo is not None else "")
    return _error(status, message, error_type, headers)


@pytest.fixture
def llm_server(endpoint_clients_closed: None) -> Iterator[Callable[..., LLMServer]]:
    """Start :class:`LLMServer` instances (keyword arguments as its constructor); all are
    stopped after the test. Import it into a test module: ``from tests.llm_server import
    llm_server``."""
    started: list[LLMServer] = []

    def start(**options: Any) -> LLMServer:
        server = LLMServer(**options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


__all__ = ["Fault", "LLMServer", "Served", "handoff_option", "llm_server"]

