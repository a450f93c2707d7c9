"""The assertion writer process: hashes, stores and spools records away from the broker's interpreter.

Hashing and SQLite inserts cost tens of microseconds per record; in the broker's
process they would compete for its interpreter lock with message delivery. The
broker ships compact rows over a pipe and waits for an acknowledgement per
batch, so a batch is never lost: if this process dies, the broker starts a new
one and sends the batch again, under the same batch id. The new process takes
the chain head from the store (and spools), where the batch id of the last
applied batch is stored with its records, so a batch that was applied before
the crash is acknowledged and not stored a second time.

Run by the broker as ``python -m pdp.evidence.writer SETTINGS_JSON``; frames on
stdin/stdout are a 4-byte length and a pickle.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import redis

from pdp.evidence.anchor import Anchorer, AnchorError
from pdp.evidence.chain import ChainWriter
from pdp.evidence.node import NodeClaim, claim_token
from pdp.evidence.record import Row, SessionFields, SinkError
from pdp.evidence.sinks import JsonLinesSink, RedisStreamSink, SpoolingSink, SqliteSink
from pdp.pipes import receive, receive_raw, send

log = logging.getLogger("mqtt_pdp.assertions")


def build_writer(settings: dict[str, Any]) -> ChainWriter:
    """The sinks in write order: the SQLite store, which holds the chain head and batch ids, goes last.

    ``assertion_db: ""`` means no SQLite store. Without a store and without a stream the
    records still go somewhere durable: a JSON Lines file in the spool directory.
    """
    spool = Path(settings["spool_dir"])
    sinks: list[Any] = []
    if settings.get("stream_url"):
        sinks.append(SpoolingSink(RedisStreamSink(settings["stream_url"], settings["stream_prefix"]), spool))
    if settings.get("assertion_db"):
        sinks.append(SpoolingSink(SqliteSink(settings["assertion_db"]), spool))
    if not sinks:
        sinks.append(JsonLinesSink(spool, settings["node"]))
        log.warning("no assertion_db and no assertion_stream: assertion records go to %s only", sinks[0].path)
    backlog = int(settings.get("index_backlog", 0)) if settings.get("assertion_db") else 0
    return ChainWriter(settings["node"], sinks, spool, build_anchorer(settings), backlog)


def build_anchorer(settings: dict[str, Any]) -> Anchorer | None:
    """Signed heads when ``anchor_key_file`` is set: to ``anchor_dir`` and, with a stream, to ``<prefix>:anchors``."""
    if not settings.get("anchor_key_file"):
        return None
    publish = None
    if settings.get("stream_url"):
        client = redis.Redis.from_url(settings["stream_url"], socket_timeout=2, socket_connect_timeout=1)
        stream = f"{settings['stream_prefix']}:anchors"
        publish = lambda line: client.xadd(stream, {"h": line})
    return Anchorer(settings["node"], settings["anchor_key_file"], settings.get("anchor_dir") or "var/anchors",
                    int(settings.get("anchor_every", 1000)), float(settings.get("anchor_interval", 5.0)), publish)


def main() -> int:
    # Ctrl-C reaches the whole process group; the broker decides when this process ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    settings = json.loads(sys.argv[1])
    from pdp.runtime import logs

    logs.configure("info", settings.get("log_format", "text"))
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    claim = None
    try:
        writer = build_writer(settings)
        if settings.get("claim_url"):  # after the chain's local lock: a second local broker gets that message
            claim = NodeClaim(settings["claim_url"], settings["claim_prefix"], settings["node"],
                              claim_token(settings["spool_dir"], settings["node"]))
            try:
                claim.acquire()
            except SinkError:
                writer.close()
                raise
    except (SinkError, AnchorError, OSError) as exc:
        send(out, ("error", str(exc)))
        return 1
    # Where the chain ends and which batch put it there: the broker counts what its previous instance lost.
    head = writer.chain
    send(out, ("ready", head.batch_id, f"{writer.node}:{head.seq}" if head.seq else None))
    broker = BrokerLoad(os.getppid())
    frames = selectors.DefaultSelector()  # one for the process: a new one per wait cost three system calls
    frames.register(inp, selectors.EVENT_READ)
    try:
        while True:
            # Pending batches are indexed one at a time while the broker uses less than half a core, looking
            # for a new frame in between: indexing takes the CPU the broker leaves.
            readable = bool(frames.select(0.05 if writer.unindexed else 0.5))
            writer.tick()
            if claim is not None:
                claim.tick()
            if writer.unindexed and not broker.busy():
                writer.index(1)
            if not readable:
                writer.idle()
                continue
            broker.frame_arrived()
            try:
                frame = receive_raw(inp)
            except EOFError:
                return 0  # the broker is gone; the finally below flushes what we have
            message = pickle.loads(frame)
            if message[0] == "batch":
                batch_id = message[3] if len(message) > 3 else None
                try:
                    count = writer.write(message[1], message[2], batch_id, frame if batch_id is not None else None)
                except Exception as exc:  # neither stored nor spooled: the broker keeps the batch and retries
                    log.exception("batch %s was not written", batch_id)
                    send(out, ("failed", str(exc)))
                else:
                    send(out, ("ack", count))
            elif message[0] == "close":
                writer.close()
                send(out, ("closed",))
                return 0
    finally:
        frames.close()
        try:
            writer.close()
        except Exception:  # already closed, or closing after a failure: nothing more to do
            pass
        if claim is not None:
            claim.release()


class BrokerLoad:
    """Whether the broker process used more than ``share`` of a core over the last ``window`` seconds, from its
    CPU time in /proc. Where /proc cannot be read, whether a batch came within the last ``window``: the
    broker's recorder ships one every 50 ms while it has records."""

    def __init__(self, pid: int, share: float = 0.5, window: float = 0.2) -> None:
        self.stat = f"/proc/{pid}/stat"
        self.share = share
        self.window = window
        self._since = time.monotonic()
        self._cpu = self._cpu_seconds()
        self._busy = True  # until a window has been measured

    def _cpu_seconds(self) -> float | None:
        try:
            with open(self.stat) as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def busy(self) -> bool:
        now = time.monotonic()
        if now - self._since < self.window:
            return self._busy
        cpu = self._cpu_seconds()
        if cpu is None or self._cpu is None:
            self._busy = False  # no measure: the caller's frames are the only sign of traffic
        else:
            self._busy = (cpu - self._cpu) / (now - self._since) > self.share
        self._since, self._cpu = now, cpu
        return self._busy

    def frame_arrived(self) -> None:
        """Without /proc, a batch means traffic: count the next window as busy."""
        if self._cpu is None:
            self._busy, self._since = True, time.monotonic()


