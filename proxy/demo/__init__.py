"""Bundled demo MCP backend (Streamable HTTP, served by hypercorn on trio)."""
