"""What the offline model answers, as data a workflow supplies: a ``Script``.

The offline model (``workers/model.py``) knows no workflow: it reads the conversation and asks
the workflow's script what the current agent does next. Adding a tool to a workflow means
adding to its script, never editing the model. The Support Desk's script
(``workers/support_desk_script.py``) is one instance; a workflow brings its own.

How a script decides, for one model call (``Script.decide``):

1. **Intent.** The latest user message, lower-cased, is matched against ``rules`` in order;
   the first ``Rule`` whose patterns all match names the intent. A ``FollowUp`` in the list
   stands for a message that only names the ``slot`` (e.g. "It's 1042"): it continues the
   intent the previous user message stated (by the rules above it) when that is one of
   ``continues``, else it is ``otherwise``. Nothing matched: ``fallback``.
2. **Slot.** The thing the conversation is about (an order id): the first one named in the
   latest user message, else the most recent one in the history (messages, and tool calls'
   arguments and outputs under the slot's name).
3. **Perform.** An agent that holds the first tool of the intent's ``steps`` runs the flow one
   step further: the furthest step already called this turn (for this slot) reacts to its
   result — its first ``Outcome`` that fits gives a reply or the next ``Call`` — or, when the
   result is not JSON (a tool error), the step's ``failed`` reply; with no step called yet, the
   first step's tool is called. An intent with ``ask`` needs the slot: without one, ``ask``.
4. **Route.** Otherwise an agent whose only handoff goes to the front desk (a handoff serving
   ``home``) hands the turn back there; an intent with ``route`` words is handed to the
   specialist whose handoff (agent or tool name) contains one of them (``ask`` first, when the
   slot is missing), or answered ``unavailable``. A handoff is never repeated to an agent that
   already received one in this turn.
5. **Reply.** Anything else is answered with the intent's ``reply``.

Replies and argument values are either a ``str.format`` template — fields: the result's keys,
the slot's name (its value) and ``text`` (the latest user message); a missing field is empty —
or a callable taking the ``Facts`` of the decision, for what a template cannot say.
Patterns are compiled once, when the script is built. This module does not import the SDK.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from turnfleet.tool_errors import is_tool_error

# --------------------------------------------------------------------------------------------
# Reading Responses-format input (shared with the model's usage count)


def _as_dict(item: Any) -> dict[str, Any]:
    if isinstance(item, Mapping):
        return dict(item)
    dump = getattr(item, "model_dump", None)
    if callable(dump):
        return dict(dump(exclude_unset=True))
    raise TypeError(f"unsupported input item {type(item).__name__}")


def normalize_input(input: str | Sequence[Any]) -> list[dict[str, Any]]:
    """The input as a list of Responses-format dicts (a bare string is one user message)."""
    if isinstance(input, str):
        return [{"content": input, "role": "user"}]
    return [_as_dict(item) for item in input]


def content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for part in content:
        part = _as_dict(part)
        text = part.get("text")
        if text is None:
            text = part.get("refusal", "")
        parts.append(str(text))
    return "".join(parts)


def kind_of(item: Mapping[str, Any]) -> str:
    kind = item.get("type")
    if kind is None and "role" in item:
        return "message"
    return str(kind)


def latest_user_index(items: Sequence[Mapping[str, Any]]) -> int | None:
    for index in range(len(items) - 1, -1, -1):
        if kind_of(items[index]) == "message" and items[index].get("role") == "user":
            return index
    return None


# --------------------------------------------------------------------------------------------
# The script's data


Pattern = Union[str, "re.Pattern[str]"]


def _compile(patterns: Pattern | Sequence[Pattern]) -> tuple[re.Pattern[str], ...]:
    if isinstance(patterns, (str, re.Pattern)):
        patterns = (patterns,)
    return tuple(re.compile(p) for p in patterns)


@dataclass(frozen=True)
class Slot:
    """What a conversation is about (an order id): found in text by ``patterns`` (group 1 if the
    pattern has one), carried in tool arguments and outputs under ``name``."""

    name: str
    patterns: Pattern | Sequence[Pattern]
    _groups: tuple[tuple[re.Pattern[str], int], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        compiled = _compile(self.patterns)
        object.__setattr__(self, "_groups", tuple((p, 1 if p.groups else 0) for p in compiled))

    def find(self, text: str) -> list[str]:
        """Values named in ``text``, in order of appearance, each once."""
        found = [
            (m.start(group), m.group(group))
            for pattern, group in self._groups
            for m in pattern.finditer(text)
        ]
        seen: list[str] = []
        for _, value in sorted(found):
            if value not in seen:
                seen.append(value)
        return seen


@dataclass(frozen=True)
class Rule:
    """The latest user message (lower-cased) states ``intent`` when every pattern matches."""

    intent: str
    patterns: Pattern | Sequence[Pattern]
    _compiled: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", _compile(self.patterns))

    def matches(self, lowered: str) -> bool:
        for pattern in self._compiled:
            if pattern.search(lowered) is None:
                return False
        return True


@dataclass(frozen=True)
class FollowUp:
    """A message naming only the slot continues the previous message's intent (module doc)."""

    continues: tuple[str, ...]
    otherwise: str


