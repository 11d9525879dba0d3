"""Producer: hand conversation turns to the fleet (Python API, CLI verb, HTTP API)."""
