"""The Redis registry: two broker processes follow one real Redis; a suspension on either reaches both."""

from __future__ import annotations

import json

import redis

from pdp.cli.main import main
from pdp.registry import lifecycle
from pdp.registry.file import parse_registry
from pdp.registry.redis_registry import RedisRegistryStore, decode, encode, keys
from tests.conftest import DEVICES, registry_yaml
from tests.support import BrokerProcess, Client, write_cli_config


def test_codec_round_trip_and_malformed_entries_are_left_out(shared_redis_url, redis_prefix, caplog):
    registry = parse_registry(registry_yaml(DEVICES, {"sensor-1": "ab" * 32}), "devices.yaml")
    for device in registry.devices.values():
        assert decode(device.device_id, encode(device), {}) == device
    store = RedisRegistryStore(shared_redis_url, redis_prefix)
    try:
        assert store.replace_all(registry.devices.values()) == 1
        store.client.hset(keys(redis_prefix)[0], "broken-1", '["sensor","a/b","t","o","active",[],[]]')
        loaded = store.load()
        assert dict(loaded.devices) == dict(registry.devices) and loaded.revision == "r1"
        assert "device 'broken-1' left out" in caplog.text  # a '/' in an attribute: refused, not loaded
        suspended = lifecycle.change_status(registry.devices["sensor-1"], "suspend")
        assert store.put([suspended]) == 2
        assert store.get(["sensor-1", "nobody"]) == {"sensor-1": suspended, "nobody": None}
    finally:
        store.close()


def test_a_suspension_reaches_a_live_session_on_another_broker(tmp_path, test_pki, policy_dir, shared_redis_url,
                                                               redis_prefix, capsys):
    common = dict(registry=shared_redis_url, redis_prefix=redis_prefix, reload_interval=3600)
    first_config = write_cli_config(tmp_path / "a.yaml", test_pki, policy_dir, **common)
    assert main(["devices", "import", str(policy_dir / "devices.yaml"), "-c", str(first_config)]) == 0
    first = BrokerProcess(first_config, tmp_path)
    second = BrokerProcess(write_cli_config(tmp_path / "b.yaml", test_pki, policy_dir, **common), tmp_path)
    clients: list[Client] = []
    try:
        for broker in (first, second):
            client = Client(broker.port, "sensor-2", test_pki.device("sensor-2"), test_pki.ca_file)
            clients.append(client)
            assert client.connect() == 0
        sensor = Client(second.port, "sensor-1", test_pki.device("sensor-1"), test_pki.ca_file)
        clients.append(sensor)
        assert sensor.connect() == 0
        # The administrator changes the registry in Redis; neither broker polls a file (reload_interval 1 h).
        assert main(["devices", "suspend", "sensor-1", "-c", str(first_config), "--reason", "INC-5"]) == 0
        assert sensor.wait_disconnected(), "the second broker kept the suspended device's session"
        second.wait_line(r"session revoked: client=sensor-1 device=sensor-1 reason=device suspended")
        assert not clients[0].disconnected.is_set() and not clients[1].disconnected.is_set()
        refused = Client(first.port, "sensor-1", test_pki.device("sensor-1"), test_pki.ca_file)
        clients.append(refused)
        assert refused.connect() == 5  # the first broker has the change too
        capsys.readouterr()
        assert main(["devices", "show", "sensor-1", "-c", str(first_config), "--format", "json"]) == 0
        assert json.loads(capsys.readouterr().out)["device"]["status"] == "suspended"
        exported = tmp_path / "exported.yaml"
        assert main(["devices", "export", str(exported), "-c", str(first_config)]) == 0
        assert parse_registry(exported.read_text(), str(exported)).devices["sensor-1"].status == "suspended"
    finally:
        for client in clients:
            client.close()
        first.stop()
        second.stop()
    assert int(redis.Redis.from_url(shared_redis_url).get(keys(redis_prefix)[1])) == 2  # import, suspend
