"""The bundled default config (default.toml), shipped as package data."""
