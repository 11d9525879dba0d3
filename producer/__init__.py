"""Producer: hand conversation turns to the fleet (Python API, CLI verb, HTTP API).

Importing it does not import the Agents SDK or arq's worker.
"""

from turnfleet.producer.api import (
    BudgetExceeded,
    BulkEnqueueError,
    ConversationOwnershipError,
    EnqueueResult,
    ErasureBusy,
    ErasureReport,
    Producer,
    TurnIdReused,
    TurnValidationError,
    UnknownTurn,
)

__all__ = ["Producer", "TurnValidationError", "TurnIdReused", "ConversationOwnershipError", "BudgetExceeded",
           "EnqueueResult", "BulkEnqueueError", "ErasureBusy", "ErasureReport", "UnknownTurn"]
