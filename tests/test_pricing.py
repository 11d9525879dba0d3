"""Pricing: exact costs per call, dated snapshots priced as their family, unknown is unknown."""

from __future__ import annotations

import uuid

from structlog.testing import capture_logs

from turnfleet.telemetry.pricing import PriceTable, nusd_to_usd
from turnfleet.models import TokenUsage
from turnfleet.settings import DEFAULT_PRICES, Price, TelemetrySettings


def usage(input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> TokenUsage:
    return TokenUsage(requests=1, input_tokens=input_tokens, output_tokens=output_tokens,
                      cached_tokens=cached_tokens)


def test_cost_splits_cached_input_and_output_at_their_prices() -> None:
    table = PriceTable(DEFAULT_PRICES)
    # turnfleet-offline: input 0.40, cached 0.10, output 1.60 USD per 1M tokens.
    u = usage(1_000_000, 500_000, cached_tokens=250_000)
    assert table.cost_nusd("turnfleet-offline", u) == 1_125_000_000  # 0.30 + 0.025 + 0.80
    assert table.cost_usd("turnfleet-offline", u) == 1.125
    assert table.cost_nusd("turnfleet-offline", usage(120, 20)) == 80_000  # 48 µ$ + 32 µ$


def test_small_prices_are_exact_in_nano_dollars() -> None:
    table = PriceTable(DEFAULT_PRICES)
    # gpt-5-nano cached input is $0.005 per 1M: 5 nano-dollars a token, no float residue.
    assert table.cost_nusd("gpt-5-nano", usage(3, 0, cached_tokens=3)) == 15
    assert table.cost_nusd("gpt-4o-mini", usage(7, 0, cached_tokens=7)) == 525  # 0.075 / 1M
    assert nusd_to_usd(525) == 5.25e-07


def test_cached_tokens_beyond_input_are_clamped() -> None:
    table = PriceTable(DEFAULT_PRICES)
    assert table.cost_nusd("turnfleet-offline", usage(10, 0, cached_tokens=50)) == 1_000


def test_dated_snapshot_is_priced_as_its_family_and_nothing_looser() -> None:
    table = PriceTable(DEFAULT_PRICES)
    assert table.resolve("gpt-4o-2024-08-06") == "gpt-4o"
    assert table.resolve("gpt-4o-mini-2024-07-18") == "gpt-4o-mini"
    assert table.resolve("gpt-4o-audio-preview") is None
    assert table.resolve(None) is None


def test_settings_prices_extend_and_override_the_defaults() -> None:
    settings = TelemetrySettings(prices={
        "house-model": Price(input=1.0, cached_input=0.5, output=2.0),
        "gpt-4o": Price(input=5.0, cached_input=2.5, output=20.0),
    })
    table = PriceTable.from_settings(settings)
    assert table.cost_nusd("house-model", usage(1000, 1000, cached_tokens=500)) == 2_750_000
    assert table.price("gpt-4o") == Price(input=5.0, cached_input=2.5, output=20.0)
    assert table.price("turnfleet-offline") == DEFAULT_PRICES["turnfleet-offline"]


def test_unknown_model_has_no_cost_and_is_warned_about_once() -> None:
    model = f"mystery-{uuid.uuid4().hex[:8]}"
    table = PriceTable(DEFAULT_PRICES)
    with capture_logs() as logs:
        assert table.cost_nusd(model, usage(100, 10)) is None
        assert table.cost_usd(model, usage(5, 5)) is None
        assert PriceTable(DEFAULT_PRICES).cost_nusd(model, usage(1, 1)) is None
    warnings = [e for e in logs if e["event"] == "pricing.unknown_model"]
    assert [(w["model"], w["log_level"]) for w in warnings] == [(model, "warning")]


def test_a_routed_model_is_priced_by_the_providers_own_name() -> None:
    table = PriceTable({**DEFAULT_PRICES, "anthropic/claude-house": Price(input=9, cached_input=9, output=9),
                        "claude-house": Price(input=1, cached_input=1, output=1)})
    for routed in ("litellm/anthropic/claude-3-5-sonnet-20240620", "anthropic/claude-3-5-sonnet-20240620",
                   "openrouter/anthropic/claude-3-5-sonnet-20240620"):
        assert table.resolve(routed) == "claude-3-5-sonnet-20240620"
    assert table.cost_nusd("litellm/anthropic/claude-3-5-sonnet-20240620", usage(1000, 100)) == 4_500_000
    assert table.resolve("litellm/openai/gpt-4o-2024-08-06") == "gpt-4o"  # and its family
    assert table.resolve("litellm/gpt-4o-mini") == "gpt-4o-mini"
    # The most specific entry wins: the provider-qualified one over the bare name.
    assert table.resolve("litellm/anthropic/claude-house") == "anthropic/claude-house"
    assert table.resolve("vertex/claude-house") == "claude-house"
    assert table.resolve("litellm/anthropic/claude-unknown") is None  # nothing looser
    assert table.resolve("litellm/") is None
