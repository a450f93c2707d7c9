"""Governance reports over the registry and the assertion log."""
