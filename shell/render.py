"""Terminal views (rich) of turns, conversations, stats and alerts, shared by CLI and demo."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from turnfleet.checks import NOT_APPLICABLE
from turnfleet.formatting import money, ms
from turnfleet.models import Alert, TurnResult
from turnfleet.tool_errors import tool_outcome


def console() -> Console:
    """stdout; at least 120 columns when not a terminal (pipes, CI logs) so trees stay readable."""
    width = None if sys.stdout.isatty() else 120
    return Console(file=sys.stdout, highlight=False, soft_wrap=False, width=width)


def _args(arguments: str) -> str:
    try:
        data = json.loads(arguments) if arguments else {}
    except ValueError:
        return arguments
    if not isinstance(data, dict):
        return arguments
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in data.items())


def _short(text: str | None, limit: int = 160) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


STATUS_STYLE = {"completed": "green", "failed": "red", "running": "yellow", "queued": "dim"}


def turn_headline(
    result: TurnResult, cost: float | None, label: str = "", show_cost: bool = True
) -> Text:
    t = Text()
    if label:
        t.append(f"{label}  ", style="bold")
    t.append(result.turn_id, style="cyan")
    t.append(f"  {result.status}", style=STATUS_STYLE.get(result.status, ""))
    t.append(f"  {ms(result.duration_ms)}  {result.usage.total_tokens} tok")
    if show_cost:
        t.append(f"  {money(cost)}")
    if result.attempts > 1:
        t.append(f"  attempts {result.attempts}", style="yellow")
    return t


def _add_ran_by(tree: Tree, result: TurnResult) -> None:
    """The workflow and version that ran the turn (nothing for a result written before)."""
    if result.workflow:
        tree.add(Text.assemble(("workflow: ", "bold"), result.workflow,
                               ("  version: ", "bold"), result.version or "–"))


def render_turn(result: TurnResult, cost: float | None = None, label: str = "") -> Tree:
    """A turn as a tree: user text, workflow and version, agents in order, handoffs, tool
    calls, answer, errors."""
    tree = Tree(turn_headline(result, cost, label))
    tree.add(Text.assemble(("user: ", "bold"), _short(result.text, 300)))
    _add_ran_by(tree, result)
    if result.agents:
        tree.add(Text.assemble(("agents: ", "bold"), " → ".join(result.agents)))
    for h in result.handoffs:
        tree.add(Text.assemble(("handoff ", "magenta"), f"{h.from_agent} → {h.to_agent}"))
    for call in result.tool_calls:
        outcome = tool_outcome(call.output)
        tree.add(
            Text.assemble(
                ("tool ", "blue"),
                (f"{call.tool}({_args(call.arguments)})", "bold"),
                f"  [{call.agent}, {ms(call.duration_ms)}]",
                (f" [{outcome}]" if outcome else "", "red" if outcome == "tool error" else "yellow"),
                " → ",
                _short(call.output, 200),
            )
        )
    if result.final_output is not None:
        tree.add(Text.assemble(("answer: ", "bold green"), _short(result.final_output, 400)))
    for err in result.errors:
        tree.add(Text(f"attempt {err.attempt} failed: {err.error_type}: {_short(err.message)}", style="red"))
    if result.status == "failed" and not result.errors:
        tree.add(Text(f"failed: {result.error_type}: {_short(result.error_message)}", style="red"))
    return tree


def render_conversation(
    conversation_id: str, turns: list[tuple[TurnResult, dict[str, Any]]], totals: dict[str, Any]
) -> Group:
    parts: list[Any] = [Text(f"Conversation {conversation_id}", style="bold underline")]
    for i, (result, stats) in enumerate(turns, 1):
        parts.append(render_turn(result, cost=stats.get("cost_usd"), label=f"Turn {i}"))
    parts.append(
        Text(
            f"total: {len(turns)} turns, {totals.get('input_tokens', 0)}→{totals.get('output_tokens', 0)} tok"
            f" ({totals.get('cached_tokens', 0)} cached), cost {money(totals.get('cost_usd'))},"
            f" errors {totals.get('turns_failed', 0)}",
            style="bold",
        )
    )
    return Group(*parts)


STATS_COLUMNS = [
    ("turns_completed", "done"),
    ("turns_failed", "failed"),
    ("attempts_failed", "retries"),
    ("llm_calls", "llm"),
    ("tool_calls", "tools"),
    ("input_tokens", "in tok"),
    ("cached_tokens", "cached"),
    ("output_tokens", "out tok"),
    ("cost_usd", "cost"),
    ("latency_ms_avg", "avg lat"),
    ("latency_ms_max", "max lat"),
]


def _cell(key: str, value: Any) -> str:
    if key == "cost_usd":
        return money(value)
    if key.startswith("latency"):
        return ms(value)
    return "–" if value is None else str(value)


MODEL_COLUMNS = [  # a model's aggregate counts its calls, not turns
    ("llm_calls", "calls"),
    ("input_tokens", "in tok"),
    ("cached_tokens", "cached"),
    ("output_tokens", "out tok"),
    ("cost_usd", "cost"),
    ("cost_unknown_calls", "unpriced"),
]


CHECK_COLUMNS = [  # by workflow and version: what the workflow's checks said of its turns
    ("checks_passed", "chk ok"),
    ("checks_failed", "chk fail"),
]


def render_stats(by: str, rows: list[dict[str, Any]], totals: dict[str, Any] | None = None) -> Table:
    columns = MODEL_COLUMNS if by == "model" else STATS_COLUMNS
    if by in ("workflow", "version"):  # figures not split by version make room for the checks'
        columns = [c for c in columns if c[0] not in ("tool_calls", "latency_ms_max")] + CHECK_COLUMNS
    table = Table(title=f"stats by {by}", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    if by == "version":  # a version is of one workflow: two columns, workflow then label
        _render_version_stats(table, rows, totals, columns)
        return table
    longest = max([len(str(r.get("subject", ""))) for r in rows] + [len(by)])
    table.add_column(by, no_wrap=True, min_width=min(longest, 40))
    for _, header in columns:
        table.add_column(header, justify="right")
    errors = by == "model"  # model rows carry failed attempts per error type
    if errors:
        table.add_column("errors", justify="left")
    for row in rows:
        cells = [_cell(k, row.get(k)) for k, _ in columns]
        if errors:
            by_type = row.get("errors_by_type") or {}
            cells.append(", ".join(f"{t} {n}" for t, n in sorted(by_type.items())) or "–")
        table.add_row(str(row.get("subject", row.get(by, "?"))), *cells)
    if totals:
        table.add_section()
        table.add_row("all", *[_cell(k, totals.get(k)) for k, _ in columns],
                      *([""] if errors else []), style="bold")
    return table


def _render_version_stats(table: Table, rows: list[dict[str, Any]], totals: dict[str, Any] | None,
                          columns: list[tuple[str, str]]) -> None:
    table.add_column("workflow", no_wrap=True)
    table.add_column("version", no_wrap=True)
    for _, header in columns:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(str(row.get("workflow", "?")), str(row.get("version", "?")),
                      *[_cell(k, row.get(k)) for k, _ in columns])
    if totals:
        table.add_section()
        table.add_row("all", "", *[_cell(k, totals.get(k)) for k, _ in columns], style="bold")


SEVERITY_STYLE = {"info": "cyan", "warning": "yellow", "critical": "bold red"}


def render_alert(alert_id: str, alert: Alert) -> Text:
    figures = ", ".join(f"{k}={v}" for k, v in alert.figures.items())
    return Text.assemble(
        (f"{alert.fired_at:%H:%M:%S} ", "dim"),
        (f"[{alert.severity}] ", SEVERITY_STYLE.get(alert.severity, "")),
        (f"{alert.rule} ", "bold"),
        alert.message,
        (f"  ({figures})" if figures else "", "dim"),
    )


def render_alerts(alerts: list[tuple[str, Alert]]) -> Any:
    if not alerts:
        return Text("no alerts", style="dim")
    return Panel(Group(*[render_alert(i, a) for i, a in alerts]), title="alerts", title_align="left")


# -- replay (telemetry.replay output) ------------------------------------------------


def _decision_text(decision: dict[str, Any] | None) -> str:
    if not decision:
        return ""
    parts = []
    for call in decision.get("calls") or []:
        name = call.get("name") or "?"
        if name.startswith("transfer_to_"):
            parts.append(f"handoff to {name.removeprefix('transfer_to_').replace('_', ' ').title()}")
        elif call.get("arguments") is not None:
            parts.append(f"call {name}({_args(call['arguments'])})")
        else:
            parts.append(f"call {name}")
    message = decision.get("message")
    if message:
        parts.append("final answer" if message is True else f"answer: {_short(str(message), 100)}")
    return " → " + "; ".join(parts) if parts else ""


def _node_label(node: dict[str, Any]) -> Text:
    kind, name, d = node["kind"], node["name"], node.get("detail") or {}
    dur = ms(node.get("duration_ms")) if node.get("duration_ms") is not None else None
    t = Text()
    if kind == "agent":
        t.append("Agent ", style="bold magenta")
        t.append(name, style="bold")
    elif kind == "generation":
        t.append("Generation ", style="cyan")
        figures = [f for f in (dur, f"{d.get('input_tokens', '?')}→{d.get('output_tokens', '?')} tok") if f]
        t.append(f"{name} ({', '.join(figures)})")
        t.append(_decision_text(d.get("decision")))
    elif kind == "tool":
        t.append("Tool ", style="blue")
        t.append(name, style="bold")
        if d.get("arguments"):
            t.append(f"({_args(str(d['arguments']))})")
        if dur:
            t.append(f" ({dur})")
        if d.get("outcome"):
            t.append(f" [{d['outcome']}]", style="red" if d["outcome"] == "tool error" else "yellow")
        if d.get("result") is not None:
            t.append(f" → {_short(str(d['result']), 120)}", style="green")
    elif kind == "handoff":
        t.append("Handoff ", style="magenta")
        t.append(name)
    elif kind == "custom":
        t.append("Span ", style="yellow")
        t.append(name)
        if dur:
            t.append(f" ({dur})")
        if d.get("data"):
            t.append(f" {_short(json.dumps(d['data'], default=str), 100)}", style="dim")
    elif kind == "guardrail":
        t.append("Guardrail ", style="yellow")
        t.append(name, style="bold")
        if d.get("triggered"):
            t.append(" tripped: the turn completed with the safe reply", style="yellow")
    else:
        t.append(f"{kind} {name}")
    if node.get("error"):
        t.append(f"  ✗ {_short(str(node['error']), 120)}", style="red")
    return t


def _add_nodes(tree: Tree, nodes: list[dict[str, Any]]) -> None:
    for node in nodes:
        branch = tree.add(_node_label(node))
        _add_nodes(branch, node.get("children") or [])


def render_replay_turn(replay: dict[str, Any], label: str = "") -> Tree:
    result = TurnResult.model_validate(replay["turn"])
    cost = (replay.get("telemetry") or {}).get("cost_usd")
    tree = Tree(turn_headline(result, cost, label))
    tree.add(Text.assemble(("user: ", "bold"), _short(result.text, 300)))
    _add_ran_by(tree, result)
    attempts = replay.get("attempts") or []
    for entry in attempts:
        parent = tree
        if len(attempts) > 1 or entry.get("error"):
            head = Text(f"Attempt {entry['attempt']}  {entry.get('status', '')}", style="bold")
            if entry.get("error"):
                err = entry["error"]
                head.append(f"  {err.get('type')}: {_short(err.get('message'), 120)}", style="red")
            parent = tree.add(head)
        if entry.get("guardrail"):
            parent.add(Text(f"guardrail {entry['guardrail']} tripped", style="yellow"))
        if entry.get("source") == "events":
            parent.add(Text("unsampled: hook-event timeline (no spans stored)", style="dim italic"))
        _add_nodes(parent, entry.get("tree") or [])
    if not attempts:
        tree.add(Text("no telemetry recorded yet", style="dim"))
    if result.final_output is not None:
        tree.add(Text.assemble(("answer: ", "bold green"), _short(result.final_output, 400)))
    if result.status == "failed":
        tree.add(Text(f"failed: {result.error_type}: {_short(result.error_message)}", style="red"))
    _add_feedback(tree, replay.get("feedback") or [])
    _add_checks(tree, replay.get("checks") or [])
    return tree


CHECK_STYLES = {"passed": "green", "failed": "bold red", "not_applicable": "dim", "inputs_expired": "yellow"}


def _add_checks(tree: Tree, checks: list[dict[str, Any]]) -> None:
    """The turn's checks, one line each: outcome, name, money path, reason; a failure in red."""
    for c in checks:
        outcome = str(c.get("outcome") or "?")
        line = Text(f"check {outcome.upper().replace('_', ' ')} {c.get('check')}"
                    + (" (money path)" if c.get("money_path") else ""),
                    style=CHECK_STYLES.get(outcome, ""))
        reason = str(c.get("reason") or "").removeprefix(f"{NOT_APPLICABLE}: ").removeprefix(NOT_APPLICABLE)
        if reason:  # (a not-applicable reason without its prefix: the outcome says it)
            line.append(f": {_short(reason, 300)}", style="")
        if isinstance(c.get("usage"), dict):  # an LLM judge: its own tokens, not the turn's
            u = c["usage"]
            line.append(f" [judge {c.get('model')}: {u.get('input_tokens', 0)} in / "
                        f"{u.get('output_tokens', 0)} out tokens]", style="dim")
        tree.add(line)


