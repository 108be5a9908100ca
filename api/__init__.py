"""The OpenAI-compatible HTTP API: a face over engine/, like the web UI."""
