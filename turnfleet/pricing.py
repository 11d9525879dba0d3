"""What a model call cost, from the price table in settings.

In the contract because telemetry totals these costs and workers send each call's cost with
its OTLP span (receivers cannot price a self-hosted or offline model themselves).

Costs are computed exactly (``Decimal``) and returned in integer nano-dollars
(1 USD = 10**9 nUSD): aggregates add them with ``HINCRBY``, so a total never drifts with
float rounding, does not depend on the order events were counted in, and the sum over
customers equals the fleet-wide figure to the last digit. A price with up to three decimals
per 1M tokens (every published price) is exact at this resolution.

A model missing from the table is *unknown*, not free: :meth:`PriceTable.cost_nusd`
returns ``None`` and warns once per model per process; callers count such calls in
``cost_unknown_calls``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import ROUND_HALF_EVEN, Decimal

import structlog

from turnfleet.models import TokenUsage
from turnfleet.settings import Price, TelemetrySettings

log = structlog.get_logger(__name__)

NANO_PER_USD = 10**9
_NANO_PER_TOKEN_PER_USD_PER_1M = Decimal(NANO_PER_USD) / Decimal(10**6)  # 1000
_DATE_SUFFIX = re.compile(r"-\d{4}-\d{2}-\d{2}$")
_ROUTER_PREFIX = "litellm/"  # the Agents SDK's prefix for its LiteLLM models

_warned_models: set[str | None] = set()  # per process: warn once per unknown model


def _candidates(model: str) -> list[str]:
    """``model``, then without the router prefix, then without each ``<provider>/`` in turn."""
    rest = model.removeprefix(_ROUTER_PREFIX)
    names = [model] if rest in (model, "") else [model, rest]
    while "/" in rest and (rest := rest.partition("/")[2]):
        names.append(rest)
    return names


def nusd_to_usd(nusd: int) -> float:
    return nusd / NANO_PER_USD


class PriceTable:
    """Prices per model (USD per 1M tokens) and the cost of one model call."""

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self.prices = dict(prices)
        # Per-token prices in nUSD, as Decimals built from the decimal text of each price.
        self._nano: dict[str, tuple[Decimal, Decimal, Decimal]] = {
            model: tuple(  # type: ignore[misc]
                Decimal(str(v)) * _NANO_PER_TOKEN_PER_USD_PER_1M
                for v in (p.input, p.cached_input, p.output)
            )
            for model, p in self.prices.items()
        }

    @classmethod
    def from_settings(cls, settings: TelemetrySettings) -> PriceTable:
        return cls(settings.price_table())

    def resolve(self, model: str | None) -> str | None:
        """The table entry for ``model``: the exact name, else the name without a date suffix;
        then the same for the provider's own name when ``model`` is routed
        (``litellm/anthropic/claude-3-5-sonnet-20240620``, ``anthropic/claude-...``,
        ``openai/gpt-4o``): the ``litellm/`` prefix, then each ``<provider>/`` in turn, is
        dropped, so a more specific entry (``anthropic/claude-...``) wins over the bare name.

        Providers answer with dated snapshots (``gpt-4o-2024-08-06``); those are priced as
        their family. Nothing looser: a wrong price is worse than an unknown one.
        """
        if model is None:
            return None
        for name in _candidates(model):
            if name in self._nano:
                return name
            base = _DATE_SUFFIX.sub("", name)
            if base in self._nano:
                return base
        return None

    def price(self, model: str | None) -> Price | None:
        name = self.resolve(model)
        return self.prices[name] if name is not None else None

    def cost_nusd(self, model: str | None, usage: TokenUsage) -> int | None:
        """Cost of one call in nano-dollars; ``None`` (and a warning, once) if unpriced.

        ``(input - cached) * input_price + cached * cached_input_price + output * output_price``;
        cached tokens are part of the input tokens, reasoning tokens part of the output.
        """
        name = self.resolve(model)
        if name is None:
            if model not in _warned_models:
                _warned_models.add(model)
                log.warning(
                    "pricing.unknown_model",
                    model=model,
                    hint="add it to TURNFLEET_PRICES; its cost is reported as unknown",
                )
            return None
        p_in, p_cached, p_out = self._nano[name]
        cached = min(max(usage.cached_tokens, 0), max(usage.input_tokens, 0))
        uncached = max(usage.input_tokens, 0) - cached
        cost = uncached * p_in + cached * p_cached + max(usage.output_tokens, 0) * p_out
        return int(cost.to_integral_value(rounding=ROUND_HALF_EVEN))

    def cost_usd(self, model: str | None, usage: TokenUsage) -> float | None:
        nusd = self.cost_nusd(model, usage)
        return None if nusd is None else nusd_to_usd(nusd)