CLK_TCK = os.sysconf("SC_CLK_TCK")


def _readable(stream: IO[bytes], timeout: float) -> bool:
    """select() without its limit of 1024 file descriptors (a busy broker or test process passes it)."""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        return bool(selector.select(timeout))


class WriterProcess:
    """The broker's handle on the writer process; restarts it and resends the batch if it dies."""

    def __init__(self, settings: dict[str, Any], start_timeout: float = 30.0) -> None:
        self.settings = settings
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.head_batch_id: str | None = None  # as the first writer found the chain (pdp.evidence.ledger)
        self.head_record: str | None = None
        self._start()
        self._first = False

    def _start(self) -> None:
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        # -P: never import from the working directory (code planted there would run as the broker).
        self.proc = subprocess.Popen([sys.executable, "-P", "-m", "pdp.evidence.writer", json.dumps(self.settings)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert self.proc.stdout is not None
        if not _readable(self.proc.stdout, self.start_timeout):
            self._discard()
            raise SinkError("the assertion writer did not start")
        try:
            reply = receive(self.proc.stdout)
        except EOFError:
            status = self.proc.wait()
            self._discard()
            raise SinkError(f"the assertion writer exited with status {status}") from None
        if reply[0] == "error":
            self._discard()
            raise SinkError(reply[1])
        if getattr(self, "_first", True) and len(reply) >= 3:
            self.head_batch_id, self.head_record = reply[1], reply[2]

    def _discard(self) -> None:
        """End the process (if still running) and close its pipes: a broker restarts writers many times."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        self.proc = None

    def _exchange(self, message: Any) -> Any:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        send(self.proc.stdin, message)
        return receive(self.proc.stdout)

    def write(self, rows: list[Row], sessions: dict[int, SessionFields], batch_id: str | None = None) -> int:
        if self.proc is None:
            # A restart failed before (e.g. the node's lock still held by the dying writer): the recorder kept
            # the batch and retries it here; start again. (Found by an outside attack: one failed restart
            # left the broker without a writer for good, every later batch failing on the missing process.)
            self._start()
            self.restarts += 1
        try:
            reply = self._exchange(("batch", rows, sessions, batch_id))
        except (EOFError, BrokenPipeError, OSError) as exc:
            log.error("assertion writer died (%s); restarting it and sending the batch again", exc)
            self._discard()
            self._start()
            self.restarts += 1  # counted once the new writer is up: tests wait on it before killing again
            reply = self._exchange(("batch", rows, sessions, batch_id))
        if reply[0] != "ack":
            raise SinkError(f"the assertion writer could not store or spool batch {batch_id}: {reply[1]}")
        return int(reply[1])

    def idle(self) -> None:
        """The process delivers its spool on its own when idle."""

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            self._exchange(("close",))
        except (EOFError, BrokenPipeError, OSError):
            log.error("assertion writer was gone at shutdown")
        try:
            self.proc.wait(30)
        finally:
            self._discard()


if __name__ == "__main__":
    sys.exit(main())