@dataclass
class Facts:
    """What a reply or argument callable knows: the conversation, the slot, the result."""

    conversation: Conversation
    result: Mapping[str, Any]
    tools: Collection[str]
    slot_kind: Slot | None

    @property
    def text(self) -> str:
        """The latest user message."""
        return self.conversation.user_text

    @property
    def slot(self) -> str | None:
        """The slot's current value (``Conversation.latest``)."""
        return self.conversation.latest(self.slot_kind)


Reply = Union[str, Callable[[Facts], str]]
Value = Union[str, Callable[[Facts], Any], Any]
When = Union[None, str, Callable[[Mapping[str, Any]], bool]]


@dataclass(frozen=True)
class Call:
    """Call ``tool`` with ``arguments`` (templates or callables); an agent without the tool
    answers ``otherwise`` instead (required for a call that is not a flow's first step)."""

    tool: str
    arguments: Mapping[str, Value] = field(default_factory=dict)
    otherwise: Reply | None = None


@dataclass(frozen=True)
class Outcome:
    """What a step's result leads to: ``when`` is None (always), a result field that must be
    truthy, or a predicate on the result; ``then`` a reply or the next ``Call``."""

    when: When
    then: Reply | Call

    def fits(self, result: Mapping[str, Any]) -> bool:
        if self.when is None:
            return True
        if isinstance(self.when, str):
            return bool(result.get(self.when))
        return bool(self.when(result))


@dataclass(frozen=True)
class Step:
    """One tool call of a flow and what its result leads to; ``per_slot``: only a call for the
    conversation's current slot counts as done."""

    call: Call
    outcomes: tuple[Outcome, ...]
    failed: Reply
    per_slot: bool = True


@dataclass(frozen=True)
class Intent:
    """What a user may want: the flow an agent holding its first tool runs (``steps``), the
    words of the specialist it is routed to (``route``), what is asked when the slot it needs
    is missing (``ask``), and the reply of an agent that neither runs nor routes it."""

    name: str
    steps: tuple[Step, ...] = ()
    route: tuple[str, ...] = ()
    ask: Reply | None = None
    reply: Reply | None = None


@dataclass(frozen=True)
class HandoffOption:
    """A handoff as the model sees it: the tool to call and who it reaches."""

    tool_name: str
    agent_name: str
    description: str = ""

    @classmethod
    def of(cls, handoff: Any) -> HandoffOption:
        """From the SDK's ``Handoff``."""
        return cls(handoff.tool_name, handoff.agent_name, handoff.tool_description)

    def serves(self, *words: str) -> bool:
        text = f"{self.agent_name} {self.tool_name}".lower()
        return any(word in text for word in words)


@dataclass(frozen=True)
class Decision:
    """What the model answers: a final message, a tool call, or a handoff (a function call)."""

    kind: Literal["message", "tool_call", "handoff"]
    intent: str
    text: str = ""
    name: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, separators=(",", ":"), ensure_ascii=False)


# --------------------------------------------------------------------------------------------
# Reading the conversation


