"""Devices and their attributes: the registry interface and its sources."""
