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
        # Shapes an outside attack wrote to stop every broker: a number where a time is, a list, NaN, an
        # integer fingerprint, deep nesting. Each must cost only its own device.
        poison = {"broken-2": '["sensor","a","t","o","active",[],[["' + "ab" * 32 + '",12345,"","",null]]]',
                  "broken-3": '["sensor","a","t","o","active",[],[["' + "ab" * 32 + '",[1],"","",NaN]]]',
                  "broken-4": '["sensor","a","t","o","active",[1],[]]',
                  "broken-5": "[" * 5000 + "]" * 5000}
        for device_id, text in poison.items():
            store.client.hset(keys(redis_prefix)[0], device_id, text)
        loaded = store.load()
        assert dict(loaded.devices) == dict(registry.devices) and loaded.revision == "r1"
        for device_id in ("broken-1", *poison):
            assert f"device '{device_id}' left out" in caplog.text  # refused, not loaded, nothing else lost
        for device_id in ("broken-1", *poison):
            store.client.hdel(keys(redis_prefix)[0], device_id)
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


def test_the_follower_survives_a_poisoned_registry_and_applies_the_next_change(shared_redis_url, redis_prefix):
    """Found by an outside attack: one malformed entry (or a non-integer revision counter) killed every broker's
    follower task, so no later change, suspensions included, was ever applied."""
    import asyncio

    from pdp.runtime.registry_follower import RegistryFollower

    registry = parse_registry(registry_yaml(DEVICES), "devices.yaml")
    store = RedisRegistryStore(shared_redis_url, redis_prefix)
    devices_key, revision_key, channel = keys(redis_prefix)
    applied: list[tuple[int, str]] = []

    async def scenario() -> None:
        current = {"registry": store.load()}

        async def apply(new, revision: int) -> bool:
            applied.append((revision, new.devices["sensor-1"].status if "sensor-1" in new.devices else "-"))
            current["registry"] = new
            return True

        follower = RegistryFollower(shared_redis_url, redis_prefix, 1, lambda: current["registry"], apply,
                                    check_interval=0.1)
        task = asyncio.create_task(follower.run())
        try:
            await asyncio.wait_for(follower.subscribed.wait(), 10)
            store.client.hset(devices_key, "sensor-1", '["sensor","a","t","o","active",[],[["ab",12345,"","",1]]]')
            store.client.set(revision_key, "not-a-number")
            store.client.publish(channel, json.dumps({"ids": ["sensor-1"], "revision": 2}))
            await asyncio.sleep(0.5)
            assert not task.done(), "the follower died"
            store.client.set(revision_key, 2)
            assert store.put([lifecycle.change_status(registry.devices["sensor-1"], "suspend")]) == 3
            for _ in range(100):
                if applied and applied[-1] == (3, "suspended"):
                    break
                await asyncio.sleep(0.05)
            assert applied[-1] == (3, "suspended"), applied
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await follower.close()

    try:
        assert store.replace_all(registry.devices.values()) == 1
        asyncio.run(scenario())
    finally:
        store.client.delete(devices_key, revision_key)
        store.close()


def test_import_cannot_bring_back_a_retired_device(tmp_path, test_pki, policy_dir, shared_redis_url, redis_prefix,
                                                   capsys):
    """Found by an outside attack: export, edit a retired device to active, import: it was active again, with
    nothing in the record naming it. Retirement is final everywhere."""
    config = write_cli_config(tmp_path / "a.yaml", test_pki, policy_dir, registry=shared_redis_url,
                              redis_prefix=redis_prefix, reload_interval=3600)
    retired = tmp_path / "retired.yaml"
    retired.write_text(registry_yaml([d if d[0] != "sensor-1" else (*d[:3], "retired") for d in DEVICES]))
    revived = tmp_path / "revived.yaml"
    revived.write_text(registry_yaml(DEVICES))
    try:
        assert main(["devices", "import", str(retired), "-c", str(config)]) == 0
        capsys.readouterr()
        assert main(["devices", "import", str(revived), "-c", str(config)]) == 2
        assert "bring back retired device(s) sensor-1" in capsys.readouterr().err
        store = RedisRegistryStore(shared_redis_url, redis_prefix)
        try:
            assert store.get(["sensor-1"])["sensor-1"].status == "retired"
        finally:
            store.close()
    finally:
        redis.Redis.from_url(shared_redis_url).delete(*keys(redis_prefix)[:2])
