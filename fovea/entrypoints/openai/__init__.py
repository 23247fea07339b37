"""The OpenAI-compatible server: `fovea serve` (see server.py)."""
