"""Shared certificates: one device key in two places at once is a cloned or leaked identity.

A certificate belongs to one device, which holds one connection at a time (a
reconnect with the same client id takes the old session over). So the same
fingerprint on two live connections with different client ids, or arriving from
two source addresses within a window, means the key is in two places.

Pure and synchronous: the service feeds it connects and closes with the time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ConnId = int
Kind = Literal["concurrent", "addresses"]
MODES = ("off", "warn", "refuse")


@dataclass(frozen=True)
class SharedCertificate:
    fingerprint: str
    kind: Kind
    other_client_id: str
    other_address: str

    @property
    def reason(self) -> str:
        if self.kind == "concurrent":
            return (f"shared certificate: also in use by client {self.other_client_id!r} from "
                    f"{self.other_address} (two live connections)")
        return (f"shared certificate: also connected from {self.other_address} "
                f"(client {self.other_client_id!r}) within the window")


def host_of(peer: str | None) -> str:
    """The address of an 'address:port' peer (IPv6 too); the port changes with every connection."""
    if not peer:
        return "?"
    host = peer.rsplit(":", 1)[0] if ":" in peer else peer
    return host.strip("[]")


@dataclass
class SharingTracker:
    """Live connections and recent source addresses per certificate fingerprint."""

    window: float  # seconds an address is remembered after a connect
    _live: dict[str, dict[ConnId, tuple[str, str]]] = field(default_factory=dict)  # fp -> conn -> (client, host)
    _conn_fp: dict[ConnId, str] = field(default_factory=dict)
    _seen: dict[str, dict[str, tuple[float, str]]] = field(default_factory=dict)  # fp -> host -> (time, client)
    _sweep_at: float = 0.0

    def check(self, fingerprint: str, client_id: str, peer: str | None, now: float) -> SharedCertificate | None:
        """What a new connection of this certificate would share, before it is admitted; nothing is stored."""
        for other_client, other_host in self._live.get(fingerprint, {}).values():
            if other_client != client_id:
                return SharedCertificate(fingerprint, "concurrent", other_client, other_host)
        host = host_of(peer)
        for other_host, (at, other_client) in self._seen.get(fingerprint, {}).items():
            if other_host != host and now - at <= self.window:
                return SharedCertificate(fingerprint, "addresses", other_client, other_host)
        return None

    def opened(self, conn: ConnId, fingerprint: str, client_id: str, peer: str | None, now: float) -> None:
        """An admitted connection: remembered while live, and its address for the window."""
        host = host_of(peer)
        self._live.setdefault(fingerprint, {})[conn] = (client_id, host)
        self._conn_fp[conn] = fingerprint
        self._seen.setdefault(fingerprint, {})[host] = (now, client_id)
        if now >= self._sweep_at:
            self._sweep(now)

    def closed(self, conn: ConnId) -> None:
        fingerprint = self._conn_fp.pop(conn, None)
        if fingerprint is None:
            return
        live = self._live.get(fingerprint)
        if live is not None:
            live.pop(conn, None)
            if not live:
                del self._live[fingerprint]

    def _sweep(self, now: float) -> None:
        """Forget addresses older than the window, at most once per window: memory stays bounded by the
        certificates that connected within about two windows."""
        for fingerprint in list(self._seen):
            hosts = {h: v for h, v in self._seen[fingerprint].items() if now - v[0] <= self.window}
            if hosts:
                self._seen[fingerprint] = hosts
            else:
                del self._seen[fingerprint]
        self._sweep_at = now + self.window
