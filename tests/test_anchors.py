"""Signed chain heads: each way of tampering with the database that the chain alone cannot show, done to a
store a real writer (or broker) wrote, and `mqtt-pdp log verify --anchors` naming exactly that tampering."""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from pdp.evidence.record import GENESIS, AssertionRecord, chain_hash
from pdp.evidence.writer import build_writer
from tests.test_log_cli import cli

SESSION = ("s1", "ab" * 32, "0a1b", "CN=unit CA", "sensor", "plant-a", "test", "qa", "active")
DAY = 86400.0


def rows(first: int, count: int, base: float) -> tuple[list, dict]:
    return ([(base + i, 1, "c1", "127.0.0.1:5000", "publish", f"t/{i}", True, "r", "allowed by rule r", "l1", 1500,
              "rev1") for i in range(first, first + count)], {1: SESSION})


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    private = tmp_path_factory.mktemp("key") / "anchor.key"
    made = cli("log", "keygen", "--out", str(private))
    assert made.returncode == 0, made.stderr
    assert private.stat().st_mode & 0o777 == 0o600
    again = cli("log", "keygen", "--out", str(private))
    assert (again.returncode, again.stderr.strip()) == (
        2, f"mqtt-pdp: error: {private} exists; not overwriting a signing key")
    return private


def write_store(directory: Path, key: Path, nodes: tuple[str, ...] = ("n1",)) -> tuple[Path, Path]:
    """25 records per node in batches of 5 (10 aged 100 days, 15 from yesterday), signed every 5 records."""
    db, anchors = directory / "a.db", directory / "anchors"
    for node in nodes:
        writer = build_writer({"node": node, "spool_dir": str(directory / f"spool-{node}"), "assertion_db": str(db),
                               "stream_url": "", "stream_prefix": "p", "anchor_key_file": str(key),
                               "anchor_dir": str(anchors), "anchor_every": 5, "anchor_interval": 3600})
        now = time.time()
        for batch in range(5):
            base = now - 100 * DAY if batch < 2 else now - DAY
            assert writer.write(*rows(batch * 5, 5, base), f"{node}:{batch}") == 5
        writer.close()
    return db, anchors


@pytest.fixture
def store(tmp_path: Path, key: Path) -> tuple[Path, Path]:
    return write_store(tmp_path, key)


def verify(db: Path, anchors: Path, key: Path) -> tuple[int, list[str]]:
    result = cli("log", "verify", "--db", str(db), "--anchors", str(anchors), "--public-key", f"{key}.pub")
    assert result.stderr == ""
    return result.returncode, result.stdout.splitlines()


def records(db: Path, node: str = "n1") -> list[AssertionRecord]:
    with sqlite3.connect(db) as conn:
        return [AssertionRecord._make(row) for row in conn.execute(
            "SELECT record_id, node, seq, ts, client_id, device_id, fingerprint, serial, issuer, type, location, "
            "purpose, owner, status, action, topic, decision, rule_id, reason, policy_revision, cache_tier, "
            "latency_us, peer, prev_hash, hash FROM records WHERE node = ? ORDER BY seq", (node,))]


def rewrite_chain(db: Path, new: list[AssertionRecord], node: str = "n1") -> None:
    """What an attacker with write access does: replace the node's records with a recomputed, internally valid chain."""
    prev = GENESIS
    fixed = []
    for seq, record in enumerate(new, 1):
        record = record._replace(seq=seq, record_id=f"{node}:{seq}", prev_hash=prev)
        record = record._replace(hash=chain_hash(record[:-1]))
        fixed.append(record)
        prev = record.hash
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM records WHERE node = ?", (node,))
        conn.executemany(f"INSERT INTO records VALUES ({', '.join('?' * 25)})", fixed)
        conn.execute("DELETE FROM meta")


def test_untampered_store_verifies_against_its_signed_heads(store, key: Path) -> None:
    db, anchors = store
    assert verify(db, anchors, key) == (0, ["ok: node n1: 25 records, chain intact, matches 5 signed heads up to n1:25"])
    heads = [json.loads(line) for line in (anchors / "n1.heads").read_text().splitlines()]
    assert [(h["n"], h["seq"]) for h in heads] == [(1, 5), (2, 10), (3, 15), (4, 20), (5, 25)]
    assert heads[-1]["hash"] == records(db)[-1].hash
    # without anchors, the old check alone
    plain = cli("log", "verify", "--db", str(db))
    assert (plain.returncode, plain.stdout) == (0, "ok: node n1: 25 records, chain intact\n")


