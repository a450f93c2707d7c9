"""Signed chain heads kept outside the database, so that verify can tell a rewritten or cut database from the real one.

The hash chain alone proves only that the records agree with each other: whoever can
write the database can rewrite a record and recompute every hash after it, delete the
newest records, or delete a whole node, and the chain still "verifies". So the writer
signs its node's head (sequence number, hash, the record's time) with an Ed25519 key
at a fixed cadence and appends it to a file of its own (``<anchor_dir>/<node>.heads``,
one JSON line per signed head, numbered 1, 2, ...) and, when a stream is configured,
to the Redis stream ``<prefix>:anchors``: the way Certificate Transparency's signed
tree heads or CloudTrail's digest files pin a log. Pruning the oldest records is
legitimate, so a prune signs the checkpoint it leaves (``<node>.prunes``); a
checkpoint without a signed prune is a deletion.

Only the public key is needed to verify; the private key stays with the writer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

log = logging.getLogger("mqtt_pdp.assertions")

FORMAT = "mqtt-pdp-anchor/1"


class AnchorError(Exception):
    """A key or anchor file that cannot be used; one line, for the operator."""


def safe_name(node: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in node)


# -- keys -------------------------------------------------------------------------------------


def generate_key(private_path: Path) -> Path:
    """A new key pair: the private key (mode 0600, never overwritten) and ``<private>.pub`` for verifiers."""
    key = Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path = private_path.with_name(private_path.name + ".pub")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise AnchorError(f"{private_path} exists; not overwriting a signing key") from None
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return public_path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise AnchorError(f"anchor_key_file {path}: cannot load an Ed25519 private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AnchorError(f"anchor_key_file {path}: not an Ed25519 key (create one with mqtt-pdp log keygen)")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise AnchorError(f"public key {path}: {exc.strerror or exc}") from None
    try:
        key: Any = serialization.load_pem_public_key(data)
    except ValueError:
        try:  # the private key file works too, for the writer's own host
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as exc:
            raise AnchorError(f"public key {path}: cannot load an Ed25519 public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AnchorError(f"public key {path}: not an Ed25519 key")
    return key


def key_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# -- signed statements ------------------------------------------------------------------------


@dataclass(frozen=True)
class SignedHead:
    """``kind`` 'head': the node's chain ended at (seq, hash) when signed; 'prune': records up to seq were
    deleted by retention and the chain restarts from this checkpoint. ``n`` numbers a node's heads 1, 2, ...
    so that a deleted line of the heads file shows."""

    kind: str
    node: str
    n: int
    seq: int
    hash: str
    ts: float | None  # the record's own time, so that a renumbered record can be found again
    at: float  # when it was signed
    key: str
    sig: str = ""

    def payload(self) -> bytes:
        return "\x1f".join((FORMAT, self.kind, self.node, str(self.n), str(self.seq), self.hash,
                            "\x00" if self.ts is None else repr(self.ts), repr(self.at), self.key)).encode()

    def to_line(self) -> bytes:
        return (json.dumps(asdict(self), separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_line(cls, line: bytes) -> SignedHead:
        data = json.loads(line)
        return cls(kind=str(data["kind"]), node=str(data["node"]), n=int(data["n"]), seq=int(data["seq"]),
                   hash=str(data["hash"]), ts=None if data["ts"] is None else float(data["ts"]),
                   at=float(data["at"]), key=str(data["key"]), sig=str(data["sig"]))


def sign(key: Ed25519PrivateKey, kind: str, node: str, n: int, seq: int, digest: str, ts: float | None) -> SignedHead:
    unsigned = SignedHead(kind, node, n, seq, digest, ts, time.time(), key_id(key.public_key()))
    return SignedHead(**{**asdict(unsigned), "sig": key.sign(unsigned.payload()).hex()})


def _last_n(path: Path) -> int:
    from pdp.evidence.sinks import last_line

    line = last_line(path)
    if line is None:
        return 0
    try:
        return SignedHead.from_line(line).n
    except (ValueError, KeyError, TypeError):
        return 0


def append_signed(path: Path, key: Ed25519PrivateKey, kind: str, node: str, seq: int, digest: str,
                  ts: float | None, n: int | None = None) -> SignedHead:
    """Sign and append durably (fsync); a torn last line from a crash is set aside first."""
    from pdp.evidence.sinks import append_durably, repair_tail

    path.parent.mkdir(parents=True, exist_ok=True)
    repair_tail(path)
    head = sign(key, kind, node, (_last_n(path) + 1) if n is None else n, seq, digest, ts)
    append_durably(path, head.to_line())
    return head


def heads_path(directory: Path, node: str) -> Path:
    return directory / f"{safe_name(node)}.heads"


def prunes_path(directory: Path, node: str) -> Path:
    return directory / f"{safe_name(node)}.prunes"


class Anchorer:
    """Signs one node's chain head every ``every`` records or ``interval`` seconds (in the writer process).

    A head is signed only after its records are stored or spooled, so a signed head is never ahead of the
    evidence. Failing to write a head file is logged, never a lost batch: the next head covers it.
    """

    def __init__(self, node: str, key_file: str | Path, directory: str | Path, every: int = 1000,
                 interval: float = 5.0, publish: Callable[[bytes], None] | None = None) -> None:
        if every < 1 or interval <= 0:
            raise AnchorError(f"anchor_every must be >= 1 and anchor_interval > 0, got {every} and {interval}")
        self.node = node
        self.key = load_private_key(key_file)
        self.directory = Path(directory)
        self.every = every
        self.interval = interval
        self.publish = publish
        self.path = heads_path(self.directory, node)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            from pdp.evidence.sinks import repair_tail

            repair_tail(self.path)
        except OSError as exc:
            raise AnchorError(f"anchor_dir {self.directory}: {exc.strerror or exc}") from None
        self.n = _last_n(self.path)
        self.signed_seq = -1
        self._pending: tuple[int, str, float | None] | None = None
        self._since: float | None = None  # when the oldest unsigned record was written (monotonic)
        self.signed = 0

    def note(self, seq: int, digest: str, ts: float | None, count: int) -> None:
        """Records up to ``seq`` are stored; sign now if the cadence says so."""
        self._pending = (seq, digest, ts)
        if self._since is None:
            self._since = time.monotonic()
        if seq - max(self.signed_seq, 0) >= self.every or time.monotonic() - self._since >= self.interval:
            self.anchor()

    def tick(self) -> None:
        if self._since is not None and time.monotonic() - self._since >= self.interval:
            self.anchor()

    def anchor(self) -> None:
        if self._pending is None or self._pending[0] == self.signed_seq:
            self._since = None
            return
        seq, digest, ts = self._pending
        try:
            head = append_signed(self.path, self.key, "head", self.node, seq, digest, ts, self.n + 1)
        except OSError as exc:
            log.error("node %s: cannot write the signed head of record %d to %s (%s); retrying with the next",
                      self.node, seq, self.path, exc)
            return
        self.n, self.signed_seq, self._since = head.n, seq, None
        self.signed += 1
        if self.publish is not None:
            try:
                self.publish(head.to_line())
            except Exception as exc:  # noqa: BLE001 - the file holds it; the stream copy is a second place
                log.warning("node %s: signed head %d not copied to the stream (%s)", self.node, head.n, exc)

    def close(self) -> None:
        """A graceful stop signs the final head, so nothing before it can be cut off unnoticed."""
        self.anchor()


def prune_signer(key_file: str | Path, directory: str | Path) -> Callable[[str, int, str, float], None]:
    """For ``AssertionStore.prune``: a signed statement per checkpoint, appended to ``<node>.prunes``."""
    key = load_private_key(key_file)
    base = Path(directory)

    def signed(node: str, seq: int, digest: str, ts: float) -> None:
        append_signed(prunes_path(base, node), key, "prune", node, seq, digest, ts)

    return signed


# -- reading them back (verify) ----------------------------------------------------------------


@dataclass
class Anchors:
    """Every signed head and prune in a directory whose signature holds, by node, and what was wrong."""

    heads: dict[str, list[SignedHead]] = field(default_factory=dict)
    prunes: dict[str, list[SignedHead]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def read_anchors(directory: str | Path, public_key: Ed25519PublicKey) -> Anchors:
    """Lines that do not parse or whose signature fails are problems, not anchors: a forged head proves nothing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AnchorError(f"--anchors {directory}: not a directory")
    expected_key = key_id(public_key)
    found = Anchors()
    for path in sorted(directory.iterdir()):
        if path.suffix not in (".heads", ".prunes"):
            continue
        kind = "head" if path.suffix == ".heads" else "prune"
        statements: list[SignedHead] = []
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                head = SignedHead.from_line(line)
            except (ValueError, KeyError, TypeError):
                found.problems.append(f"{path} line {number}: not a signed head (damaged or forged)")
                continue
            try:
                if head.key != expected_key:
                    raise InvalidSignature
                public_key.verify(bytes.fromhex(head.sig), head.payload())
            except (InvalidSignature, ValueError):
                found.problems.append(f"{path} line {number}: signature does not verify with the given public key "
                                      f"(forged, altered, or signed by key {head.key})")
                continue
            if head.kind != kind or safe_name(head.node) != path.stem:
                found.problems.append(f"{path} line {number}: a {head.kind} of node {head.node!r} in the wrong file")
                continue
            statements.append(head)
        target = found.heads if kind == "head" else found.prunes
        for head in statements:
            target.setdefault(head.node, []).append(head)
        if kind == "head" and statements:
            numbers = [h.n for h in statements]
            expected = list(range(1, numbers[-1] + 1))
            if numbers != expected:
                missing = sorted(set(expected) - set(numbers))
                found.problems.append(f"{path}: signed heads {_ranges(missing)} of node {statements[0].node!r} are "
                                      "missing from the file (lines deleted)" if missing else
                                      f"{path}: signed heads out of order")
    return found


def _ranges(numbers: list[int]) -> str:
    parts: list[str] = []
    for number in numbers:
        if parts and parts[-1].split("..")[-1] == str(number - 1):
            parts[-1] = f"{parts[-1].split('..')[0]}..{number}"
        else:
            parts.append(str(number))
    return ", ".join(f"#{p}" for p in parts)
