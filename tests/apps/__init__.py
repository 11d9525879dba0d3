"""Apps for ``--app`` tests: importable modules holding workflows, as a team's package would."""
