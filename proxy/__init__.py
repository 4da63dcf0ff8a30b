"""Switchboard: a Trio-based connection proxy for MCP servers."""

__version__ = "0.1.0"