def test_rewritten_record_with_recomputed_hashes(store, key: Path) -> None:
    db, anchors = store
    original = records(db)
    forged = [r._replace(decision="deny", reason="forged") if r.seq == 7 else r for r in original]
    rewrite_chain(db, forged)
    assert cli("log", "verify", "--db", str(db)).returncode == 0  # the chain alone cannot see it
    assert verify(db, anchors, key) == (1, [
        "BROKEN: node n1: n1:10 differs from signed head #2: records in n1:6..10 were rewritten and the hashes "
        "after them recomputed (3 later signed heads differ too)"])


def test_deleted_record_and_renumbered_chain(store, key: Path) -> None:
    db, anchors = store
    rewrite_chain(db, [r for r in records(db) if r.seq != 7])
    assert cli("log", "verify", "--db", str(db)).returncode == 0
    assert verify(db, anchors, key) == (1, [
        "BROKEN: node n1: the record signed as n1:10 (signed head #2) is stored as n1:9: 1 record(s) in n1:6..10 "
        "deleted and the chain renumbered and rehashed (3 later signed heads differ too)"])


def test_renumbered_chain_whose_records_share_a_time_counts_what_was_deleted_or_inserted(store, key: Path) -> None:
    """Records of one burst can share a timestamp; the count named was negative when another record of the
    signed one's time was taken for it (an outside attack)."""
    db, anchors = store
    original = records(db)
    signed_ts = original[9].ts  # n1:10, signed head #2
    burst = [r._replace(ts=signed_ts) if r.seq in (8, 12, 13) else r for r in original]
    rewrite_chain(db, [r for r in burst if r.seq != 7])
    assert verify(db, anchors, key)[1][0].startswith(
        "BROKEN: node n1: the record signed as n1:10 (signed head #2) is stored as n1:9: 1 record(s) in n1:6..10 "
        "deleted and the chain renumbered and rehashed")
    extra = original[11]._replace(topic="forged")
    rewrite_chain(db, burst[:8] + [extra] + burst[8:])
    assert verify(db, anchors, key)[1][0].startswith(
        "BROKEN: node n1: the record signed as n1:10 (signed head #2) is stored as n1:11: 1 record(s) inserted "
        "before it and the chain renumbered and rehashed")


def test_newest_records_deleted(store, key: Path) -> None:
    db, anchors = store
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM records WHERE seq > 22")
        conn.execute("DELETE FROM meta")
    assert cli("log", "verify", "--db", str(db)).returncode == 0
    assert verify(db, anchors, key) == (1, [
        "BROKEN: node n1: records n1:23..25 deleted at the new end: signed head #5 names n1:25, the database ends "
        "at n1:22"])


def test_oldest_records_deleted_behind_a_fake_checkpoint_but_a_signed_prune_passes(store, key: Path,
                                                                                    tmp_path: Path) -> None:
    db, anchors = store
    legit = tmp_path / "legit.db"
    shutil.copy(db, legit)
    eighth = records(db)[7]
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM records WHERE seq <= 8")
        conn.execute("INSERT INTO checkpoints VALUES ('n1', 8, ?)", (eighth.hash,))
    assert cli("log", "verify", "--db", str(db)).returncode == 0
    assert verify(db, anchors, key) == (1, [
        "BROKEN: node n1: records n1:1..8 deleted at the old end: the checkpoint at n1:8 is not a signed prune "
        "(a fake checkpoint row)"])

    pruned = cli("log", "prune", "--db", str(legit), "--older-than", "90d", "--key", str(key), "--anchors", str(anchors))
    assert (pruned.returncode, pruned.stdout) == (0, "pruned 10 records older than 90d (checkpoints signed)\n")
    assert verify(legit, anchors, key) == (
        0, ["ok: node n1: 15 records, chain intact, matches 3 signed heads up to n1:25"])


