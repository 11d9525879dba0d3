"""End-to-end runs against real third-party receivers (``make e2e-phoenix``); not part of ``make test``."""
