"""Tests for the bundled demo MCP backend."""