def test_whole_node_deleted(tmp_path: Path, key: Path) -> None:
    db, anchors = write_store(tmp_path, key, nodes=("n1", "n2"))
    assert verify(db, anchors, key)[0] == 0
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM records WHERE node = 'n2'")
        conn.execute("DELETE FROM meta WHERE key = 'head:n2'")
    assert cli("log", "verify", "--db", str(db)).returncode == 0
    assert verify(db, anchors, key) == (1, [
        "ok: node n1: 25 records, chain intact, matches 5 signed heads up to n1:25",
        "BROKEN: node n2: node n2 is missing from the database: 5 signed heads, the newest at n2:25"])


def test_deleted_identities_rows(store, key: Path) -> None:
    db, anchors = store
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM identities WHERE client_id = 'c1'")
    query = cli("log", "query", "--db", str(db), "--client", "c1", "--format", "jsonl")
    assert query.stdout == ""  # what the deletion hides
    assert cli("log", "verify", "--db", str(db)).returncode == 1  # a check of the database itself, anchors or not
    assert verify(db, anchors, key)[1] == [
        "ok: node n1: 25 records, chain intact, matches 5 signed heads up to n1:25",
        "BROKEN: identities table: 1 (device, client id, fingerprint) used by records missing (rows deleted: "
        "--client and --fingerprint would not find their records): device s1, client c1, fingerprint abababababababab"]


def test_every_break_is_reported_not_only_the_first(store, key: Path) -> None:
    """A crash-like hole early must not hide a truncation and a deleted identity later."""
    db, anchors = store
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM records WHERE seq = 3")
        conn.execute("UPDATE records SET topic = 'x' WHERE seq = 12")
        conn.execute("DELETE FROM records WHERE seq > 23")
        conn.execute("DELETE FROM identities")
    assert verify(db, anchors, key) == (1, [
        "BROKEN: node n1: record(s) n1:3 missing before n1:4",
        "BROKEN: node n1: n1:12 was altered (its hash does not match its content)",
        "BROKEN: node n1: records n1:24..25 deleted at the new end: signed head #5 names n1:25, the database ends "
        "at n1:23",
        "BROKEN: identities table: 1 (device, client id, fingerprint) used by records missing (rows deleted: "
        "--client and --fingerprint would not find their records): device s1, client c1, fingerprint abababababababab"])


def test_forged_or_deleted_signed_heads_are_reported(store, key: Path) -> None:
    db, anchors = store
    heads = anchors / "n1.heads"
    lines = heads.read_text().splitlines()
    forged = json.loads(lines[4])
    forged["seq"] = 22  # moves the head back, to hide a truncation: the signature no longer holds
    heads.write_text("\n".join([*lines[:2], *lines[3:4], json.dumps(forged)]) + "\n")
    assert verify(db, anchors, key) == (1, [
        f"BROKEN: anchors: {heads} line 4: signature does not verify with the given public key (forged, altered, "
        f"or signed by key {forged['key']})",
        f"BROKEN: anchors: {heads}: signed heads #3 of node 'n1' are missing from the file (lines deleted)",
        "ok: node n1: 25 records, chain intact, matches 3 signed heads up to n1:20 (5 newer records not signed yet)"])
    other = cli("log", "verify", "--db", str(db), "--anchors", str(anchors))
    assert (other.returncode, other.stderr.strip()) == (2, "mqtt-pdp: error: --anchors and --public-key go together")


