"""turnfleet: the contract shared by the producer, the workers and telemetry.

Importing this package must stay cheap and must not import the Agents SDK, arq's worker,
or any of the components: services that only enqueue turns depend on it.
"""

__version__ = "0.1.0"
