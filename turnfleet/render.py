"""Terminal views (rich) of turns, conversations, stats and alerts, shared by CLI and demo."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from turnfleet.models import Alert, TurnResult


def console() -> Console:
    """stdout; at least 120 columns when not a terminal (pipes, CI logs) so trees stay readable."""
    width = None if sys.stdout.isatty() else 120
    return Console(file=sys.stdout, highlight=False, soft_wrap=False, width=width)


def money(value: float | None) -> str:
    if value is None:
        return "unknown"
    return f"${value:.4f}" if value < 1 else f"${value:,.2f}"


def ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.0f} ms" if value < 1000 else f"{value / 1000:.2f} s"


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


def render_turn(result: TurnResult, cost: float | None = None, label: str = "") -> Tree:
    """A turn as a tree: user text, agents in order, handoffs, tool calls, answer, errors."""
    tree = Tree(turn_headline(result, cost, label))
    tree.add(Text.assemble(("user: ", "bold"), _short(result.text, 300)))
    if result.agents:
        tree.add(Text.assemble(("agents: ", "bold"), " → ".join(result.agents)))
    for h in result.handoffs:
        tree.add(Text.assemble(("handoff ", "magenta"), f"{h.from_agent} → {h.to_agent}"))
    for call in result.tool_calls:
        tree.add(
            Text.assemble(
                ("tool ", "blue"),
                (f"{call.tool}({_args(call.arguments)})", "bold"),
                f"  [{call.agent}, {ms(call.duration_ms)}] → ",
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


def render_stats(by: str, rows: list[dict[str, Any]], totals: dict[str, Any] | None = None) -> Table:
    table = Table(title=f"stats by {by}", title_justify="left")
    table.add_column(by)
    for _, header in STATS_COLUMNS:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(str(row.get("subject", row.get(by, "?"))), *[_cell(k, row.get(k)) for k, _ in STATS_COLUMNS])
    if totals:
        table.add_section()
        table.add_row("all", *[_cell(k, totals.get(k)) for k, _ in STATS_COLUMNS], style="bold")
    return table


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