def test_broker_signs_heads_on_its_interval_to_the_directory_and_the_stream(make_broker, test_pki, policy_dir,
                                                                           key: Path, shared_redis_url: str,
                                                                           redis_prefix: str) -> None:
    import redis

    from tests.support import Client, wait_for

    anchors = policy_dir.parent / "anchors"
    broker = make_broker(anchor_key_file=str(key), anchor_dir=str(anchors), anchor_every=1000, anchor_interval=0.2,
                         redis_url=shared_redis_url, redis_prefix=redis_prefix, assertion_stream=True)
    node = broker.plugin.service.node_id
    heads = anchors / f"{node}.heads"

    def newest() -> int:
        lines = heads.read_text().splitlines() if heads.exists() else []
        return json.loads(lines[-1])["seq"] if lines else 0

    client = Client(broker.port, "sensor-1", test_pki.device("sensor-1"), test_pki.ca_file)
    try:
        assert client.connect() == 0
        for i in range(4):
            client.publish("sites/plant-a/sensor-1/telemetry", b"%d" % i, qos=1)
        wait_for(lambda: newest() == 5, "the interval signs the head while the broker runs")
        assert client.subscribe("sites/plant-a/#") == 0x80
    finally:
        client.close()
    broker.stop()
    db = policy_dir.parent / "assertions.db"
    count = len(records(db, node))
    assert newest() == count == 6  # the graceful stop signed the last head
    stream = redis.Redis.from_url(shared_redis_url).xrange(f"{redis_prefix}:anchors")
    assert [fields[b"h"].decode() for _, fields in stream] == heads.read_text().splitlines(keepends=True)
    assert verify(db, anchors, key)[0] == 0
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM records WHERE seq = 6")  # the refused subscribe, gone
    code, lines = verify(db, anchors, key)
    assert (code, lines[-1]) == (1, f"BROKEN: node {node}: records {node}:6..6 deleted at the new end: signed head "
                                    f"#{len(stream)} names {node}:6, the database ends at {node}:5")


def test_bad_signing_key_stops_the_broker_with_one_line(test_pki, policy_dir, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from tests.support import write_cli_config

    bad = tmp_path / "not-a-key"
    bad.write_text("hello\n")
    config = write_cli_config(tmp_path / "bad-key.yaml", test_pki, policy_dir, anchor_key_file=str(bad))
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-m", "pdp.cli", "broker", "-c", str(config)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode != 0
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"mqtt-pdp: error: broker failed: anchor_key_file {bad}: cannot load an Ed25519 private "
                           "key"), result.stderr


def test_incremental_verify_walks_only_what_the_newest_signed_head_does_not_pin(store, key: Path) -> None:
    db, anchors = store
    heads = anchors / "n1.heads"
    heads.write_bytes(b"".join(heads.read_bytes().splitlines(keepends=True)[:-1]))  # newest head now at n1:20

    def incremental() -> tuple[int, list[str]]:
        result = cli("log", "verify", "--db", str(db), "--anchors", str(anchors), "--public-key", f"{key}.pub",
                     "--incremental")
        assert result.stderr == ""
        return result.returncode, result.stdout.splitlines()

    assert incremental() == (0, ["ok: node n1: 25 records, chain intact (incremental: the 5 after the newest matching "
                                 "signed head walked, 20 before it not), matches 4 signed heads up to n1:20 (5 newer "
                                 "records not signed yet)"])
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE records SET topic = 'forged' WHERE seq = 23")
        conn.execute("DELETE FROM identities WHERE client_id = 'c1'")
    code, lines = incremental()
    assert code == 1 and "BROKEN: node n1: n1:23 was altered (its hash does not match its content)" in lines
    assert any(line.startswith("BROKEN: identities table: 1 ") for line in lines)
    # Before the head: a full verify finds an edit that left the hashes as they were; an incremental one does not.
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE records SET topic = 't/22' WHERE seq = 23")
        conn.execute("INSERT INTO identities VALUES ('s1', 'c1', ?)", ("ab" * 32,))
        conn.execute("UPDATE records SET topic = 'forged' WHERE seq = 3")
    assert incremental()[0] == 0
    code, lines = verify(db, anchors, key)
    assert code == 1 and "BROKEN: node n1: n1:3 was altered (its hash does not match its content)" in lines
    # A rewrite with recomputed hashes matches no signed head: the incremental walk starts from the beginning.
    rewrite_chain(db, [r._replace(topic="rewritten") for r in records(db)])
    code, lines = incremental()
    assert code == 1 and any("differs from signed head" in line for line in lines)
    assert cli("log", "verify", "--db", str(db), "--incremental").returncode == 2


