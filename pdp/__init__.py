"""Policy decision point for device-identity authorization of MQTT."""