def _add_feedback(tree: Tree, feedback: list[dict[str, Any]]) -> None:
    """The feedback given on the turn, one line each: score, source, when, comment."""
    for f in feedback:
        negative = (f.get("score") or 0) < 0
        line = Text(f"feedback {'-1' if negative else '+1'} from {f.get('source') or '?'}"
                    f" at {str(f.get('at') or '')[:19].replace('T', ' ')}",
                    style="bold red" if negative else "bold green")
        if f.get("comment"):
            line.append(f": {_short(f['comment'], 300)}", style="")
        tree.add(line)


def render_replay_conversation(replay: dict[str, Any]) -> Group:
    parts: list[Any] = [Text(f"Conversation {replay['conversation_id']}", style="bold underline")]
    for i, turn in enumerate(replay["turns"], 1):
        parts.append(render_replay_turn(turn, label=f"Turn {i}"))
    totals = replay.get("totals") or {}
    parts.append(
        Text(
            f"total: {len(replay['turns'])} turns, {totals.get('input_tokens', 0)}→{totals.get('output_tokens', 0)} tok"
            f" ({totals.get('cached_tokens', 0)} cached), cost {money(totals.get('cost_usd'))},"
            f" failed turns {totals.get('turns_failed', 0)}",
            style="bold",
        )
    )
    return Group(*parts)


