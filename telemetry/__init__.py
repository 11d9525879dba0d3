"""Telemetry: aggregate the workers' events, price them, raise alerts, answer queries."""
