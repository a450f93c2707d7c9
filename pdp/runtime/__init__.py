"""The PDP as a running service: snapshots, reloads, caches, Redis, retention."""
