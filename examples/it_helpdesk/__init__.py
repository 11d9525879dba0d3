"""An IT helpdesk on turnfleet: a second workflow, not customer support (README.md here)."""

from .agents import app

__all__ = ["app"]
