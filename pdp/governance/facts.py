"""What the reports need from the assertion log, read in a few grouped queries (not record by record)."""

from __future__ import annotations

from pdp.core.sharing import host_of
from pdp.evidence.store import AssertionStore
from pdp.governance.reports import CertificateUse, LogFacts, Sighting


def read_facts(store: AssertionStore, since: float | None = None) -> LogFacts:
    """Each device's newest admitted connect (whatever its age: 'never seen' must mean never), and each
    certificate's use since ``since`` (connects admitted, shared-certificate records)."""
    last_seen: dict[str, Sighting] = {}
    # SQLite takes the bare columns from the row holding max(ts).
    for device_id, ts, fingerprint, serial, issuer in store.db.execute(
            "SELECT device_id, max(ts), fingerprint, serial, issuer FROM records WHERE action = 'connect' "
            "AND decision = 'allow' AND device_id IS NOT NULL GROUP BY device_id"):
        last_seen[device_id] = Sighting(ts, fingerprint, serial, issuer)
    window, params = ("AND ts >= ?", [since]) if since is not None else ("", [])
    uses: dict[str, dict] = {}
    for fingerprint, device_id, client_id, peer, ts in store.db.execute(
            "SELECT fingerprint, device_id, client_id, peer, ts FROM records WHERE action = 'connect' AND decision = "
            f"'allow' AND fingerprint IS NOT NULL {window}", params):
        use = uses.setdefault(fingerprint, {"devices": set(), "clients": set(), "hosts": set(), "n": 0, "last": 0.0,
                                            "shared": 0, "reasons": []})
        use["devices"].add(device_id)
        use["clients"].add(client_id)
        use["hosts"].add(host_of(peer))
        use["n"] += 1
        use["last"] = max(use["last"], ts)
    for fingerprint, device_id, client_id, ts, reason in store.db.execute(
            "SELECT fingerprint, device_id, client_id, ts, reason FROM records WHERE action = 'shared-certificate' "
            f"AND fingerprint IS NOT NULL {window} ORDER BY ts", params):
        use = uses.setdefault(fingerprint, {"devices": set(), "clients": set(), "hosts": set(), "n": 0, "last": ts,
                                            "shared": 0, "reasons": []})
        use["shared"] += 1
        if len(use["reasons"]) < 3:
            use["reasons"].append(reason)
    certificates = {fp: CertificateUse(fp, frozenset(d for d in u["devices"] if d), frozenset(c for c in u["clients"] if c),
                                       frozenset(u["hosts"]), u["n"], u["last"], u["shared"], tuple(u["reasons"]))
                    for fp, u in uses.items()}
    return LogFacts(last_seen, certificates)
