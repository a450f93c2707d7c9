"""The capture ledger: how a broker killed with -9 leaves a trace of the records it never shipped.

Decisions are captured in the broker's memory and shipped in batches; a broker killed
between the two loses the batch it had not shipped yet, and those records never get a
sequence number, so the chain alone cannot show the loss. So the broker numbers its
captures (per broker instance) and reserves numbers durably *ahead of use*: the file
``<spool_dir>/<node>.captures`` says "instance I may have captured up to R decisions"
before any capture beyond the previous reservation is made. A graceful stop replaces the
reservation with the exact number captured. Batch ids carry the number of their last
capture (``I:n``) and the store keeps the id of the last applied batch with the chain
head, so the next broker knows how many of instance I's captures were recorded (n) and
writes a ``gap`` record for the rest (n+1..R, exact after a graceful stop, an upper
bound after a kill). ``mqtt-pdp log verify`` reports gap records as known losses.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("mqtt_pdp.assertions")


@dataclass(frozen=True)
class LedgerEntry:
    """What a broker instance left: its reservation, and the exact count when it stopped gracefully."""

    instance: str
    reserved: int
    captured: int | None = None  # set by a graceful stop
    overrun: bool = False  # captures went beyond a reservation before it was written
    # Gap records this instance still had to write for the instances before it (it died before its first
    # batch was stored): the next one writes them.
    carried: tuple[str, ...] = ()


@dataclass(frozen=True)
class Loss:
    instance: str
    first: int  # first capture number not recorded
    last: int  # last capture number that may have been made (exact when ``exact``)
    exact: bool
    overrun: bool

    @property
    def count(self) -> int:
        return self.last - self.first + 1

    def reason(self, after_record: str | None) -> str:
        where = f" after record {after_record}" if after_record else ""
        if self.exact:
            what = f"{self.count} decision(s) captured{where} were lost: broker stopped before they were written"
        else:
            what = (f"up to {self.count} decision(s) captured{where} were lost: broker stopped without flushing "
                    "(killed or crashed); the number is its durable reservation, the loss may be smaller")
        if self.overrun:
            what += "; its reservation was overrun, so the loss may also be larger"
        return f"{what} (broker instance {self.instance}, captures {self.first}..{self.last})"


def applied_captures(instance: str, head_batch_id: str | None) -> int:
    """How many of ``instance``'s captures the store holds, from the id ('I:n') of the last applied batch."""
    if not head_batch_id:
        return 0
    owner, _, number = head_batch_id.rpartition(":")
    if owner != instance:
        return 0  # the newest batch is an older instance's: this one recorded nothing
    try:
        return int(number)
    except ValueError:
        return 0


def loss_of(previous: LedgerEntry, head_batch_id: str | None) -> Loss | None:
    """The captures of the previous instance that are not in the store, if any."""
    applied = applied_captures(previous.instance, head_batch_id)
    last = previous.captured if previous.captured is not None else previous.reserved
    if last <= applied:
        return None
    return Loss(previous.instance, applied + 1, last, previous.captured is not None, previous.overrun)


def pending_losses(previous: LedgerEntry, head_batch_id: str | None, head_record: str | None) -> list[str]:
    """The reasons of the gap records the new instance writes first: those the previous instance carried and
    never stored (it stored nothing), then the previous instance's own loss."""
    reasons: list[str] = []
    if previous.carried and applied_captures(previous.instance, head_batch_id) == 0:
        reasons.extend(previous.carried)
    loss = loss_of(previous, head_batch_id)
    if loss is not None:
        reasons.append(loss.reason(head_record))
    return reasons


def ledger_path(spool_dir: str | Path, node: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in node)
    return Path(spool_dir) / f"{safe}.captures"


def read_ledger(path: Path) -> LedgerEntry | None:
    try:
        data = json.loads(path.read_text())
        return LedgerEntry(str(data["instance"]), int(data["reserved"]),
                           None if data.get("captured") is None else int(data["captured"]), bool(data.get("overrun")),
                           tuple(str(reason) for reason in data.get("carried") or ()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.critical("capture ledger %s unreadable (%s): records lost by the previous broker, if any, cannot be "
                     "counted", path, exc)
        return None


def write_ledger(path: Path, entry: LedgerEntry) -> None:
    """Atomically and durably (rename, fsync of file and directory): a reservation must survive a host crash."""
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps({"instance": entry.instance, "reserved": entry.reserved, "captured": entry.captured,
                       "overrun": entry.overrun, "carried": list(entry.carried)}).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


class CaptureLedger:
    """One broker instance's reservations; ``previous`` is what the instance before it left."""

    def __init__(self, spool_dir: str | Path, node: str, instance: str, min_block: int = 1000) -> None:
        self.path = ledger_path(spool_dir, node)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.instance = instance
        self.min_block = min_block
        self.previous = read_ledger(self.path)
        self.reserved = 0
        self.overrun = False
        self.failures = 0
        self.carried: tuple[str, ...] = ()  # gap records this instance is about to write (see LedgerEntry)
        # The recorder reserves from its own thread ahead of use and, when captures catch up with the
        # reservation first, from the broker's loop: one write at a time, and a reservation never shrinks.
        self._lock = threading.Lock()

    def reserve(self, captured: int, block: int) -> bool:
        """Reserve up to ``captured + block`` (never less than already reserved); False (logged) when the file
        cannot be written."""
        with self._lock:
            if captured > self.reserved and self.reserved:
                self.overrun = True
                log.warning("capture ledger: %d captures beyond the reservation of %d before it was renewed",
                            captured - self.reserved, self.reserved)
            target = max(captured + max(block, self.min_block), self.reserved)
            try:
                write_ledger(self.path, LedgerEntry(self.instance, target, None, self.overrun, self.carried))
            except OSError as exc:
                self.failures += 1
                log.error("capture ledger %s: cannot reserve (%s); a kill now could lose records unnoticed",
                          self.path, exc)
                return False
            self.reserved = target
            return True

    def close(self, captured: int) -> None:
        """A graceful stop: the exact number of captures, so the next start can tell exactly what was lost."""
        with self._lock:
            try:
                write_ledger(self.path, LedgerEntry(self.instance, max(self.reserved, captured), captured,
                                                    self.overrun, self.carried))
            except OSError as exc:
                log.error("capture ledger %s: cannot record the final count (%s)", self.path, exc)
