"""The assertion store: SQLite with the indexes security teams' questions need, plus verify and prune.

Inserts are idempotent on (node, seq), so a batch delivered twice (a spool
replayed after a partial write, a stream drained again) is stored once. A
record whose (node, seq) is already stored with a *different* hash is not an
exact duplicate but a conflict (a reused sequence number, two brokers with one
node id): it is kept in the ``conflicts`` table, logged CRITICAL and reported
by ``verify``, never dropped silently.

The writer appends a batch as one ``pending`` row (the broker's rows, JSON, with
the range of sequence numbers and the hash the chain ends at), in the
transaction that moves the chain head: inserting a row per record and keeping
the indexes cost 7-9 us a record, a third of a core at the broker's full rate,
taken from the broker on a two-core machine. The batch is durable and chained
at once; its records reach the ``records`` table while the broker uses less
than half a core, at the writer's stop, or when anyone opens the store
(``AssertionStore`` indexes what is pending first); past the writer's backlog
limit, batches go into the records at once. Indexing recomputes each record's hash from the row and checks that
the batch still ends at the hash the writer chained (and signed).

Client ids and certificate fingerprints are not indexed on the records (a
64-hex fingerprint index doubled the cost of an insert): the small
``identities`` table maps each (device, client id, fingerprint) ever seen, and
a query by client id or fingerprint goes through the device index. A missing
device id is stored there as ''.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sqlite3
import time
import weakref
from hashlib import sha256
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdp.core.topics import covers, matches
from pdp.evidence.record import FIELD_NAMES, GENESIS, AssertionRecord, Head, chained, decode_batch

CheckpointSigner = Callable[[str, int, str, float], None]  # node, seq, hash, the record's ts

if TYPE_CHECKING:  # cryptography is imported only when signed heads are checked
    from pdp.evidence.anchor import Anchors

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    record_id TEXT NOT NULL, node TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL,
    client_id TEXT, device_id TEXT, fingerprint TEXT, serial TEXT, issuer TEXT,
    type TEXT, location TEXT, purpose TEXT, owner TEXT, status TEXT,
    action TEXT NOT NULL, topic TEXT, decision TEXT NOT NULL, rule_id TEXT, reason TEXT NOT NULL,
    policy_revision TEXT, cache_tier TEXT, latency_us REAL, peer TEXT, prev_hash TEXT NOT NULL, hash TEXT NOT NULL,
    UNIQUE (node, seq)
);
CREATE TABLE IF NOT EXISTS identities (
    device_id TEXT NOT NULL, client_id TEXT NOT NULL, fingerprint TEXT NOT NULL,
    UNIQUE (device_id, client_id, fingerprint)
);
CREATE INDEX IF NOT EXISTS identities_client ON identities (client_id);
CREATE INDEX IF NOT EXISTS identities_fingerprint ON identities (fingerprint);
CREATE TABLE IF NOT EXISTS checkpoints (node TEXT PRIMARY KEY, seq INTEGER NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pending (
    node TEXT NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL,
    batch_id TEXT, body BLOB NOT NULL, PRIMARY KEY (node, first)
);
CREATE TABLE IF NOT EXISTS unindexable (
    node TEXT NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL,
    batch_id TEXT, body BLOB, error TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS altered_batches (
    node TEXT, first, last, stored_hash, found_last INTEGER, found_hash TEXT, noted REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS conflicts (
    record_id TEXT NOT NULL, node TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL,
    client_id TEXT, device_id TEXT, fingerprint TEXT, serial TEXT, issuer TEXT,
    type TEXT, location TEXT, purpose TEXT, owner TEXT, status TEXT,
    action TEXT NOT NULL, topic TEXT, decision TEXT NOT NULL, rule_id TEXT, reason TEXT NOT NULL,
    policy_revision TEXT, cache_tier TEXT, latency_us REAL, peer TEXT, prev_hash TEXT NOT NULL, hash TEXT NOT NULL,
    UNIQUE (node, seq, hash)
);
"""

# Two indexes besides (node, seq), chosen for the cost of an insert: each index on the records cost 2-4 us
# a record, and an index on a column whose values arrive in random order (10,000 devices, their topics)
# took each insert to another leaf page: a batch of 5,000 records dirtied about 10,000 pages (40 MB written
# to the WAL) at 1M records, most of the cost of recording.
# - records_block: (block of 2**14 sequence numbers, device, topic). Within a block the pages a batch
#   touches are few (blocks of 2**16 recorded 10-20% slower, the time as a fourth column 6%). A query by
#   device (client id, fingerprint) seeks it once per block (``AssertionStore.block_clause``) and sorts
#   the device's records by time; a query by topic scans it, testing the topic in the index and reading
#   only the matching rows (about 0.1 s at 1M records for one exact topic, 0.25 s for a wildcard).
# - records_time: (time, rule). Periods (stats, --since) and newest-first listings; a query by rule scans
#   it newest first, testing the rule in the index (71 ms at 1M records for a rule with no records).
# Stores created before have the four indexes of earlier versions (records_device, records_topic,
# records_ts, records_rule) and keep them until ``mqtt-pdp log reindex``: every query works with either.
BLOCK_BITS = 14
BLOCK = f"(seq >> {BLOCK_BITS})"
INDEXES = f"""
CREATE INDEX IF NOT EXISTS records_block ON records ({BLOCK}, device_id, topic);
CREATE INDEX IF NOT EXISTS records_time ON records (ts, rule_id);
"""
EARLIER_INDEXES = """
CREATE INDEX IF NOT EXISTS records_device ON records (device_id, ts);
CREATE INDEX IF NOT EXISTS records_ts ON records (ts);
CREATE INDEX IF NOT EXISTS records_rule ON records (rule_id, ts);
CREATE INDEX IF NOT EXISTS records_topic ON records (topic);
"""

# The schema as some version of the store created it (SQLite keeps a CREATE statement as written, less
# IF NOT EXISTS). Anything else in it was made by hand: an index the planner prefers over ours answers queries
# from its own pages, a trigger can move or rewrite what the writer stores, a table redefined changes what
# a comparison means (affinity, collation), and verify reads the records by (node, seq). So ``check_schema``
# names every other object and definition, and ``check_pages`` (--deep) checks the index contents.
_EARLIER_DEFINITIONS = tuple(
    f"CREATE INDEX records_block ON records ((seq >> {bits}), device_id, {columns})"  # 2026-11 development versions
    for bits in (14, 16) for columns in ("topic", "ts, topic")
) + ("CREATE INDEX records_client ON records (client_id, ts)",
     "CREATE INDEX records_fingerprint ON records (fingerprint, ts)")
_PLANNER_STATISTICS = frozenset({"sqlite_stat1", "sqlite_stat2", "sqlite_stat3", "sqlite_stat4"})  # ANALYZE's


def _definition(sql: str) -> str:
    """A CREATE statement with runs of ASCII white space as one space (SQLite reads other spaces, such as
    U+00A0, as part of a name)."""
    sql = re.sub(r"[ \t\n\r\f\v]+", " ", sql.strip())
    return sql.replace(" IF NOT EXISTS ", " ")


KNOWN_DEFINITIONS = frozenset(
    _definition(statement) for statement in (SCHEMA + INDEXES + EARLIER_INDEXES).split(";") if statement.strip()
) | frozenset(_EARLIER_DEFINITIONS)
# The text columns queries compare (=, GLOB, IN): a value stored there as a BLOB hashes as the text of its
# bytes (verify joins the columns in SQL) but equals no text, so a query would not find its record.
COMPARED_COLUMNS = ("client_id", "device_id", "fingerprint", "action", "topic", "decision", "rule_id",
                    "policy_revision")
