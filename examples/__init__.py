"""Example apps: a team's own workflows on turnfleet (``turnfleet worker --app examples.<name>:app``)."""