@dataclass(frozen=True)
class ToolCallRecord:
    name: str
    arguments: dict[str, Any]
    output: str | None

    @property
    def result(self) -> dict[str, Any] | None:
        """The output as JSON, or None when the tool failed (a tool error, or plain text)."""
        if self.output is None or is_tool_error(self.output):
            return None
        try:
            value = json.loads(self.output)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class Conversation:
    """The input as a script reads it: the latest user message and this turn's calls."""

    items: list[dict[str, Any]]
    user_text: str
    previous_user_text: str | None
    calls: list[ToolCallRecord]  # this turn's function calls (tools and handoffs), in order
    handed_to: list[str]  # agents that received a handoff during this turn
    _latest: dict[str, str | None] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def read(cls, input: str | Sequence[Any]) -> Conversation:
        items = normalize_input(input)
        latest = latest_user_index(items)
        user_text = content_text(items[latest].get("content")) if latest is not None else ""
        previous = None
        if latest is not None:
            earlier = latest_user_index(items[:latest])
            if earlier is not None:
                previous = content_text(items[earlier].get("content"))
        turn = items[latest + 1 :] if latest is not None else items
        outputs = {
            item.get("call_id"): content_text(item.get("output"))
            for item in turn
            if kind_of(item) == "function_call_output"
        }
        calls: list[ToolCallRecord] = []
        handed_to: list[str] = []
        for item in turn:
            if kind_of(item) != "function_call":
                continue
            try:
                arguments = json.loads(item.get("arguments") or "{}")
            except ValueError:
                arguments = {}
            record = ToolCallRecord(
                name=str(item.get("name", "")),
                arguments=arguments if isinstance(arguments, dict) else {},
                output=outputs.get(item.get("call_id")),
            )
            calls.append(record)
            result = record.result
            if result is not None and set(result) == {"assistant"}:
                handed_to.append(str(result["assistant"]))
        return cls(items, user_text, previous, calls, handed_to)

    def latest(self, slot: Slot | None) -> str | None:
        """The slot this message is about: named in it, else the most recent one mentioned."""
        if slot is None:
            return None
        if slot.name not in self._latest:
            self._latest[slot.name] = self._find_latest(slot)
        return self._latest[slot.name]

    def _find_latest(self, slot: Slot) -> str | None:
        found = slot.find(self.user_text)
        if found:
            return found[0]
        for item in reversed(self.items):
            kind = kind_of(item)
            if kind == "message":
                found = slot.find(content_text(item.get("content")))
                if found:
                    return found[-1]
            elif kind in ("function_call", "function_call_output"):
                raw = item.get("arguments") if kind == "function_call" else item.get("output")
                try:
                    value = json.loads(content_text(raw) or "{}")
                except ValueError:
                    continue
                if isinstance(value, dict) and value.get(slot.name):
                    return str(value[slot.name])
        return None

    def last_call(
        self, name: str, slot: Slot | None = None, value: str | None = None
    ) -> ToolCallRecord | None:
        """This turn's latest answered call of ``name`` (for slot ``value``, when given)."""
        for call in reversed(self.calls):
            if call.name != name or call.output is None:
                continue
            if value is None or slot is None:
                return call
            if str(call.arguments.get(slot.name, "")).lstrip("#") == value:
                return call
        return None


# --------------------------------------------------------------------------------------------
# Deciding


class _Fields(dict):  # type: ignore[type-arg]
    def __missing__(self, key: str) -> str:
        return ""


def _render(reply: Reply, facts: Facts) -> str:
    if callable(reply):
        return reply(facts)
    fields = _Fields(facts.result)
    fields["text"] = facts.text
    if facts.slot_kind is not None:
        fields[facts.slot_kind.name] = facts.slot or ""
    return reply.format_map(fields)