MAX_ROWID = 2**62  # no store gets near it; a record above it makes SQLite pick new rowids at random

_COLUMNS = ", ".join(FIELD_NAMES)
# verify: the text columns between ts and latency_us (client_id .. cache_tier), joined as chain_hash joins them
# (None as U+0000), by SQLite in C; TEXT affinity stores every value of these columns as text, as the writer
# hashed it. The separators are blob literals (constants; char(31) and char(0) were function calls per column).
# Not printf: its %s ends a value at an embedded U+0000, so "dev-1" + U+0000 + "x" would hash as "dev-1".
_MIDDLE = " || x'1f' || ".join(f"coalesce({name}, x'00')" for name in FIELD_NAMES[4:21])
# The last column is 1 where a compared column holds a BLOB: every BLOB sorts after every text, x'' first of
# them (comparisons: min(typeof(...)) made a full verify at 1M records 0.4 s longer, these 0.2 s).
_AS_BYTES = " OR ".join(f"{name} >= x''" for name in COMPARED_COLUMNS)
_VERIFY_SELECT = (f"SELECT record_id, node, seq, ts, {_MIDDLE}, latency_us, peer, prev_hash, hash, action, ({_AS_BYTES}) "
                  "FROM records WHERE node = ? AND seq > ? AND seq <= ? ORDER BY seq")
# What queries and stats read: the text columns as text, a value edited into a BLOB too (verify names it;
# the JSON and the tables then show it as the text it reads as, where json.dumps failed on bytes).
_NUMERIC = frozenset({"seq", "ts", "latency_us"})
_READ_COLUMNS = ", ".join(name if name in _NUMERIC else f"CAST({name} AS TEXT)" for name in FIELD_NAMES)
_INSERT = f"INSERT OR IGNORE INTO records ({_COLUMNS}) VALUES ({', '.join('?' for _ in FIELD_NAMES)})"
_INSERT_CONFLICT = f"INSERT OR IGNORE INTO conflicts ({_COLUMNS}) VALUES ({', '.join('?' for _ in FIELD_NAMES)})"
_IDENTITY = itemgetter(FIELD_NAMES.index("device_id"), FIELD_NAMES.index("client_id"), FIELD_NAMES.index("fingerprint"))
log = logging.getLogger("mqtt_pdp.assertions")


MAX_SEQ = 2**62  # no writer gets near it; a stored head beyond it was edited


def parse_head(value: object) -> tuple[int, str, str | None] | None:
    """'seq hash [batch_id]' as a writer stores it, or None for anything else."""
    seq, _, rest = str(value).partition(" ")
    digest, _, batch_id = rest.partition(" ")
    if not seq.isdigit() or not 0 <= int(seq) < MAX_SEQ:
        return None
    return int(seq), digest, batch_id or None


def head_key(node: str) -> str:
    """The meta key of a node's chain head: 'seq hash batch_id', stored with the records that end there."""
    return f"head:{node}"


@dataclass(frozen=True)
class QueryFilters:
    device: str | None = None
    client_id: str | None = None
    fingerprint: str | None = None
    action: str | None = None
    decision: str | None = None
    topic: str | None = None  # an MQTT filter: records whose topic it matches (or, for subscribe, covers)
    rule_id: str | None = None
    policy_revision: str | None = None
    node: str | None = None
    since: float | None = None
    until: float | None = None


_MAX_SEQ = 2**63 - 1


@dataclass(frozen=True)
class ChainReport:
    """One node's verdict. ``problems`` holds every break found (message, record id), not just the first:
    a crash break must not hide tampering further on. ``problem``/``record_id`` are the first of them."""

    node: str
    checked: int  # records walked before the first break (all of them when intact)
    problem: str | None  # None: the chain is intact from its checkpoint to its last record
    record_id: str | None = None
    problems: tuple[tuple[str, str | None], ...] = ()
    anchored: int = 0  # signed heads the database matches
    anchored_seq: int | None = None  # the newest of them: records after it are not pinned yet
    records: int = 0
    gaps: tuple[tuple[str, str], ...] = ()  # (record id, reason) of gap records: losses the log itself reports
    skipped: int = 0  # incremental: records up to the newest matching signed head, not walked again
    verified_after: int = 0  # the sequence number the walk started after


@dataclass(frozen=True)
class _Walk:
    problems: list[tuple[str, str | None]]
    checked: int  # records before the first problem
    count: int
    gaps: list[tuple[str, str]]


def _walk(db: sqlite3.Connection, name: str, prev_seq: int, prev_hash: str, upto: int) -> _Walk:
    """One node's records after ``prev_seq`` up to ``upto``, in sequence order: each must follow the previous
    one (sequence number and hash) and hash to its own hash. Resynchronises after a break, so later breaks
    are reported too."""
    problems: list[tuple[str, str | None]] = []
    gaps: list[tuple[str, str]] = []
    checked = count = 0
    nul = "\x00"
    for record_id, rnode, seq, ts, middle, latency, peer, prev, digest, action, as_bytes in db.execute(
            _VERIFY_SELECT, (name, prev_seq, upto)):
        count += 1
        if action == "gap":  # a broker stopped with captures it never recorded (pdp.evidence.ledger)
            row = db.execute("SELECT reason FROM records WHERE node = ? AND seq = ?", (name, seq)).fetchone()
            gaps.append((record_id, str(row[0]) if row else ""))
        if seq != prev_seq + 1:
            first_missing = prev_seq + 1
            gap = f"{first_missing}" if seq == first_missing + 1 else f"{first_missing}..{seq - 1}"
            problems.append((f"record(s) {name}:{gap} missing before {record_id}", record_id))
        elif prev != prev_hash:
            problems.append((f"{record_id} does not follow the previous record (removed, reordered or "
                             "replaced)", record_id))
        # The record's hash text (record.chain_hash) in one f-string: str() of a value is _canonical's text for
        # every type but None (U+0000); the columns that can be NULL are coalesced in SQL or tested here; the
        # others are NOT NULL (a NULL there, from a rewritten schema, hashes as 'None' and is reported altered).
        text = (f"{record_id}\x1f{rnode}\x1f{seq}\x1f{ts}\x1f{middle}\x1f"
                f"{nul if latency is None else latency}\x1f{nul if peer is None else peer}\x1f{prev}")
        if sha256(text.encode("utf-8", "surrogatepass")).hexdigest() != digest or record_id != f"{rnode}:{seq}":
            problems.append((f"{record_id} was altered (its hash does not match its content)", record_id))
        elif as_bytes:
            problems.append((f"{record_id} was altered: a value stored as bytes, not text (its hash still "
                             "matches; a query comparing that column would not find the record)", record_id))
        if not problems:
            checked += 1
        prev_seq, prev_hash = seq, digest
    return _Walk(problems, checked, count, gaps)


def _walk_file(path: str, name: str, prev_seq: int, prev_hash: str, upto: int) -> _Walk:
    """A part of a walk in a worker process, on a connection of its own."""
    store = AssertionStore(path, readonly=True)
    try:
        return _walk(store.db, name, prev_seq, prev_hash, upto)
    finally:
        store.close()


PARALLEL_WALK = 200_000  # records of one node from which verify walks it in parts, one process per core
_NO_END = 2**62


def _storable(value: Any) -> Any:
    """A value read from the database goes back into it (integers of any size did not)."""
    return value if not isinstance(value, int) or -2**63 <= value < 2**63 else str(value)


