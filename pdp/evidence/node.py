"""One node id, one writer: a unique default node id, and a claim on the shared Redis while a broker records.

Two brokers recording under one node id build two chains with the same sequence
numbers; merged into one store, one of them is lost or both look forged. Locally the
chain's lock file stops a second broker with the same spool directory; across hosts
the claim key ``<prefix>:node:<node>`` on the shared Redis does (SET NX with a TTL,
renewed by the writer). The claim's value is a token kept in the spool directory, so
the same broker restarted (or its writer restarted after a kill -9) takes its own
claim back at once, while another broker is refused until the claim expires.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from pathlib import Path

import redis

from pdp.evidence.anchor import safe_name
from pdp.evidence.record import SinkError

log = logging.getLogger("mqtt_pdp.assertions")

# Renew the claim only if it is still ours; take it back if it expired meanwhile.
_RENEW = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then redis.call('EXPIRE', KEYS[1], ARGV[2]) return 1 end
if not current then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) return 1 end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _persistent(path: Path, make: str) -> str:
    """The file's content, or ``make`` written there first (exclusively, so two starts agree on one value)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        value = path.read_text().strip()
        if value:
            return value
        path.unlink()
        return _persistent(path, make)
    with os.fdopen(fd, "w") as out:
        out.write(make + "\n")
        out.flush()
        os.fsync(out.fileno())
    return make


def default_node_id(spool_dir: str | Path) -> str:
    """Host name plus a random suffix made once and kept in the spool directory: unique per broker, stable
    across its restarts (two containers with one host name no longer share a chain)."""
    return _persistent(Path(spool_dir) / "node_id", f"{socket.gethostname()}-{secrets.token_hex(4)}")


def claim_token(spool_dir: str | Path, node: str) -> str:
    return _persistent(Path(spool_dir) / f"{safe_name(node)}.owner", secrets.token_hex(16))


class NodeClaim:
    """This broker's claim on its node id in the shared Redis (in the writer process)."""

    def __init__(self, url: str, prefix: str, node: str, token: str, ttl: int = 15) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1)
        self.key = f"{prefix}:node:{node}"
        self.node = node
        self.token = token
        self.ttl = ttl
        self._next = 0.0
        self.held = False

    def acquire(self) -> None:
        """Refuse to start when another broker holds the node id; a Redis outage is a warning, not a refusal."""
        try:
            taken = self.client.set(self.key, self.token, nx=True, ex=self.ttl)
            if not taken:
                owner = self.client.get(self.key)
                if owner is not None and owner.decode() != self.token:
                    raise SinkError(f"node id {self.node!r} is already recording on the shared Redis (claim "
                                    f"{self.key}); give each broker its own node_id, or leave node_id unset")
                self.client.expire(self.key, self.ttl)
        except redis.RedisError as exc:
            log.warning("cannot claim node id %s on Redis (%s); retrying while recording", self.node, exc)
            return
        self.held = True
        self._next = time.monotonic() + self.ttl / 3

    def tick(self) -> None:
        """Renew every third of the TTL; losing the claim to another broker is CRITICAL (two chains, one name)."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.ttl / 3
        try:
            ours = self.client.eval(_RENEW, 1, self.key, self.token, self.ttl)
        except redis.RedisError as exc:
            log.warning("cannot renew the claim on node id %s (%s)", self.node, exc)
            return
        if not ours:
            log.critical("node id %s is claimed by another broker on the shared Redis: two brokers record under "
                         "one node id and their chains will conflict", self.node)
        self.held = bool(ours)

    def release(self) -> None:
        try:
            self.client.eval(_RELEASE, 1, self.key, self.token)
        except redis.RedisError:
            pass  # it expires on its own
        self.client.close()
