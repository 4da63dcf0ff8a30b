"""Stores of state shared between workers and hosts (Redis, PostgreSQL); see DESIGN §1-2."""
