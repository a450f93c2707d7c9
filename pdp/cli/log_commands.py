"""``mqtt-pdp log``: what security teams run against the assertion log."""

from __future__ import annotations

import argparse
import csv
import json
import re
import sqlite3
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from pdp.evidence.record import FIELD_NAMES, AssertionRecord
from pdp.evidence.store import AssertionStore, QueryFilters, connect_readonly
from pdp.evidence.text import csv_cell, cut, safe_text

DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
TABLE_WIDTH = 48  # the widest a table column gets; longer values are cut with a marker
TABLE_COLUMNS = ("timestamp", "device_id", "client_id", "action", "topic", "decision", "rule_id", "reason", "cache_tier")


class LogCliError(Exception):
    pass


def parse_time(text: str, now: float | None = None) -> float:
    """``1h``, ``30m``, ``2d`` (that long ago) or an ISO 8601 time (UTC unless it says otherwise)."""
    match = DURATION_RE.match(text.strip())
    if match:
        return (now if now is not None else time.time()) - float(match.group(1)) * UNITS[match.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise LogCliError(f"cannot read time {text!r}: use e.g. 30m, 1h, 7d or 2026-11-25T10:00:00Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def add_arguments(sub: Any) -> None:
    log = sub.add_parser("log", help="query, summarise, verify, prune and drain the identity assertion log",
                         description="The identity assertion log: one record per connect, publish, subscribe and receive decision.")
    log_sub = log.add_subparsers(dest="log_command", required=True, metavar="LOG_COMMAND")

    def store_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--db", help="assertion database (default: assertion_db of -c, else deploy/broker.yaml's, else var/assertions.db)")
        p.add_argument("-c", "--config", help="broker config to take the database path from")

    q = log_sub.add_parser("query", help="records matching filters, as a table, JSON Lines or CSV",
                           description="Records matching every given filter, oldest first.")
    store_args(q)
    q.add_argument("--device", help="device id")
    q.add_argument("--client", help="MQTT client id")
    q.add_argument("--fingerprint", help="certificate SHA-256 fingerprint: hex, with or without colons or a sha256: prefix")
    q.add_argument("--action", choices=["connect", "publish", "subscribe", "receive", "disconnect", "unsubscribe",
                                        "admin", "shared-certificate", "gap", "tls"],
                   help="disconnect: sessions the broker ended (revocation, expiry, CRL, takeover); "
                        "unsubscribe: subscriptions a reload dropped; admin: registry changes by mqtt-pdp devices; "
                        "shared-certificate: one certificate on two connections or addresses; gap: records a "
                        "stopped broker lost (decision 'lost'); tls: refused TLS handshakes")
    q.add_argument("--decision", choices=["allow", "deny", "lost"])
    q.add_argument("--topic", help="MQTT filter: records whose topic it matches, e.g. 'sites/+/secret/#'")
    q.add_argument("--rule", help="deciding rule id")
    q.add_argument("--revision", help="snapshot revision as in the records (<policy>.<registry>[.<crl>]), or just "
                                      "the policy or registry revision that mqtt-pdp check prints")
    q.add_argument("--node", help="broker node")
    q.add_argument("--since", help="start: 30m, 1h, 7d ago or an ISO time")
    q.add_argument("--until", help="end (exclusive): 30m, 1h, 7d ago or an ISO time")
    q.add_argument("--limit", type=int, help="the newest N matching records (default: 100 for tables, all otherwise)")
    q.add_argument("--format", choices=["table", "jsonl", "csv"], default="table")
    q.add_argument("--follow", action="store_true", help="keep printing new matching records until interrupted")
    q.set_defaults(log_func=cmd_query)

    s = log_sub.add_parser("stats", help="a period summarised: outcomes, top denied devices and topics, refused connects",
                           description="Summary of a period (default: the last 24 hours).")
    store_args(s)
    s.add_argument("--since", default="24h")
    s.add_argument("--until")
    s.add_argument("--top", type=int, default=10)
    s.set_defaults(log_func=cmd_stats)

    v = log_sub.add_parser("verify", help="check every broker's hash chain; report every altered, removed or reordered record",
                           description="Verify the hash chains. Exit status 1 if any chain is broken; 3 if the chains are "
                                       "intact but hold gap records (LOST lines: a broker stopped with records it "
                                       "never wrote, e.g. killed with -9).")
    store_args(v)
    v.add_argument("--node", help="only this broker node")
    v.add_argument("--anchors", help="directory of signed heads (the broker's anchor_dir): also catch rewritten "
                                     "and recomputed chains, deleted newest or oldest records and deleted nodes")
    v.add_argument("--public-key", help="the signing key's public half (from mqtt-pdp log keygen); needs --anchors")
    v.add_argument("--incremental", action="store_true",
                   help="walk only the records after each node's newest signed head the database still holds "
                        "(needs --anchors); an edit before it that left every hash unchanged needs a full verify")
    v.add_argument("--deep", action="store_true",
                   help="also check every database page and that each index entry matches its record (SQLite's "
                        "integrity_check: 6.9 s at 1M records where a full verify takes 4.9 s); without it, verify "
                        "checks the records, the identities table and the index definitions, not the index contents")
    v.set_defaults(log_func=cmd_verify)

    k = log_sub.add_parser("keygen", help="create the Ed25519 key pair that signs chain heads (anchor_key_file)",
                           description="Write a new private key (mode 0600) and FILE.pub next to it. The broker signs "
                                       "with the private key; give verifiers only the .pub file.")
    k.add_argument("--out", required=True, help="private key file to create (never overwritten)")
    k.set_defaults(log_func=cmd_keygen)

    p = log_sub.add_parser("prune", help="delete records older than a given age (retention)",
                           description="Delete records older than --older-than; the chain keeps a checkpoint so verify still works.")
    store_args(p)
    p.add_argument("--older-than", required=True, help="age, e.g. 90d")
    p.add_argument("--key", help="sign the checkpoints (default: anchor_key_file of the broker config); without a "
                                 "signed checkpoint, verify --anchors reports the pruned records as deleted")
    p.add_argument("--anchors", help="where the signed checkpoints go (default: anchor_dir of the broker config)")
    p.set_defaults(log_func=cmd_prune)

    b = log_sub.add_parser("backup", help="copy the database consistently while the broker writes, then verify the copy",
                           description="Online backup (SQLite's backup API: a consistent copy while the broker keeps "
                                       "writing), mode 0600, then every chain of the copy verified. Never overwrites.")
    store_args(b)
    b.add_argument("--out", required=True, help="backup file to create")
    b.set_defaults(log_func=cmd_backup)

    r = log_sub.add_parser("reindex", help="give a database made by an earlier version the faster indexes",
                           description="Replace the four indexes on the records of a database created by an earlier version by "
                                       "this version's two (recording into it is about three times faster at 1M "
                                       "records). Takes a few seconds per million records; stop the broker first. "
                                       "Records and hashes are not touched.")
    store_args(r)
    r.set_defaults(log_func=cmd_reindex)

    d = log_sub.add_parser("drain", help="move records from the shared Redis Stream into the database",
                           description="Move records that brokers appended to the Redis Stream into the database (idempotent).")
    store_args(d)
    d.add_argument("--redis", help="Redis URL (default: redis_url of the broker config)")
    d.add_argument("--prefix", help="key prefix (default: redis_prefix of the broker config, else mqtt-pdp)")
    d.add_argument("--follow", action="store_true", help="keep draining until interrupted")
    d.set_defaults(log_func=cmd_drain)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    from pdp.runtime.config import settings_of

    return settings_of(args.config)


def _db_path(args: argparse.Namespace) -> str:
    if args.db:
        return str(args.db)
    return str(_settings(args).get("assertion_db") or "var/assertions.db")


def check_database(path: str, may_create: bool = False) -> None:
    """Refuse, in one line, anything at ``path`` that is not an assertion database, before SQLite touches it.

    Without this a typo in --db made prune create an empty database and report success, and an empty
    file, a directory or another application's SQLite file gave SQLite's own terse message or a schema
    written into someone else's file. Only ``log drain`` (which fills a database) may create a new one.
    """
    where = Path(path)
    if where.is_dir():
        raise LogCliError(f"{path} is a directory, not an assertion database")
    if not where.exists():
        if may_create:
            return
        raise LogCliError(f"no assertion database at {path} (has the broker run? use --db or -c)")
    if where.stat().st_size == 0:
        raise LogCliError(f"{path} is an empty file, not an assertion database")
    try:
        db, copy = connect_readonly(path, schema_only=True)
        try:
            found = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'records'").fetchone()
            if found is not None:
                try:  # another application's table of that name (an outside test: reindex wrote into one)
                    db.execute("SELECT record_id, node, seq, prev_hash, hash FROM records LIMIT 0")
                except sqlite3.OperationalError:
                    raise LogCliError(f"{path} has a records table that is not an assertion log's, not an "
                                      "assertion database") from None
        finally:
            db.close()
            if copy is not None:
                copy.remove()
    except sqlite3.DatabaseError as exc:
        raise LogCliError(f"{path} is not an assertion database: {exc}") from None
    if found is None:
        raise LogCliError(f"{path} is an SQLite database without a records table, not an assertion database")


def _open(args: argparse.Namespace, readonly: bool = True, may_create: bool = False) -> AssertionStore:
    path = _db_path(args)
    check_database(path, may_create)
    store = AssertionStore(path, readonly=readonly)
    _note_unindexed(store)
    return store


def _note_unindexed(store: AssertionStore) -> None:
    if store.unindexed:
        sys.stderr.write(f"mqtt-pdp: {store.unindexed} of the newest records are stored but not indexed, and not in "
                         f"this answer: {store.path} cannot be written from here (the broker's writer indexes them "
                         "when it is idle)\n")


# Fixed column widths for --follow in table mode: the header is printed once, and later rows line up with it.
FOLLOW_WIDTHS = {"timestamp": 27, "device_id": 20, "client_id": 20, "action": 11, "topic": 40, "decision": 8,
                 "rule_id": 20, "reason": 40, "cache_tier": 10}


def _write_table(records: list[AssertionRecord], out: TextIO, header: bool = True, fixed: bool = False) -> None:
    """Device-supplied text is escaped (a newline in a topic cannot forge a row) and long values are cut with
    a marker, so a cut value is never read as the whole one."""
    rows = [[_cell(r, c) for c in TABLE_COLUMNS] for r in records]
    if fixed:
        widths = [FOLLOW_WIDTHS[c] for c in TABLE_COLUMNS]
    else:
        widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(TABLE_COLUMNS)]
        widths = [min(w, TABLE_WIDTH) for w in widths]
    if header:
        out.write("  ".join(c.upper().ljust(w) for c, w in zip(TABLE_COLUMNS, widths)).rstrip() + "\n")
    for row in rows:
        out.write("  ".join(cut(v, w).ljust(w) for v, w in zip(row, widths)).rstrip() + "\n")


def _cell(record: AssertionRecord, column: str) -> str:
    value = record.timestamp if column == "timestamp" else getattr(record, column)
    return "-" if value is None else safe_text(value)


# JSON Lines for a SIEM: what was decided, about whom and what first; the rest in record order.
JSONL_FIRST = ("decision", "device_id", "action")


def _emit(records: list[AssertionRecord], fmt: str, out: TextIO, header: bool, fixed: bool = False) -> None:
    if fmt == "jsonl":  # json escapes control characters itself
        for record in records:
            data = record.to_json_dict()
            ordered = {**{k: data[k] for k in JSONL_FIRST}, **data}
            out.write(json.dumps(ordered, separators=(",", ":")) + "\n")
    elif fmt == "csv":  # quoting keeps newlines inside their cell; formulas are neutralised
        writer = csv.writer(out)
        if header:
            writer.writerow(["timestamp", *FIELD_NAMES])
        for record in records:
            writer.writerow([record.timestamp, *(csv_cell(getattr(record, n)) for n in FIELD_NAMES)])
    else:
        _write_table(records, out, header, fixed)
    out.flush()


def cmd_query(args: argparse.Namespace) -> int:
    from pdp.core.topics import TopicError, validate_filter

    if args.topic is not None:
        try:
            validate_filter(args.topic)
        except TopicError as exc:
            raise LogCliError(str(exc)) from None
    if args.limit is not None and args.limit < 1:
        raise LogCliError("--limit must be at least 1")
    fingerprint = None
    if args.fingerprint is not None:
        from pdp.core.identity import normalize_fingerprint

        try:  # as the registry reads them: 'sha256:' prefix, colons and upper case all allowed
            fingerprint = normalize_fingerprint(args.fingerprint)
        except ValueError as exc:
            raise LogCliError(f"--fingerprint: {exc}") from None
    filters = QueryFilters(
        device=args.device, client_id=args.client, fingerprint=fingerprint,
        action=args.action, decision=args.decision, topic=args.topic, rule_id=args.rule,
        policy_revision=args.revision, node=args.node,
        since=parse_time(args.since) if args.since else None, until=parse_time(args.until) if args.until else None,
    )
    store = _open(args)
    _check_node(store, args.node)
    limit = args.limit if args.limit is not None else (100 if args.format == "table" and not args.follow else None)
    truncated = False
    if limit is not None:  # one more than asked for: whether the output is cut is then known, not guessed
        rows = list(store.query(filters, limit=limit + 1, newest_first=True))[::-1]
        truncated = len(rows) > limit
        rows = rows[1:] if truncated else rows
    else:
        rows = list(store.query(filters))
    _emit([r for _, r in rows], args.format, sys.stdout, header=True, fixed=args.follow)
    if truncated:  # on stderr: a pipe of jsonl or csv gets only records
        sys.stderr.write(f"mqtt-pdp: showing the newest {limit} matching records; more match "
                         "(use --limit N, --since or more filters)\n")
    if not args.follow:
        return 0
    last = max((rowid for rowid, _ in rows), default=0)
    try:
        while True:
            time.sleep(0.5)
            store.catch_up()  # what the writer stored meanwhile, indexed (it waits for a quiet moment itself)
            new = list(store.query(filters, after_rowid=last))
            if new:
                # The largest rowid, not the newest record's: a batch indexed late has older records under
                # higher rowids, and the next poll printed them again (found by an outside attack).
                last = max(rowid for rowid, _ in new)
                _emit([r for _, r in new], args.format, sys.stdout, header=False, fixed=True)
    except KeyboardInterrupt:
        return 0


def cmd_stats(args: argparse.Namespace) -> int:
    store = _open(args)
    since = parse_time(args.since) if args.since else None
    until = parse_time(args.until) if args.until else None
    stats = store.stats(since, until, args.top)
    start = datetime.fromtimestamp(since, timezone.utc).isoformat(timespec="seconds") if since else "the beginning"
    print(f"decisions since {start}:")
    for action, decision, count in stats["outcomes"]:
        print(f"  {action:<10} {decision:<6} {count:>10}")
    if not stats["outcomes"]:
        print("  none")
    print("top denied devices:")
    for device, count in stats["top_denied_devices"] or [("none", "")]:
        print(f"  {safe_text(device, 40):<40} {count:>10}")
    print("top denied topics:")
    for topic, count in stats["top_denied_topics"] or [("none", "")]:
        print(f"  {safe_text(topic, 60):<60} {count:>10}")
    print("refused connects:")
    for device, reason, count in stats["refused_connects"] or [("none", "", "")]:
        print(f"  {safe_text(device, 30):<30} {safe_text(reason, 40):<40} {count:>6}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    anchors = None
    if args.anchors or args.public_key:
        if not (args.anchors and args.public_key):
            raise LogCliError("--anchors and --public-key go together")
        from pdp.evidence.anchor import AnchorError, load_public_key, read_anchors

        try:
            anchors = read_anchors(args.anchors, load_public_key(args.public_key))
        except AnchorError as exc:
            raise LogCliError(str(exc)) from None
    if args.incremental and anchors is None:
        raise LogCliError("--incremental needs --anchors and --public-key")
    store = _open(args)
    _check_node(store, args.node)
    identity_problems: list[str] | None = None
    if args.node or args.incremental:
        reports = store.verify(args.node, anchors, incremental=args.incremental)
    else:
        reports, identity_problems = store.verify_all(anchors)
    broken = gapped = 0
    for problem in anchors.problems if anchors else []:
        broken += 1
        print(f"BROKEN: anchors: {safe_text(problem)}")
    if not reports:
        print("no records")
    for report in reports:
        for record_id, reason in report.gaps:
            print(f"LOST: {safe_text(record_id)}: {safe_text(reason)}")
        if report.gaps:
            gapped += 1
        if report.problem is None:
            status = "incomplete" if report.gaps else "ok"
            gaps = f", {len(report.gaps)} known gap(s): records lost, see LOST lines" if report.gaps else ""
            line = f"{status}: node {safe_text(report.node)}: {report.records} records, chain intact{gaps}"
            if report.skipped:
                line += (f" (incremental: the {report.checked} after the newest matching signed head walked, "
                         f"{report.skipped} before it not)")
            if anchors is not None and report.anchored_seq is not None:
                unpinned = _after(store, report)
                line += (f", matches {report.anchored} signed heads up to {safe_text(report.node)}:"
                         f"{report.anchored_seq}")
                if unpinned:
                    line += f" ({unpinned} newer records not signed yet)"
            print(line)
        else:
            broken += 1
            for problem, _ in report.problems:
                print(f"BROKEN: node {safe_text(report.node)}: {safe_text(problem)}")
    if not args.node:
        after = {r.node: r.verified_after for r in reports} if args.incremental else None
        for problem in identity_problems if identity_problems is not None else store.check_identities(after):
            broken += 1
            print(f"BROKEN: {safe_text(problem)}")
    for problem in store.check_schema() + (store.check_pages() if args.deep else []):
        broken += 1
        print(f"BROKEN: {safe_text(problem)}")
    if store.unindexed:
        print(f"incomplete: the newest {store.unindexed} records are stored but not indexed, and not verified "
              f"(no write access to {safe_text(store.path)})")
    return 1 if broken else (3 if gapped or store.unindexed else 0)


def cmd_reindex(args: argparse.Namespace) -> int:
    store = _open(args, readonly=False)
    try:
        changed = store.reindex()
    finally:
        store.close()
    print(f"{store.path}: " + ("indexes of an earlier version replaced by this version's" if changed
                               else "already has this version's indexes"))
    return 0


def _check_node(store: AssertionStore, node: str | None) -> None:
    """A node id nobody records under is a typo, not an empty result ("0 records, chain intact" misled)."""
    if node is None:
        return
    if store.db.execute("SELECT 1 FROM records WHERE node = ? LIMIT 1", (node,)).fetchone() is not None:
        return
    nodes = [row[0] for row in store.db.execute("SELECT DISTINCT node FROM records ORDER BY node LIMIT 11")]
    known = ", ".join(safe_text(n, 40) for n in nodes[:10]) + (", ..." if len(nodes) > 10 else "")
    raise LogCliError(f"no records of node {safe_text(node, 60)!r} in {store.path} (nodes: {known or 'none'})")


def _after(store: AssertionStore, report: Any) -> int:
    """Records of the node after its newest signed head: what a database writer could still cut unnoticed."""
    return int(store.db.execute("SELECT count(*) FROM records WHERE node = ? AND seq > ?",
                                (report.node, report.anchored_seq)).fetchone()[0])


def cmd_keygen(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pdp.evidence.anchor import AnchorError, generate_key

    try:
        public = generate_key(Path(args.out))
    except AnchorError as exc:
        raise LogCliError(str(exc)) from None
    print(f"wrote {args.out} (private: anchor_key_file of the broker, readable by it only) and {public} "
          "(public: for mqtt-pdp log verify --public-key)")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    match = DURATION_RE.match(args.older_than.strip())
    if not match:
        raise LogCliError(f"--older-than {args.older_than!r}: use an age such as 90d or 12h")
    signer = None
    key = args.key or (_settings(args).get("anchor_key_file") if args.config else None)
    if key:
        from pdp.evidence.anchor import AnchorError, prune_signer

        directory = args.anchors or _settings(args).get("anchor_dir") or "var/anchors"
        try:
            signer = prune_signer(key, directory)
        except AnchorError as exc:
            raise LogCliError(str(exc)) from None
    store = _open(args, readonly=False)
    removed = store.prune(parse_time(args.older_than), signer)
    print(f"pruned {removed} records older than {args.older_than}" + (" (checkpoints signed)" if signer and removed else ""))
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    import os

    out = Path(args.out)
    if out.exists():
        raise LogCliError(f"{out} exists: a backup never overwrites (choose a new name, e.g. with the date)")
    if not out.parent.is_dir():
        raise LogCliError(f"{out.parent} is not a directory")
    store = _open(args)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # evidence: owner-only from the first byte
    os.close(fd)
    try:
        target = sqlite3.connect(out)
        try:
            store.db.backup(target)
        finally:
            target.close()
    except (sqlite3.Error, OSError):
        out.unlink(missing_ok=True)
        raise
    copy = AssertionStore(out, readonly=True)
    try:
        reports = copy.verify()
        count = copy.count()
    finally:
        copy.close()
    broken = [r for r in reports if r.problem is not None]
    if broken:
        print(f"backed up {count} records to {out}, but {len(broken)} chain(s) are broken: run mqtt-pdp log verify")
        return 1
    print(f"backed up {count} records of {len(reports)} node(s) to {out}; every chain verified")
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    import redis

    from pdp.evidence.sinks import drain_stream

    settings = _settings(args)
    url = args.redis or settings.get("redis_url")
    if not url:
        raise LogCliError("no Redis URL: give --redis or redis_url in the broker config")
    prefix = args.prefix or settings.get("redis_prefix") or "mqtt-pdp"
    try:
        client = redis.Redis.from_url(url, socket_timeout=5)
    except ValueError as exc:
        raise LogCliError(f"Redis URL {url!r}: {exc}") from None
    store = _open(args, readonly=False, may_create=True)
    try:
        while True:
            try:
                moved = drain_stream(store, client, prefix)
            except redis.RedisError as exc:
                if not args.follow:
                    raise LogCliError(f"Redis at {url}: {exc}") from None
                print(f"mqtt-pdp: Redis unavailable ({exc}); retrying", file=sys.stderr)
                moved = 0
            if moved or not args.follow:
                print(f"drained {moved} records into {store.path}")
            if store.forked:
                print(f"mqtt-pdp: error: {store.forked} records fork from the chain already stored for node(s) "
                      f"{', '.join(safe_text(n) for n in sorted(store.forked_nodes))} (two brokers recorded under one "
                      "node id); not merged: kept in the conflicts table, which log verify reports", file=sys.stderr)
            if not args.follow:
                return 1 if store.forked else 0
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 1 if store.forked else 0
    finally:
        store.close()


def run(args: argparse.Namespace) -> int:
    return int(args.log_func(args))
