"""Model prices and call costs: ``turnfleet.pricing`` (the contract), re-exported for
telemetry's modules."""

from turnfleet.pricing import NANO_PER_USD, PriceTable, nusd_to_usd

__all__ = ["NANO_PER_USD", "PriceTable", "nusd_to_usd"]
