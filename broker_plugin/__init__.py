"""The amqtt side: the authorization plugin and the hardened broker that ships it."""