def _glob(topic_filter: str) -> str:
    """A GLOB pattern matching every topic (and, for subscribe records, every filter) that ``topic_filter``
    selects, and possibly more: '+' becomes '*' (which also crosses '/'), a final '#' a '*' after its parent."""
    def literal(level: str) -> str:
        return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in level)

    levels = topic_filter.split("/")
    tail = ""
    if levels[-1] == "#":
        levels, tail = levels[:-1], "*"
    return "/".join("*" if level == "+" else literal(level) for level in levels) + tail


def _topic_prefix(topic_filter: str) -> str:
    """The literal levels before the first wildcard, for an index range scan."""
    literal = []
    for level in topic_filter.split("/"):
        if level in ("+", "#"):
            break
        literal.append(level)
    return "/".join(literal)


def connect_readonly(path: str, schema_only: bool = False) -> tuple[sqlite3.Connection, PrivateCopy | None]:
    """A read-only connection, also on read-only media (an evidence copy on a read-only mount), where SQLite
    cannot create the ``-shm`` file a WAL database needs: then ``immutable`` when no WAL and no pending batch
    hold records (complete, nothing copied), else a private copy of the database and its WAL, returned as
    the second value (``immutable`` would silently skip what the WAL holds). ``schema_only``: the caller
    reads only the schema, so ``immutable`` does unless the WAL holds the records table itself."""
    try:
        db = sqlite3.connect(uri_of(path, "mode=ro"), uri=True, timeout=10)
        db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone()
        return db, None
    except sqlite3.OperationalError:
        directory = os.path.dirname(os.path.abspath(path))
        if os.access(directory, os.W_OK):
            raise
    wal = Path(f"{path}-wal")
    logged = wal.exists() and wal.stat().st_size > 0
    db = sqlite3.connect(uri_of(path, "immutable=1"), uri=True)
    if schema_only:
        has_records = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'records'").fetchone() is not None
        if has_records or not logged:
            return db, None
    elif not logged:
        try:
            pending = db.execute("SELECT 1 FROM pending LIMIT 1").fetchone()
        except sqlite3.OperationalError:
            pending = None  # no pending table: a store from before batches were, or not a store at all
        if pending is None:
            return db, None
    db.close()
    return private_copy(path)


class PrivateCopy:
    """A directory of its own under $TMPDIR for a copy of a database: removed when this object goes, or at the
    interpreter's exit (a SIGTERM as the copy was made left it behind: an outside attack)."""

    def __init__(self, name: str) -> None:
        import tempfile

        self.directory = Path(tempfile.mkdtemp(prefix="mqtt-pdp-readonly-"))
        self.remove = weakref.finalize(self, shutil.rmtree, self.directory, True)
        self.path = self.directory / name


def private_copy(path: str) -> tuple[sqlite3.Connection, PrivateCopy]:
    """A read-only connection to a copy of the database and its WAL (never its -shm): where the store cannot be
    written, its pending batches can be indexed there. The copy goes with the returned ``PrivateCopy``."""
    copy = PrivateCopy(Path(path).name)
    wal = Path(f"{path}-wal")
    try:
        shutil.copyfile(path, copy.path)
        if wal.exists():
            shutil.copyfile(wal, f"{copy.path}-wal")
        db = sqlite3.connect(uri_of(copy.path, "mode=ro"), uri=True, timeout=10)
    except BaseException:
        copy.remove()
        raise
    log.warning("%s is on read-only media with records in its write-ahead log or not yet indexed: reading a "
                "private copy in %s", path, copy.directory)
    return db, copy


def uri_of(path: str | Path, query: str) -> str:
    """An SQLite URI for ``path``, escaped: '%', '?' and '#' in a file name are its own (an outside attack read
    the database x%41.db when asked for x%2541.db's neighbour, and '?' cut the name short)."""
    return f"{Path(path).absolute().as_uri()}?{query}"