@pytest.mark.parametrize("value", ["'z'", "x'00'", "24.5"])
def test_a_sequence_number_that_is_not_an_integer_is_named(store, key: Path, value: str) -> None:
    """Found by an outside attack: the newest record's seq set to text sorted it after every integer, where
    the walk never met it: plain verify said intact, and verify with anchors crashed."""
    db, anchors = store
    with sqlite3.connect(db) as conn:
        conn.execute(f"UPDATE records SET seq = {value} WHERE node = 'n1' AND seq = 25")
    for args in ([], ["--anchors", str(anchors), "--public-key", f"{key}.pub"]):
        result = cli("log", "verify", "--db", str(db), *args)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert "not an integer: altered" in result.stdout


def test_indexes_triggers_and_views_added_or_redefined_by_hand_are_named(store, key: Path) -> None:
    """An index the planner may prefer answers queries from its own pages, a trigger can move what the writer
    stores: verify names every object and definition no broker version creates, whatever case its type is
    written in (SQLite reads 'Trigger' as a trigger; an outside attack hid one that way), and our own indexes
    and tables redefined."""
    db, anchors = store
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE INDEX sneaky ON records (device_id)")
        conn.execute("CREATE TRIGGER quiet AFTER INSERT ON records BEGIN SELECT 1; END")
        conn.execute("CREATE VIEW recent AS SELECT * FROM records")
        conn.execute("CREATE TRIGGER hidden AFTER INSERT ON records BEGIN SELECT 2; END")
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute("UPDATE sqlite_master SET type = 'Trigger' WHERE name = 'hidden'")
    code, lines = verify(db, anchors, key)
    assert code == 1
    assert lines[0] == "ok: node n1: 25 records, chain intact, matches 5 signed heads up to n1:25"
    assert sorted(line.split(" is not as ")[0] for line in lines[1:]) == [
        "BROKEN: schema: Trigger 'hidden' on 'records'", "BROKEN: schema: index 'sneaky' on 'records'",
        "BROKEN: schema: trigger 'quiet' on 'records'", "BROKEN: schema: view 'recent' on 'recent'"]
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute("DELETE FROM sqlite_master WHERE name IN ('sneaky', 'quiet', 'recent', 'hidden')")
    with sqlite3.connect(db) as conn:  # as the outside attack did: an index made partial, ts given TEXT affinity
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute("UPDATE sqlite_master SET sql = replace(sql, 'topic)', 'topic) WHERE device_id <> ''s1''') "
                     "WHERE name = 'records_block'")
        conn.execute("UPDATE sqlite_master SET sql = replace(sql, 'ts REAL', 'ts TEXT') WHERE name = 'records'")
    code, lines = verify(db, anchors, key)
    assert (code, sorted(line.split(" is not as ")[0] for line in lines[1:])) == (1, [
        "BROKEN: schema: index 'records_block' on 'records'", "BROKEN: schema: table 'records' on 'records'"])
    assert "WHERE device_id <> 's1'" in lines[1] + lines[2] and "ts TEXT" in lines[1] + lines[2]


@pytest.mark.parametrize("bits,columns", [(14, "device_id, ts, topic"), (16, "device_id, ts, topic"),
                                          (16, "device_id, topic")])
def test_indexes_of_earlier_versions_are_not_reported(store, key: Path, bits: int, columns: str) -> None:
    """Stores made by development versions have their own block index (an outside attack found (seq >> 16)
    reported as made by hand, and reindex kept it); ANALYZE's statistics are not made by hand either."""
    db, anchors = store
    with sqlite3.connect(db) as conn:
        conn.execute("DROP INDEX records_block")
        conn.execute(f"CREATE INDEX IF NOT EXISTS records_block ON records ((seq >> {bits}), {columns})")
        conn.execute("ANALYZE")
    assert verify(db, anchors, key) == (0, ["ok: node n1: 25 records, chain intact, matches 5 signed heads up to n1:25"])


def test_records_moved_to_rowids_sqlite_never_gives_are_named_and_still_found(store, key: Path) -> None:
    """An outside attack: a negative rowid hid a device from every query (each read 'rowid > 0'), and one
    record at rowid 2**63-1 made SQLite give new records random rowids, below what --follow had seen."""
    db, anchors = store
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE records SET rowid = -rowid WHERE seq <= 3")
        conn.execute("UPDATE records SET rowid = 9223372036854775807 WHERE seq = 25")
    assert len(json_lines(cli("log", "query", "--db", str(db), "--device", "s1", "--format", "jsonl"))) == 25
    assert len(json_lines(cli("log", "query", "--db", str(db), "--topic", "t/1", "--format", "jsonl"))) == 1
    code, lines = verify(db, anchors, key)
    assert (code, lines[1:]) == (1, [
        "BROKEN: records table: rowids from -3 to 9223372036854775807, not as SQLite gives them (1 up): records "
        "moved by hand (query --follow reads new records by rowid)"])


