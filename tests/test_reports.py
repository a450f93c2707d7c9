"""The governance reports on a scripted fleet: a real broker, real paho clients, the log they leave, the CLI."""

from __future__ import annotations

import csv
import io
import json

from pdp import pki
from pdp.cli.main import main
from tests.support import TRUST_DOMAIN, Client, write_cli_config


def test_reports_on_a_scripted_fleet(make_broker, connect_to, policy_dir, test_pki, tmp_path, capsys):
    config = write_cli_config(tmp_path / "cli.yaml", test_pki, policy_dir, client_id="{device_id}-*")
    # sensor-1 rotates onto a certificate that expires in 10 days; lab-1's key is in two places.
    short = test_pki.save("sensor-1-short", pki.issue_device(test_pki.ca, "sensor-1", TRUST_DOMAIN, days=10))
    assert main(["devices", "bind-cert", "sensor-1", str(short.cert), "-c", str(config)]) == 0
    broker = make_broker(client_id="{device_id}-*")
    rotated = Client(broker.port, "sensor-1-main", short, test_pki.ca_file)  # the bound certificate: admitted
    assert rotated.connect() == 0
    rotated.close()
    short_client = connect_to(broker, "dash-1", "dash-1-main")
    connect_to(broker, "lab-1", "lab-1-a")
    connect_to(broker, "lab-1", "lab-1-b")
    short_client.close()
    broker.stop()

    def report(*argv: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main(["report", *argv, "-c", str(config)])
        return code, capsys.readouterr().out

    code, out = report("expiring", "--days", "30", "--format", "json", "--fail-over", "0")
    rows = json.loads(out)
    assert code == 1 and [(r["device_id"], r["fingerprint"]) for r in rows] == [("sensor-1", short.fingerprint)]
    assert rows[0]["days_left"] <= 10 and rows[0]["last_seen"] is not None  # presented by the device
    assert report("expiring", "--days", "5", "--format", "json")[1].strip() == "[]"

    code, out = report("unseen", "--format", "csv", "--fail-over", "100")
    unseen = {row["device_id"] for row in csv.DictReader(io.StringIO(out))}
    assert code == 0 and "sensor-2" in unseen and not unseen & {"sensor-1", "dash-1", "lab-1"}
    assert "suspended-1" not in unseen  # only active devices are findings

    unbound = {r["device_id"] for r in json.loads(report("unbound", "--format", "json")[1])}
    assert "dash-1" in unbound and not unbound & {"sensor-1", "bound-1"}

    code, out = report("shared", "--format", "json", "--fail-over", "0")
    [finding] = json.loads(out)
    assert code == 1 and finding["fingerprint"] == test_pki.device("lab-1").fingerprint
    assert finding["client_ids"] == ["lab-1-a", "lab-1-b"] and finding["shared_records"] == 1

    assert json.loads(report("untrusted", "--format", "json")[1]) == []  # the broker's CA still trusted
    replacement = tmp_path / "new-ca.pem"
    replacement.write_bytes(pki.make_ca("replacement CA").cert_pem())
    code, out = report("untrusted", "--ca", str(replacement), "--format", "json", "--fail-over", "2")
    assert code == 1 and {r["device_id"] for r in json.loads(out)} == {"sensor-1", "dash-1", "lab-1"}
    code, out = report("unseen")  # the table, for people
    assert code == 0 and out.splitlines()[0].split()[:2] == ["DEVICE_ID", "OWNER"]