class AssertionStore:
    def __init__(self, path: str | Path, *, readonly: bool = False, catch_up: bool = True) -> None:
        """``catch_up``: index the batches the writer stored but has not indexed yet, so that every answer
        holds them; a read-only opener does it on a connection of its own, or (no write access) counts them
        in ``unindexed`` for the caller to report."""
        self.path = str(path)
        self.unindexed = 0
        self.forked = 0  # records a drain refused to merge into their node's chain (kept as conflicts)
        self.forked_nodes: set[str] = set()
        # (device, client id, fingerprint) as the records hold them (None, not ''):
        self._known_identities: set[tuple[str | None, str | None, str | None]] = set()  # committed by this connection
        self._stored_identities: set[tuple[str | None, str | None, str | None]] = set()  # in the open transaction
        self.copy: Path | None = None  # read-only media: the private copy read instead (connect_readonly)
        self._private: PrivateCopy | None = None  # holds the copy: removed with this store
        self._meanwhile: Callable[[], None] | None = None  # run while verify's worker processes walk (verify_all)
        if readonly:
            if not Path(self.path).exists():
                raise FileNotFoundError(f"no assertion database at {self.path}")
            self._use(*connect_readonly(self.path))
        else:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=10)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA cache_size=-65536")  # 64 MiB: index pages stay in memory while appending
            self.db.execute("PRAGMA wal_autocheckpoint=20000")
            self.db.executescript(SCHEMA)
            # Reads through mmap while appending too (index pages the inserts descend): 7% of an insert.
            self.db.execute("PRAGMA mmap_size=1073741824")
            self.db.executescript(EARLIER_INDEXES if self.unblocked else INDEXES)
        self._blocked: bool | None = None
        self.readonly = readonly
        if catch_up:
            self.catch_up()

    def _use(self, db: sqlite3.Connection, copy: PrivateCopy | None) -> None:
        self.db, self._private = db, copy
        self.copy = copy.path if copy is not None else None
        # Reads through mmap instead of a read() per page: verify and wide queries fetch a third faster.
        self.db.execute("PRAGMA mmap_size=1073741824")

    def catch_up(self) -> None:
        """Index what the writer stored and has not indexed (see ``__init__``)."""
        self.unindexed = 0
        if not self.pending_records():
            return
        if not self.readonly:
            self.index_pending()
            return
        try:
            try:
                AssertionStore(self.copy or self.path).close()  # indexes on opening
            except (sqlite3.Error, OSError):
                if self.copy is not None or os.access(os.path.dirname(os.path.abspath(self.path)), os.W_OK):
                    raise
                # Read-only media whose -shm came along (opened in place): index in a private copy instead
                # (an outside attack: 30 of 45 records, and 'incomplete', from a `cp a.db*` copy).
                self.db.close()
                self._use(*private_copy(self.path))
                AssertionStore(self.copy).close()
        except (sqlite3.Error, OSError) as exc:
            log.warning("%s: cannot index the newest records (%s); they are not in this answer", self.path, exc)
        self.unindexed = self.pending_records()

    @property
    def unblocked(self) -> bool:
        """A store created before the block index (it has ``records_device``): queries work either way."""
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'records_device'"
                               ).fetchone() is not None

    def reindex(self) -> bool:
        """Replace the indexes of earlier versions by the two of this one; False if there was nothing to do."""
        if not self.unblocked:
            return False
        drop = "".join(f"DROP INDEX IF EXISTS {name};" for name in ("records_device", "records_topic", "records_ts",
                                                                     "records_rule"))
        self.db.executescript(f"BEGIN; {INDEXES} {drop} COMMIT;")
        self._blocked = None
        return True

    def block_clause(self, node: str | None = None) -> str:
        """A condition naming every block that holds records (of ``node``): added to a query by device or
        topic so that it seeks the block index once per block. Always true; '1' on an unblocked store."""
        if self._blocked is None:
            self._blocked = self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = "
                                            "'records_block'").fetchone() is not None
        if not self._blocked:
            return "1"
        low = high = None
        for name in ([node] if node is not None else self.nodes()):
            first = self.db.execute("SELECT min(seq) FROM records WHERE node = ?", (name,)).fetchone()[0]
            last = self.db.execute("SELECT max(seq) FROM records WHERE node = ?", (name,)).fetchone()[0]
            if first is None or last is None or not isinstance(first, int) or not isinstance(last, int):
                return "1"  # a sequence number that is not an integer (tampering): no shortcut
            low = first if low is None else min(low, first)
            high = last if high is None else max(high, last)
        if low is None or high is None:
            return "0"
        blocks = range(max(low, 0) >> BLOCK_BITS, (high >> BLOCK_BITS) + 1)
        if low < 0:
            return "1"
        return f"{BLOCK} IN ({', '.join(map(str, blocks))})"

    def close(self) -> None:
        self.db.close()

    # -- writing --------------------------------------------------------------------------

    def _insert(self, records: Sequence[AssertionRecord]) -> int:
        before = self.db.total_changes
        self.db.executemany(_INSERT, records)
        inserted = self.db.total_changes - before
        if inserted < len(records):  # some were stored already: exact duplicates are fine, others are not
            self._keep_conflicts(records)
        # (device, client id, fingerprint) of each record as it is (None included), as a set built in C, less
        # those this connection stored already; None becomes '' only for the new ones (a comprehension over
        # every record was 1 us a record).
        identities = set(map(_IDENTITY, records))
        identities -= self._known_identities  # already stored by this connection: no INSERT OR IGNORE each batch
        if identities:
            self.db.executemany("INSERT OR IGNORE INTO identities VALUES (?, ?, ?)",
                                {(d or "", c or "", f or "") for d, c, f in identities})
            self._stored_identities |= identities
        return inserted

    def _insert_linked(self, records: Sequence[AssertionRecord]) -> int:
        accepted: list[AssertionRecord] = []
        forked: list[AssertionRecord] = []
        kept: dict[tuple[str, int], str] = {}  # this batch's accepted records
        forked_hashes: set[tuple[str, str]] = set()
        run = self.db.execute
        for record in records:
            node, seq = record.node, record.seq
            same = kept.get((node, seq))
            row = (same,) if same is not None else run("SELECT hash FROM records WHERE node = ? AND seq = ?",
                                                       (node, seq)).fetchone()
            if row is not None:
                if row[0] != record.hash:
                    forked.append(record)
                    forked_hashes.add((node, record.hash))
                continue  # an exact duplicate: drained before
            if (node, record.prev_hash) in forked_hashes or run(
                    "SELECT 1 FROM conflicts WHERE node = ? AND seq = ? AND hash = ?",
                    (node, seq - 1, record.prev_hash)).fetchone():
                forked.append(record)  # follows a record of the other chain
                forked_hashes.add((node, record.hash))
                continue
            before = kept.get((node, seq - 1))
            if before is None:
                found = run("SELECT hash FROM records WHERE node = ? AND seq = ?", (node, seq - 1)).fetchone()
                before = found[0] if found else None
            if before is not None and before != record.prev_hash:
                forked.append(record)
                forked_hashes.add((node, record.hash))
                continue
            accepted.append(record)
            kept[(node, seq)] = record.hash
        inserted = self._insert(accepted)
        if forked:
            self.db.executemany(_INSERT_CONFLICT, forked)
            self.forked += len(forked)
            self.forked_nodes.update(r.node for r in forked)
            log.critical("%s: %d records fork from the chain stored for their node (first %s): two brokers wrote "
                         "under one node id? Not merged: kept in the conflicts table", self.path, len(forked),
                         forked[0].record_id)
        return inserted

    def _keep_conflicts(self, records: Sequence[AssertionRecord]) -> None:
        conflicting = []
        for record in records:
            row = self.db.execute("SELECT hash FROM records WHERE node = ? AND seq = ?",
                                  (record.node, record.seq)).fetchone()
            if row is not None and row[0] != record.hash:
                conflicting.append(record)
        if conflicting:
            self.db.executemany(_INSERT_CONFLICT, conflicting)
            log.critical("%s: %d records have the node and sequence number of stored records but other content "
                         "(first %s); kept in the conflicts table, not dropped", self.path, len(conflicting),
                         conflicting[0].record_id)

    def insert_chain(self, records: Sequence[AssertionRecord], batch_id: str | None) -> int:
        """A writer's batch, with the chain head it ends at and its batch id, in one transaction."""
        if not records:
            return 0
        last = records[-1]
        return self.insert_with_meta(records, head_key(last.node), f"{last.seq} {last.hash} {batch_id or ''}".rstrip())

    def append_pending(self, node: str, first: int, last: int, prev_hash: str, digest: str, batch_id: str | None,
                       body: bytes) -> None:
        """A writer's batch as one row, with the chain head it ends at and its batch id, in one transaction.
        A row already stored at ``first`` raises IntegrityError: the spool takes the batch, and its replay
        stores the records one by one, where a reused sequence number becomes a conflict."""
        with self.db:
            self.db.execute("INSERT INTO pending VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (node, first, last, prev_hash, digest, batch_id, body))
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                            (head_key(node), f"{last} {digest} {batch_id or ''}".rstrip()))

    def pending_records(self) -> int:
        """Records stored as batches and not yet indexed (0 for stores from before batches were). A row whose
        range was edited counts as at least one: a forged sum must not make the batches look indexed."""
        try:
            return int(self.db.execute(
                "SELECT coalesce(sum(CASE WHEN typeof(first) = 'integer' AND typeof(last) = 'integer' AND "
                "last >= first THEN last - first + 1 ELSE 1 END), 0) FROM pending").fetchone()[0])
        except sqlite3.OperationalError:  # no pending table: an older store opened read-only
            return 0

    def index_pending(self, batches: int | None = None, per_transaction: int = 4096) -> int:
        """Turn pending batches (oldest first) into records; returns how many records left ``pending``.

        Small batches share a transaction, up to ``per_transaction`` records (a transaction per batch of 50
        doubled the cost of a record). Safe beside another indexer (the writer, a CLI): batches are taken
        inside an immediate transaction, so each is indexed once. A batch that no longer ends at the hash the
        writer chained was altered in the database: it is indexed as it now reads, logged CRITICAL, and
        verify reports the break. One that cannot be read at all moves to ``unindexable``; verify reports
        its records missing.
        """
        indexed = done = 0
        while batches is None or done < batches:
            self.db.execute("BEGIN IMMEDIATE")
            taken = 0
            try:
                while (batches is None or done < batches) and taken < per_transaction:
                    row = self.db.execute("SELECT rowid, node, first, last, prev_hash, hash, batch_id, body FROM "
                                          "pending ORDER BY node, first LIMIT 1").fetchone()
                    if row is None:
                        break
                    count = self._index_one(*row)
                    indexed += count
                    taken += max(count, 1)
                    done += 1
                self.db.execute("COMMIT")
            except BaseException:
                self._stored_identities = set()
                self.db.execute("ROLLBACK")
                raise
            self._committed()
            if not taken:
                break
        return indexed

    def _index_one(self, rowid: int, node: str, first: int, last: int, prev_hash: str, digest: str,
                   batch_id: str | None, body: bytes) -> int:
        """One pending row into records, or into ``unindexable`` when its content (edited in the database) cannot
        be read or stored; a failure of the database itself (locked, full) propagates and the row stays."""
        self.db.execute("SAVEPOINT batch")
        try:
            rows, sessions = decode_batch(body)
            if not isinstance(node, str) or not isinstance(prev_hash, str) or type(first) is not int:
                raise ValueError("node, first or prev_hash of another type")
            records = chained(node, first - 1, prev_hash, rows, sessions)
            self._insert(records)
            if not records or records[-1].seq != last or records[-1].hash != digest:
                log.critical("%s: the stored batch %s:%s..%s no longer ends at the hash the writer chained: "
                             "altered in the database", self.path, node, first, last)
                # Kept for verify: with only the stored hash or range edited the records are intact, and
                # nothing else would show it.
                self.db.execute("INSERT INTO altered_batches VALUES (?, ?, ?, ?, ?, ?, ?)",
                                (node, _storable(first), _storable(last), _storable(digest),
                                 records[-1].seq if records else None, records[-1].hash if records else None,
                                 time.time()))
        except (ValueError, TypeError, KeyError, OverflowError, RecursionError, sqlite3.IntegrityError,
                sqlite3.InterfaceError, sqlite3.ProgrammingError, sqlite3.DataError) as exc:
            self.db.execute("ROLLBACK TO batch")
            self._stored_identities = set()
            self.db.execute("INSERT INTO unindexable VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            tuple(_storable(v) for v in (node, first, last, prev_hash, digest, batch_id, body))
                            + (f"{type(exc).__name__}: {exc}"[:200],))
            log.critical("%s: the stored batch %s:%s..%s cannot be read (%s): altered in the database; "
                         "its records are missing", self.path, node, first, last, exc)
        self.db.execute("RELEASE batch")
        self.db.execute("DELETE FROM pending WHERE rowid = ?", (rowid,))  # whatever its columns now hold
        return last - first + 1 if type(first) is int and type(last) is int and last >= first else 1

    def head(self, node: str) -> Head | None:
        """Where ``node``'s chain ends in this store: its newest record, a prune checkpoint, or the stored head.

        A stored head that is not one (text, or a sequence number no writer reaches: an edit in the database)
        is reported CRITICAL and ignored, not followed: one such value kept the broker from starting, or had
        its writer go on past SQLite's integers and fail every batch (found by an outside attack)."""
        found: Head | None = None
        row = self.db.execute("SELECT seq, hash FROM records WHERE node = ? ORDER BY seq DESC LIMIT 1",
                              (node,)).fetchone()
        if row is None or type(row[0]) is not int:
            row = self.db.execute("SELECT seq, hash FROM checkpoints WHERE node = ?", (node,)).fetchone()
        if row is not None and type(row[0]) is int:
            found = Head(row[0], str(row[1]), None, f"store {self.path}")
        meta = self.get_meta(head_key(node))
        parsed = parse_head(meta) if meta else None
        if meta and parsed is None:
            log.critical("%s: the chain head stored for node %s is not one (%r): edited in the database; ignored",
                         self.path, node, str(meta)[:80])
        elif parsed is not None and (found is None or parsed[0] >= found.seq):
            found = Head(parsed[0], parsed[1], parsed[2], f"store {self.path}")
        return found

    def _committed(self) -> None:
        """Identities are known stored only once their transaction committed (a rollback must not hide them)."""
        if len(self._known_identities) > 200_000:
            self._known_identities.clear()
        self._known_identities |= self._stored_identities
        self._stored_identities = set()

    def insert(self, records: Sequence[AssertionRecord]) -> int:
        try:
            with self.db:
                inserted = self._insert(records)
        except BaseException:
            self._stored_identities = set()
            raise
        self._committed()
        return inserted

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def insert_with_meta(self, records: Sequence[AssertionRecord], key: str, value: str,
                         linked: bool = False) -> int:
        """Records and a position (e.g. of a drained stream) in one transaction.

        ``linked`` (drain): a record goes in only if it extends the chain stored for its node; one that forks
        from it (two brokers that wrote under one node id) goes to ``conflicts`` with all that follows it.
        """
        try:
            with self.db:
                inserted = self._insert_linked(records) if linked else self._insert(records)
                self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
        except BaseException:
            self._stored_identities = set()
            raise
        self._committed()
        return inserted

    # -- reading --------------------------------------------------------------------------

    def query(self, filters: QueryFilters, limit: int | None = None, after_rowid: int = 0,
              newest_first: bool = False) -> Iterator[tuple[int, AssertionRecord]]:
        # Only --follow reads by rowid (verify names rowids not as SQLite gives them).
        clauses, params = (["rowid > ?"], [after_rowid]) if after_rowid else ([], [])
        for column, value in (("client_id", filters.client_id), ("fingerprint", filters.fingerprint)):
            if value is not None:
                # Through the device index: the devices that ever used this client id or certificate, looked up
                # first, so that the planner sees a plain IN list (an OR with a subquery made it scan by time).
                devices = [row[0] for row in self.db.execute(
                    f"SELECT DISTINCT device_id FROM identities WHERE {column} = ?", (value,))]
                # '' there stands for a record's empty device id and for none at all (NULL): both are asked for.
                either = [f"device_id IN ({', '.join('?' for _ in devices)})"] if devices else []
                if "" in devices:
                    either.append("device_id IS NULL")
                clauses.append(f"{column} = ? AND ({' OR '.join(either) or '0'})")
                params += [value, *devices]
        for column, value in (
            ("device_id", filters.device), ("action", filters.action), ("decision", filters.decision), ("rule_id", filters.rule_id),
            ("node", filters.node),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if filters.policy_revision is not None:
            # Records carry the snapshot revision '<policy>.<registry>[.<crl>]'; any part, or the whole, selects.
            revision = filters.policy_revision
            clauses.append("(policy_revision = ? OR instr('.' || policy_revision || '.', '.' || ? || '.') > 0)")
            params += [revision, revision]
        if filters.since is not None:
            clauses.append("ts >= ?")
            params.append(filters.since)
        if filters.until is not None:
            clauses.append("ts < ?")
            params.append(filters.until)
        topic_filter = filters.topic
        if topic_filter is not None:
            if "+" not in topic_filter and "#" not in topic_filter:
                clauses.append("topic = ?")
                params.append(topic_filter)
                topic_filter = None
            else:
                if prefix := _topic_prefix(topic_filter):
                    clauses.append("topic >= ? AND topic < ?")
                    params += [prefix, prefix + "\U0010ffff"]
                # In C, before any row reaches Python: a superset of what the filter selects, made exact below.
                clauses.append("topic GLOB ?")
                params.append(_glob(topic_filter))
        if any(v is not None for v in (filters.device, filters.client_id, filters.fingerprint, filters.topic)):
            clauses.append(self.block_clause(filters.node))  # the device and topic indexes are per block
        order = "DESC" if newest_first else "ASC"
        where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
        sql = f"SELECT rowid, {_READ_COLUMNS} FROM records {where}ORDER BY ts {order}, rowid {order}"
        count = 0
        for row in self.db.execute(sql, params):
            record = AssertionRecord._make(row[1:])
            if topic_filter is not None and not _topic_selected(topic_filter, record):
                continue
            yield row[0], record
            count += 1
            if limit is not None and count >= limit:
                return

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM records").fetchone()[0])

    def nodes(self) -> list[str]:
        """One index seek per node (DISTINCT walked the whole (node, seq) index: 0.12 s at 1M records)."""
        return [row[0] for row in self.db.execute(
            "WITH RECURSIVE n(node) AS (SELECT min(node) FROM records UNION ALL "
            "SELECT (SELECT min(node) FROM records WHERE node > n.node) FROM n WHERE n.node IS NOT NULL) "
            "SELECT node FROM n WHERE node IS NOT NULL")]

    def stats(self, since: float | None, until: float | None, top: int = 10) -> dict[str, Any]:
        """One pass over the period's rows (through the ts index), counted in Python: four GROUP BY queries
        each walked the period again, with a table lookup per row."""
        import heapq
        from collections import Counter

        where, params = ["1=1"], []
        if since is not None:
            where.append("ts >= ?")
            params.append(since)
        if until is not None:
            where.append("ts < ?")
            params.append(until)
        outcomes: Counter[tuple[str, str]] = Counter()
        denied_devices: Counter[str] = Counter()
        denied_topics: Counter[str] = Counter()
        refused: Counter[tuple[str, str]] = Counter()
        for action, decision, device, topic, reason in self.db.execute(
                "SELECT CAST(action AS TEXT), CAST(decision AS TEXT), CAST(device_id AS TEXT), CAST(topic AS TEXT), "
                f"CAST(reason AS TEXT) FROM records WHERE {' AND '.join(where)}", params):
            outcomes[(action, decision)] += 1
            if decision == "deny":
                denied_devices[device or "(unknown)"] += 1
                if topic is not None:
                    denied_topics[topic] += 1
                if action == "connect":
                    refused[(device or "(no identity)", reason)] += 1
        def most(counter: Counter[Any]) -> list[tuple[Any, int]]:  # ties in key order: the same output every run
            return heapq.nsmallest(top, counter.items(), key=lambda item: (-item[1], item[0]))

        return {
            "outcomes": sorted((a, d, n) for (a, d), n in outcomes.items()),
            "top_denied_devices": most(denied_devices),
            "top_denied_topics": most(denied_topics),
            "refused_connects": [(d, r, n) for (d, r), n in most(refused)],
        }

    # -- integrity ------------------------------------------------------------------------

    def verify(self, node: str | None = None, anchors: Anchors | None = None,
               incremental: bool = False) -> list[ChainReport]:
        """Walk each node's chain in sequence order and report every record altered, missing or out of place.

        With ``anchors`` (signed heads read from outside the database) also: records rewritten with
        recomputed hashes, renumbered after a deletion, cut off at the new end, deleted at the old end
        behind an unsigned checkpoint, and whole nodes missing.
        """
        stored_heads = self._stored_heads()  # before indexing what arrived since opening: all of it is then indexed
        self.catch_up()
        names = [node] if node else self.nodes()
        set_aside = self._unindexable()
        altered = self._altered_batches()
        if node is None:
            names = sorted(set(names) | set(stored_heads) | set(set_aside) | set(altered))
        if anchors is not None and node is None:
            names = sorted(set(names) | set(anchors.heads) | set(anchors.prunes) | set(self._checkpoint_nodes()))
        reports = []
        for name in names:
            problems: list[tuple[str, str | None]] = []
            checkpoint = self.db.execute("SELECT seq, hash FROM checkpoints WHERE node = ?", (name,)).fetchone()
            prev_seq, prev_hash = checkpoint if checkpoint else (0, GENESIS)
            checked, count, skipped = 0, 0, 0
            if incremental and anchors is not None:
                start = self._newest_matching_head(name, anchors)
                if start is not None and start[0] > prev_seq:
                    prev_seq, prev_hash = start  # the records up to it were verified when it was
                    skipped = int(self.db.execute("SELECT count(*) FROM records WHERE node = ? AND seq <= ?",
                                                  (name, prev_seq)).fetchone()[0])
            walk_from = prev_seq
            walked = self._walk_node(name, prev_seq, prev_hash)
            checked, count, gaps = walked.checked, walked.count, walked.gaps
            problems.extend(walked.problems)
            problems.extend(self._odd_sequence_numbers(name))
            for first_seq, last_seq, stored, found_last, found in altered.get(name, []):
                where = f"{name}:{first_seq}..{last_seq}"
                problems.append((f"the stored batch {where} was altered in the database before it was indexed: its "
                                 f"row says it ends at {name}:{last_seq} with hash {str(stored)[:12]}, its records "
                                 f"end at {name}:{found_last} with hash {str(found)[:12]} (indexed as they read)",
                                 where))
            for first_seq, last_seq, why in set_aside.get(name, []):
                where = f"{name}:{first_seq}..{last_seq}"
                problems.append((f"records {where} were stored as a batch that cannot be read or stored ({why}): "
                                 "altered in the database, set aside in the unindexable table", where))
            signed = max((h.seq for h in anchors.heads.get(name, [])), default=0) if anchors is not None else 0
            if name in stored_heads and not self.unindexed and (stored_heads[name][0] > signed
                                                                 or stored_heads[name][0] < 0):
                # (Up to the newest signed head, the signed heads say it, and more: see _check_anchors.)
                problems.extend(self._check_stored_head(name, *stored_heads[name]))
            if name in stored_heads:
                problems.extend(self._records_beyond_head(name))
            if self._has_conflicts_table():
                row = self.db.execute("SELECT count(*), min(seq) FROM conflicts WHERE node = ?", (name,)).fetchone()
                if row[0]:
                    where = f"{name}:{row[1]}"
                    problems.append((f"{row[0]} record(s) conflict with stored ones (same node and sequence number, "
                                     f"other content), first {where}; kept in the conflicts table", where))
            anchored, anchored_seq = 0, None
            if anchors is not None:
                anchored, anchored_seq = self._check_anchors(name, checkpoint, count + skipped, anchors, problems)
            first = problems[0] if problems else (None, None)
            reports.append(ChainReport(name, checked, first[0], first[1], tuple(problems), anchored, anchored_seq,
                                       count + skipped, tuple(gaps), skipped, walk_from))
        return reports

    def _stored_heads(self) -> dict[str, tuple[int, str]]:
        """Each node's chain head as its writer stored it with its last batch (``meta``); -1 for one that is not."""
        heads = {}
        for key, value in self.db.execute("SELECT key, value FROM meta WHERE key LIKE 'head:%'"):
            parsed = parse_head(value)
            heads[str(key)[5:]] = (parsed[0], parsed[1]) if parsed else (-1, "")
        return heads

    def _altered_batches(self) -> dict[str, list[tuple[Any, ...]]]:
        found: dict[str, list[tuple[Any, ...]]] = {}
        try:
            for name, *fields in self.db.execute("SELECT node, first, last, stored_hash, found_last, found_hash "
                                                 "FROM altered_batches ORDER BY rowid"):
                found.setdefault(str(name), []).append(tuple(fields))
        except sqlite3.OperationalError:  # an older store: no such table
            pass
        return found

    def _unindexable(self) -> dict[str, list[tuple[Any, Any, str]]]:
        found: dict[str, list[tuple[Any, Any, str]]] = {}
        try:
            for name, first_seq, last_seq, why in self.db.execute(
                    "SELECT node, first, last, error FROM unindexable ORDER BY rowid"):
                found.setdefault(str(name), []).append((first_seq, last_seq, str(why)))
        except sqlite3.OperationalError:  # an older store: no such table
            pass
        return found

    def _check_stored_head(self, name: str, seq: int, digest: str) -> list[tuple[str, str | None]]:
        """The chain must end where its writer said it did: a batch edited in the database before it was
        indexed ends at another hash, and records deleted at the new end leave the head pointing past them.
        (With signed heads the same is checked against heads outside the database, which an attacker who
        also rewrote this one cannot forge.)"""
        if seq < 0:
            return [(f"the chain head stored for node {name} is not a chain head (edited in the database)", None)]
        row = self.db.execute("SELECT hash FROM records WHERE node = ? AND seq = ?", (name, seq)).fetchone()
        if row is not None:
            if row[0] == digest:
                return []
            return [(f"{name}:{seq} differs from the chain head its writer stored with it: its batch was altered "
                     "in the database", f"{name}:{seq}")]
        newest = self.db.execute("SELECT max(seq) FROM records WHERE node = ?", (name,)).fetchone()[0]
        checkpoint = self.db.execute("SELECT seq FROM checkpoints WHERE node = ?", (name,)).fetchone()
        if checkpoint is not None and checkpoint[0] >= seq:
            return []  # pruned up to and past it
        if isinstance(newest, int) and newest > seq:
            return []  # records written after the head was read
        after = newest if isinstance(newest, int) else 0
        return [(f"records {name}:{after + 1}..{seq} missing at the end: the chain head its writer stored names "
                 f"{name}:{seq}", None)]

    def _records_beyond_head(self, name: str) -> list[tuple[str, str | None]]:
        """Records after the chain head their writer stored, read in one snapshot (a writer moves the head in
        the transaction of its records): inserted in the database, e.g. as a forged pending row copied from a
        genuine one, which indexed into a chain of its own (found by an outside attack: verify said intact)."""
        self.db.execute("BEGIN")
        try:
            value = self.get_meta(head_key(name))
            newest = self.db.execute("SELECT max(seq) FROM records WHERE node = ? AND typeof(seq) = 'integer'",
                                     (name,)).fetchone()[0]
        finally:
            self.db.execute("COMMIT")
        parsed = parse_head(value) if value is not None else None
        if parsed is None or not isinstance(newest, int) or newest <= parsed[0]:
            return []
        return [(f"records {name}:{parsed[0] + 1}..{newest} come after the chain head their writer stored "
                 f"({name}:{parsed[0]}): not written by it", f"{name}:{parsed[0] + 1}")]

    def _odd_sequence_numbers(self, name: str) -> list[tuple[str, str | None]]:
        """Records whose sequence number is not an integer sort before (NULL) or after (text, blob) every
        integer, where a walk in sequence order may never meet them; the two ends of the index show them.
        (Found by an outside attack: the newest record's seq set to 'z' hid it, and verify said intact.)"""
        out: list[tuple[str, str | None]] = []
        for order in ("ASC", "DESC"):
            row = self.db.execute(f"SELECT seq, rowid FROM records WHERE node = ? ORDER BY seq {order} LIMIT 1",
                                  (name,)).fetchone()
            if row is not None and not isinstance(row[0], int):
                out.append((f"record {name} (row {row[1]}) has the sequence number {row[0]!r}, not an integer: "
                            "altered", f"{name}:row{row[1]}"))
        return out

    def _walk_node(self, name: str, prev_seq: int, prev_hash: str) -> _Walk:
        """The walk, split into contiguous parts walked in parallel when the node is large and there are
        several cores: each part starts after the record that precedes it, so the result is the same."""
        workers = min(os.cpu_count() or 1, 4)
        span = 0  # sequence numbers after prev_seq: the record count when the chain has no gap
        if workers > 1 and not self.path.startswith(":"):
            last = self.db.execute("SELECT max(seq) FROM records WHERE node = ?", (name,)).fetchone()[0]
            span = last - prev_seq if isinstance(last, int) else 0  # (a seq of another type: one walk)
        if span < PARALLEL_WALK:
            return _walk(self.db, name, prev_seq, prev_hash, _NO_END)
        # Parts by sequence number (two index seeks each; counting and OFFSET walked the index: 0.1 s at 1.2M).
        firsts: list[int] = []
        for part in range(1, workers):
            row = self.db.execute("SELECT seq FROM records WHERE node = ? AND seq > ? ORDER BY seq LIMIT 1",
                                  (name, prev_seq + span * part // workers)).fetchone()
            if row is not None and isinstance(row[0], int) and (not firsts or row[0] > firsts[-1]):
                firsts.append(row[0])
        starts = [prev_seq]
        hashes = [prev_hash]
        ends = []
        for first in firsts:
            before = self.db.execute("SELECT seq, hash FROM records WHERE node = ? AND seq < ? ORDER BY seq DESC "
                                     "LIMIT 1", (name, first)).fetchone()
            if before is None or not isinstance(before[0], int) or before[0] <= starts[-1]:
                continue  # nothing between the previous start and this one (records deleted): one part fewer
            ends.append(first - 1)
            starts.append(before[0])
            hashes.append(before[1])
        workers = len(starts)
        ends.append(_NO_END)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            walking = pool.map(_walk_file, [self.path] * workers, [name] * workers, starts, hashes, ends)
            meanwhile, self._meanwhile = self._meanwhile, None
            if meanwhile is not None:  # the workers are forked by now: this process's own query runs beside them
                meanwhile()
            parts = list(walking)
        problems: list[tuple[str, str | None]] = []
        gaps: list[tuple[str, str]] = []
        checked = count = 0
        for part in parts:
            if not problems:
                checked += part.checked
            problems += part.problems
            gaps += part.gaps
            count += part.count
        return _Walk(problems, checked, count, gaps)

    def _newest_matching_head(self, name: str, anchors: Anchors) -> tuple[int, str] | None:
        """(seq, hash) of the newest signed head the database still holds exactly: an incremental verify starts
        after it. Records before it are not recomputed (an edit there that left every hash as it was is found
        only by a full verify); a rewrite with recomputed hashes up to it would not match it."""
        for head in sorted(anchors.heads.get(name, []), key=lambda h: h.seq, reverse=True):
            row = self.db.execute("SELECT hash FROM records WHERE node = ? AND seq = ?", (name, head.seq)).fetchone()
            if row is not None and row[0] == head.hash:
                return head.seq, head.hash
        return None

    def verify_all(self, anchors: Anchors | None = None) -> tuple[list[ChainReport], list[str]]:
        """``verify()`` of every node and ``check_identities()``: the identities query (a pass over every
        record, 0.6 s at 1M) runs in this process while the worker processes walk the first large chain,
        instead of after the walk (a thread was not used: forking the workers while a thread is inside
        SQLite can copy a mutex it holds into the child)."""
        found: list[list[str]] = []
        self._meanwhile = lambda: found.append(self.check_identities())
        try:
            reports = self.verify(None, anchors)
        finally:
            self._meanwhile = None
        return reports, found[0] if found else self.check_identities()

    def check_identities(self, after: dict[str, int] | None = None) -> list[str]:
        """Every (device, client id, fingerprint) the records use must be in ``identities``: queries by client id
        or fingerprint go through that table, so a deleted row would hide the records from ``--client``.
        ``after``: only the records of each node after that sequence number (an incremental verify)."""
        used = ("SELECT DISTINCT coalesce(device_id, ''), coalesce(client_id, ''), coalesce(fingerprint, '') "
                "FROM records")
        if after is None:
            missing = self.db.execute(f"{used} EXCEPT SELECT device_id, client_id, fingerprint FROM identities"
                                      ).fetchall()
        else:
            missing = []
            for name, seq in after.items():
                missing += self.db.execute(f"{used} WHERE node = ? AND seq > ? EXCEPT SELECT device_id, client_id, "
                                           "fingerprint FROM identities", (name, seq)).fetchall()
        if not missing:
            return []
        shown = "; ".join(f"device {d or '-'}, client {c or '-'}, fingerprint {f[:16] or '-'}" for d, c, f in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        return [f"identities table: {len(missing)} (device, client id, fingerprint) used by records missing "
                f"(rows deleted: --client and --fingerprint would not find their records): {shown}{more}"]

    def check_schema(self) -> list[str]:
        """Objects and definitions no version of the broker creates, and records out of the rowids SQLite gives
        (a query's --follow reads new records by rowid). Cheap: the schema table and two index seeks."""
        problems = []
        for kind, name, table, sql in self.db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"):
            if sql is None and str(name).startswith("sqlite_autoindex_"):
                continue  # the index of a UNIQUE or PRIMARY KEY constraint in the table's own definition
            if str(kind).lower() == "table" and name in _PLANNER_STATISTICS:
                continue  # ANALYZE's statistics: they choose between our indexes, and every plan answers alike
            if isinstance(sql, str) and _definition(sql) in KNOWN_DEFINITIONS:
                continue
            problems.append(f"schema: {kind} {name!r} on {table!r} is not as any broker version creates it "
                            f"(made or redefined by hand: queries may not answer from the records): {sql}")
        low = self.db.execute("SELECT min(rowid) FROM records").fetchone()[0]
        high = self.db.execute("SELECT max(rowid) FROM records").fetchone()[0]
        if low is not None and (low < 1 or high > MAX_ROWID):
            problems.append(f"records table: rowids from {low} to {high}, not as SQLite gives them (1 up): "
                            "records moved by hand (query --follow reads new records by rowid)")
        return problems

    def check_pages(self) -> list[str]:
        """SQLite's ``integrity_check``: every page well formed, and every index entry matching its record (a
        query by device, topic or time reads the index, not the records verify walks). O(records), so only for
        ``verify --deep``. Where the file is too damaged for it, ``quick_check`` (pages only), and where even
        that stops, the error: a broken database, not a tool failure."""
        found: list[str] = []
        for pragma in ("integrity_check(100)", "quick_check(100)"):
            try:
                found = [line for row in self.db.execute(f"PRAGMA {pragma}") for line in str(row[0]).splitlines()]
                break
            except sqlite3.DatabaseError as exc:
                found = [f"cannot be read: {exc}"]
        if found == ["ok"]:
            return []
        shown = [f"database pages: {problem}" for problem in found[:20]]
        if len(found) > 20:
            shown.append(f"database pages: {len(found) - 20} more problems")
        return shown

    def _checkpoint_nodes(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT node FROM checkpoints")]

    def _check_anchors(self, name: str, checkpoint: tuple[int, str] | None, count: int, anchors: Anchors,
                       problems: list[tuple[str, str | None]]) -> tuple[int, int | None]:
        """Compare one node's chain with its signed heads; returns how many match and the newest that does."""
        heads = sorted(anchors.heads.get(name, []), key=lambda h: h.seq)
        prunes = anchors.prunes.get(name, [])
        if not heads and not prunes:
            if count:
                problems.append((f"no signed heads for node {name}: its {count} records are not anchored (anchoring "
                                 "off for this node, or its heads file deleted)", None))
            return 0, None
        # The largest numeric sequence number (text sorts after numbers: a text one is reported by verify).
        last_row = self.db.execute("SELECT seq FROM records WHERE node = ? AND seq <= ? ORDER BY seq DESC LIMIT 1",
                                   (name, _MAX_SEQ)).fetchone()
        checkpoint_seq = checkpoint[0] if checkpoint else 0
        db_end = int(last_row[0]) if last_row is not None else checkpoint_seq
        newest = heads[-1] if heads else None
        if count == 0 and checkpoint is None:
            where = f"{name}:{newest.seq}" if newest else None
            problems.append((f"node {name} is missing from the database: {len(heads)} signed heads, the newest at "
                             f"{where}", where))
            return 0, None
        if checkpoint is not None and not any((p.seq, p.hash) == tuple(checkpoint) for p in prunes):
            where = f"{name}:{checkpoint_seq}"
            problems.append((f"records {name}:1..{checkpoint_seq} deleted at the old end: the checkpoint at {where} "
                             "is not a signed prune (a fake checkpoint row)", where))
        matched, matched_seq, last_ok = 0, None, checkpoint_seq
        failures: list[tuple[str, str]] = []
        renumbered = False
        for head in heads:
            if head.seq < checkpoint_seq or (head.seq == checkpoint_seq and checkpoint is not None
                                              and head.hash == checkpoint[1]):
                continue  # pruned: a signed prune, checked above, vouches for the checkpoint
            row = self.db.execute("SELECT hash FROM records WHERE node = ? AND seq = ?", (name, head.seq)).fetchone()
            if row is not None and row[0] == head.hash:
                matched, matched_seq, last_ok = matched + 1, head.seq, head.seq
                continue
            moved = None
            if head.ts is not None:
                # Records of one burst can share a time: the one nearest the signed number, the lower first.
                found = self.db.execute(
                    "SELECT seq FROM records WHERE node = ? AND ts = ? AND seq != ? AND typeof(seq) = 'integer' "
                    "ORDER BY abs(seq - ?), seq LIMIT 1", (name, head.ts, head.seq, head.seq)).fetchone()
                moved = found[0] if found else None  # a text one: _odd_sequence_numbers
            if moved is not None:
                renumbered = True
                shift = (f"{head.seq - moved} record(s) in {name}:{last_ok + 1}..{head.seq} deleted" if moved < head.seq
                         else f"{moved - head.seq} record(s) inserted before it")
                failures.append(("renumbered", f"the record signed as {name}:{head.seq} (signed head #{head.n}) is "
                                 f"stored as {name}:{moved}: {shift} and the chain renumbered and rehashed"))
            elif row is not None:
                failures.append(("rewritten", f"{name}:{head.seq} differs from signed head #{head.n}: records in "
                                 f"{name}:{last_ok + 1}..{head.seq} were rewritten and the hashes after them "
                                 "recomputed"))
            elif head.seq > db_end:
                if not renumbered:
                    failures.append(("truncated", f"records {name}:{db_end + 1}..{head.seq} deleted at the new end: "
                                     f"signed head #{head.n} names {name}:{head.seq}, the database ends at "
                                     f"{name}:{db_end}"))
            # a signed record missing inside the chain: the walk above already reports the gap
        reported: set[str] = set()
        for kind, message in failures:
            if kind in reported:
                continue
            later = sum(1 for k, _ in failures if k == kind) - 1
            reported.add(kind)
            problems.append((message + (f" ({later} later signed heads differ too)" if later else ""), None))
        return matched, matched_seq

    def _has_conflicts_table(self) -> bool:
        """Databases written before the conflicts table existed, opened read-only, lack it."""
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'conflicts'").fetchone() is not None

    def prune(self, before: float, sign_checkpoint: CheckpointSigner | None = None) -> int:
        """Delete records older than ``before``; each node's chain then starts from a checkpoint of its last deleted record.

        With ``sign_checkpoint`` each new checkpoint is signed (outside the database) before the deletion
        commits, so verify can tell this prune from someone deleting the oldest records and faking a checkpoint.
        """
        removed = 0
        with self.db:
            for name in self.nodes():
                last = self.db.execute(
                    "SELECT seq, hash, ts FROM records WHERE node = ? AND seq <= "
                    "(SELECT coalesce(max(seq), 0) FROM records WHERE node = ? AND ts < ?) ORDER BY seq DESC LIMIT 1",
                    (name, name, before)).fetchone()
                if last is None:
                    continue
                if sign_checkpoint is not None:
                    sign_checkpoint(name, last[0], last[1], last[2])
                cursor = self.db.execute("DELETE FROM records WHERE node = ? AND seq <= ?", (name, last[0]))
                removed += cursor.rowcount
                self.db.execute("INSERT OR REPLACE INTO checkpoints (node, seq, hash) VALUES (?, ?, ?)",
                                (name, last[0], last[1]))
        return removed


def _topic_selected(topic_filter: str, record: AssertionRecord) -> bool:
    topic = record.topic
    if topic is None:
        return False
    if "+" in topic or "#" in topic:
        return covers(topic_filter, topic)
    return matches(topic_filter, topic)
