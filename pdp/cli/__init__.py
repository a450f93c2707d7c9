"""The mqtt-pdp command."""