# -- latency and search ------------------------------------------------------------------


def _pct_row(name: str, p: dict[str, Any]) -> list[str]:
    return [name, str(p.get("count", 0)), ms(p.get("p50")), ms(p.get("p95")), ms(p.get("p99")), ms(p.get("max"))]


def render_latency(report: dict[str, Any]) -> Group:
    """p50/p95/p99 of the turn breakdown and per model, agent and tool."""
    tables = []
    for section, title in (("turn", "turn latency breakdown"), ("model", "model calls by model"),
                           ("agent", "model time by agent"), ("tool", "tool calls by tool")):
        rows = report.get(section) or {}
        if not rows:
            continue
        table = Table(title=title, title_justify="left", box=None, pad_edge=False)
        for col in (section if section != "turn" else "part", "n", "p50", "p95", "p99", "max"):
            table.add_column(col, justify="left" if col in (section, "part") else "right")
        for name, p in rows.items():
            table.add_row(*_pct_row(name, p))
        tables.append(table)
    return Group(*tables) if tables else Group(Text("no latency samples yet", style="dim"))


def render_slowest(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="slowest turns", title_justify="left", box=None, pad_edge=False)
    for col in ("turn", "conversation", "status", "total", "queue", "model", "tools", "other"):
        table.add_column(col, justify="right" if col not in ("turn", "conversation", "status") else "left")
    for r in rows:
        table.add_row(
            r.get("turn_id", "?"), r.get("conversation_id") or "–", r.get("status") or "–",
            ms(r.get("duration_ms")), ms(r.get("queue_wait_ms")),
            ms(r.get("model_ms", r.get("llm_ms_sum"))), ms(r.get("tool_ms", r.get("tool_ms_sum"))),
            ms(r.get("other_ms")),
        )
    return table