def test_values_stored_as_bytes_are_named_though_their_hash_matches(store, key: Path) -> None:
    """An outside attack: text re-stored as a BLOB hashes alike (verify joins the columns in SQL) but equals
    no text, so --device, --topic and the others found nothing."""
    db, anchors = store
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE records SET device_id = CAST(device_id AS BLOB) WHERE seq IN (4, 17)")
        conn.execute("UPDATE records SET topic = CAST(topic AS BLOB) WHERE seq = 9")
    assert len(json_lines(cli("log", "query", "--db", str(db), "--device", "s1", "--format", "jsonl"))) == 23
    code, lines = verify(db, anchors, key)
    assert code == 1
    assert [line for line in lines if "bytes" in line] == [
        f"BROKEN: node n1: n1:{seq} was altered: a value stored as bytes, not text (its hash still matches; a "
        "query comparing that column would not find the record)" for seq in (4, 9, 17)]


def test_index_entries_edited_in_the_file_hide_records_from_queries_and_deep_verify_names_it(store, key: Path) -> None:
    """The records and their chain intact, the index a query by device reads edited in place (its bytes,
    not SQL): the device's records vanish from --device. verify walks the records by (node, seq) and does
    not see it; --deep compares every index entry with its record."""
    db, anchors = store
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = [row[0] for row in conn.execute("SELECT pageno FROM dbstat WHERE name = 'records_block'")]
    assert len(json_lines(cli("log", "query", "--db", str(db), "--device", "s1", "--format", "jsonl"))) == 25
    data = bytearray(db.read_bytes())
    edited = 0
    for page in pages:
        start = (page - 1) * page_size
        chunk = bytes(data[start:start + page_size])
        edited += chunk.count(b"s1t/")  # an entry: block, device 's1', topic 't/..', rowid
        data[start:start + page_size] = chunk.replace(b"s1t/", b"s9t/")
    assert edited == 25
    db.write_bytes(bytes(data))
    assert json_lines(cli("log", "query", "--db", str(db), "--device", "s1", "--format", "jsonl")) == []
    assert verify(db, anchors, key) == (0, ["ok: node n1: 25 records, chain intact, matches 5 signed heads up to n1:25"])
    deep = cli("log", "verify", "--db", str(db), "--deep")
    assert deep.returncode == 1, deep.stdout
    lines = deep.stdout.splitlines()
    assert lines[0] == "ok: node n1: 25 records, chain intact"
    assert lines[1:] and all(line.startswith("BROKEN: database pages: ") for line in lines[1:])
    assert any("records_block" in line for line in lines[1:])


def test_deep_verify_of_pages_too_damaged_to_check_reports_them_broken(store, key: Path) -> None:
    """An outside attack: random bytes in an index page made integrity_check itself fail, and --deep ended
    as a tool error (exit 2) over exactly the tampering it is for."""
    db, _ = store
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        page = conn.execute("SELECT min(pageno) FROM dbstat WHERE name = 'records_block'").fetchone()[0]
    with open(db, "r+b") as handle:
        handle.seek((page - 1) * page_size + 8)
        handle.write(random.Random(5).randbytes(200))  # this seed: integrity_check raises
    deep = cli("log", "verify", "--db", str(db), "--deep")
    assert deep.returncode == 1, (deep.stdout, deep.stderr)
    assert "Traceback" not in deep.stderr
    assert [line for line in deep.stdout.splitlines() if line.startswith("BROKEN: database pages: ")]


def test_deep_verify_of_an_untouched_store_is_ok(store, key: Path) -> None:
    db, _ = store
    deep = cli("log", "verify", "--db", str(db), "--deep")
    assert (deep.returncode, deep.stdout) == (0, "ok: node n1: 25 records, chain intact\n")


def json_lines(result) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]
