"""Administrative records: who changed a device's identity, what it was before and after, and when.

The CLI is a node of its own in the assertion log (``admin@<host>``): it extends
that node's hash chain directly in the SQLite store, inside one ``BEGIN IMMEDIATE``
transaction, so two administrators on one host are serialised by SQLite and
``mqtt-pdp log verify`` walks the chain like any broker's. The change itself (the
registry write) runs inside the same transaction and the record is committed
only after it succeeded: a change that failed leaves no record, and a change
that was made always has one (a crash between the write and the commit is the
only gap, and it leaves the file in its new state with the record missing: the
caller writes the file last, right before the commit, to keep that window small).
"""

from __future__ import annotations

import getpass
import json
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pdp.evidence.record import GENESIS, AssertionRecord, chain_hash
from pdp.evidence.store import AssertionStore

ADMIN_ACTION = "admin"


def default_actor() -> str:
    """The OS user running the command (``--actor`` overrides it, e.g. for a ticket system's user)."""
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in a container: the uid is still someone
        return f"uid:{os.getuid()}"


def admin_node(host: str | None = None) -> str:
    name = host or socket.gethostname() or "localhost"
    return "admin@" + re.sub(r"[^A-Za-z0-9_.-]", "_", name)


@dataclass(frozen=True)
class AdminChange:
    actor: str
    command: str  # e.g. 'devices suspend'
    device_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    note: str = ""  # the operator's reason (--reason), if any
    fingerprint: str | None = None  # the certificate a bind/unbind concerns
    serial: str | None = None
    issuer: str | None = None
    revision: str | None = None  # the registry revision the change produced

    def reason_text(self) -> str:
        body: dict[str, Any] = {"actor": self.actor, "command": self.command, "before": self.before,
                                "after": self.after}
        if self.note:
            body["note"] = self.note
        return json.dumps(body, sort_keys=False, separators=(",", ":"))


def _record(node: str, seq: int, prev_hash: str, ts: float, change: AdminChange) -> AssertionRecord:
    state = change.after or change.before or {}
    values = (f"{node}:{seq}", node, seq, ts, None, change.device_id, change.fingerprint, change.serial,
              change.issuer, state.get("type"), state.get("location"), state.get("purpose"), state.get("owner"),
              state.get("status"), ADMIN_ACTION, None, "allow", change.command, change.reason_text(),
              change.revision, None, None, None, prev_hash)
    return AssertionRecord(*values, chain_hash(values))


def record_change(db_path: str, make: Callable[[], tuple[AdminChange, Callable[[], str | None]]],
                  node: str | None = None, now: Callable[[], float] = time.time) -> AssertionRecord:
    """Make a change and append its record to ``node``'s chain, committed together.

    ``make`` runs while the database's write lock is held, so two administrators never both change
    the version they read: it reads the current state and returns the change (before and after) and
    the function that writes it (returning the registry revision it produced). If either raises,
    nothing is recorded.
    """
    node = node or admin_node()
    store = AssertionStore(db_path)
    try:
        store.db.execute("BEGIN IMMEDIATE")
        try:
            head = store.head(node)
            seq, prev = (head.seq, head.hash) if head is not None else (0, GENESIS)
            change, write = make()
            revision = write()
            record = _record(node, seq + 1, prev, now(), replace(change, revision=revision or change.revision))
            store.insert_chain([record], None)  # commits the transaction begun above
        except BaseException:
            if store.db.in_transaction:
                store.db.rollback()
            raise
        return record
    finally:
        store.close()


def anchor_record(record: AssertionRecord, key_file: str, directory: str) -> None:
    """Sign the admin node's new head into ``directory`` (as brokers do for theirs with ``anchor_key_file``), so
    ``log verify --anchors`` vouches for administrative records too. After the commit: a head is never signed
    ahead of its record."""
    from pathlib import Path

    from pdp.evidence.anchor import append_signed, heads_path, load_private_key

    append_signed(heads_path(Path(directory), record.node), load_private_key(key_file), "head", record.node,
                  record.seq, record.hash, record.ts)