def render_found(rows: list[dict[str, Any]]) -> Any:
    if not rows:
        return Text("no conversation matches", style="dim")
    table = Table(title=f"{len(rows)} conversation(s), newest first", title_justify="left")
    checked = any(r.get("check_failed_turns") or r.get("checks_failed_names") for r in rows)
    for col in ("conversation", "customer", "last event", "turns", "workflow", "agents", "tools",
                "errors", "guardrails", "feedback", *(("checks failed",) if checked else ()), "cost"):
        table.add_column(col, justify="right" if col in ("turns", "cost") else "left")
    for r in rows:
        turns = (r.get("turns_completed") or 0) + (r.get("turns_failed") or 0)
        last = str(r.get("last_event_at") or "")[:19].replace("T", " ")
        table.add_row(
            r.get("conversation_id", "?"), r.get("customer_id") or "–", last, str(turns),
            ", ".join(r.get("workflows") or []) or "–", ", ".join(r.get("agents") or []), ", ".join(r.get("tools") or []),
            ", ".join(r.get("errors") or []) or "–", ", ".join(r.get("guardrails") or []) or "–",
            ", ".join(r.get("feedback_turns") or r.get("feedback") or []) or "–",
            *((", ".join(r.get("check_failed_turns") or r.get("checks_failed_names") or []) or "–",)
              if checked else ()),
            money(r.get("cost_usd")),
        )
    return table