@dataclass(frozen=True)
class Script:
    """A workflow's rules for the offline model (module docstring); build it once, at import."""

    rules: tuple[Rule | FollowUp, ...]
    intents: tuple[Intent, ...]
    fallback: str
    slot: Slot | None = None
    home: tuple[str, ...] = ()  # words naming the front desk's handoff (agent or tool name)
    unavailable: Reply = "I'm sorry, I can't take care of that right now."
    _by_name: dict[str, Intent] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name = {intent.name: intent for intent in self.intents}
        named = {self.fallback}
        for rule in self.rules:
            named |= {rule.intent} if isinstance(rule, Rule) else {*rule.continues, rule.otherwise}
        missing = sorted(named - set(by_name))
        if missing:
            raise ValueError(f"script: rules name intents it does not define: {missing}")
        object.__setattr__(self, "_by_name", by_name)

    def stated(self, text: str, upto: int | None = None) -> str | None:
        """The intent ``text`` states by the plain rules (above position ``upto``), or None."""
        lowered = text.lower()
        for rule in self.rules[:upto]:
            if isinstance(rule, Rule) and rule.matches(lowered):
                return rule.intent
        return None

    def intent_of(self, conv: Conversation) -> Intent:
        lowered = conv.user_text.lower()
        for index, rule in enumerate(self.rules):
            if isinstance(rule, FollowUp):
                if self.slot is not None and self.slot.find(conv.user_text):
                    previous = self.stated(conv.previous_user_text or "", index)
                    name = previous if previous in rule.continues else rule.otherwise
                    return self._by_name[name]
            elif rule.matches(lowered):
                return self._by_name[rule.intent]
        return self._by_name[self.fallback]

    def decide(
        self,
        input: str | Sequence[Any],
        tool_names: Collection[str],
        handoffs: Sequence[HandoffOption],
    ) -> Decision:
        """The next step for an agent with these tools and handoffs, given the conversation."""
        conv = Conversation.read(input)
        intent = self.intent_of(conv)
        tools = set(tool_names)

        def message(reply: Reply, result: Mapping[str, Any] | None = None) -> Decision:
            facts = Facts(conv, result or {}, tools, self.slot)
            return Decision("message", intent.name, text=_render(reply, facts))

        if intent.steps and intent.steps[0].call.tool in tools:
            value = conv.latest(self.slot)
            if intent.ask is not None and value is None:
                return message(intent.ask)
            return self._perform(intent, conv, tools, value, message)

        to_home = (
            next((h for h in handoffs if h.serves(*self.home)), None) if self.home else None
        )
        specialists = [h for h in handoffs if h is not to_home]

        def handoff(option: HandoffOption) -> Decision | None:
            if option.agent_name in conv.handed_to:
                return None  # already routed there this turn: never ping-pong
            return Decision("handoff", intent.name, name=option.tool_name)

        if to_home is not None and not specialists:
            # A specialist: anything outside its tools goes back to the front desk.
            routed = handoff(to_home)
            if routed is not None:
                return routed
        if intent.route:
            if intent.ask is not None and conv.latest(self.slot) is None:
                return message(intent.ask)
            for option in specialists:
                if option.serves(*intent.route):
                    routed = handoff(option)
                    if routed is not None:
                        return routed
            return message(self.unavailable)
        return message(intent.reply if intent.reply is not None else self.unavailable)

    def _perform(
        self,
        intent: Intent,
        conv: Conversation,
        tools: set[str],
        value: str | None,
        message: Callable[..., Decision],
    ) -> Decision:
        """The agent holds the intent's tool: run its flow one step further."""

        def call(step_call: Call, result: Mapping[str, Any]) -> Decision:
            facts = Facts(conv, result, tools, self.slot)
            arguments = {
                key: _render(arg, facts)
                if isinstance(arg, str) or callable(arg)
                else arg
                for key, arg in step_call.arguments.items()
            }
            return Decision("tool_call", intent.name, name=step_call.tool, arguments=arguments)

        for step in reversed(intent.steps):
            done = conv.last_call(step.call.tool, self.slot, value if step.per_slot else None)
            if done is None:
                continue
            result = done.result
            if result is None:
                return message(step.failed)
            for outcome in step.outcomes:
                if not outcome.fits(result):
                    continue
                then = outcome.then
                if not isinstance(then, Call):
                    return message(then, result)
                if then.tool in tools:
                    return call(then, result)
                return message(then.otherwise or self.unavailable, result)
            return message(self.unavailable, result)
        return call(intent.steps[0].call, {})
