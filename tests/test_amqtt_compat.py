"""The hardened broker runs only on the amqtt it patches, and only with our plugin deciding access."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from broker_plugin import amqtt_compat
from broker_plugin.amqtt_compat import Broker, BrokerError
from broker_plugin.broker import HardenedBroker
from tests.support import TestPki, broker_config


def test_installed_amqtt_has_the_shape_we_patch() -> None:
    assert amqtt_compat.amqtt_shape_problems() == []


def test_another_amqtt_version_is_refused() -> None:
    assert amqtt_compat.amqtt_shape_problems("0.13.0") == [
        "amqtt 0.13.0 is installed, the hardened broker patches amqtt 0.12.1"]


def test_a_renamed_or_reshaped_private_method_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(Broker, "_publish_session_retained_messages")

    async def reshaped(self: Any, topic: str, flt: str, extra: int = 0) -> bool:
        return False

    monkeypatch.setattr(Broker, "_matches", reshaped)
    assert amqtt_compat.amqtt_shape_problems() == [
        "Broker._publish_session_retained_messages is missing",
        "Broker._matches takes ('self', 'topic', 'flt', 'extra'), expected ('self', 'topic', 'a_filter')",
    ]
    with pytest.raises(BrokerError, match="cannot run on this amqtt: Broker._publish_session_retained_messages"):
        amqtt_compat.check_amqtt()


def _construct(config: dict[str, Any]) -> None:
    async def build() -> None:
        HardenedBroker(config)

    asyncio.run(build())


def test_broker_refuses_other_auth_or_topic_plugins(test_pki: TestPki, policy_dir: Path) -> None:
    config = broker_config(test_pki, policy_dir, assertions=False)
    _construct(config)  # positive control: the same config without the foreign plugin builds
    for extra in ("amqtt.plugins.authentication.AnonymousAuthPlugin", "amqtt.plugins.topic_checking.TopicTabooPlugin"):
        foreign = broker_config(test_pki, policy_dir, assertions=False)
        foreign["plugins"][extra] = {}
        with pytest.raises(BrokerError, match=f"remove these auth/topic plugins: {extra.rsplit('.', 1)[1]}"):
            _construct(foreign)


def test_broker_refuses_to_run_without_our_plugin(test_pki: TestPki, policy_dir: Path) -> None:
    config = broker_config(test_pki, policy_dir, assertions=False)
    config["plugins"] = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
    with pytest.raises(BrokerError, match="needs exactly one broker_plugin.plugin.DeviceAuthorizationPlugin"):
        _construct(config)


def test_only_broker_plugin_imports_amqtt() -> None:
    root = Path(__file__).resolve().parent.parent
    importers = sorted(
        str(path.relative_to(root)) for folder in ("pdp", "bench", "tests") for path in (root / folder).rglob("*.py")
        if "import amqtt" in path.read_text() or "from amqtt" in path.read_text()
    )
    assert importers == ["tests/test_amqtt_compat.py"]  # this test's own search strings
    inside = sorted(
        path.name for path in (root / "broker_plugin").rglob("*.py")
        if "from amqtt" in path.read_text() or "import amqtt" in path.read_text()
    )
    assert inside == ["amqtt_compat.py"]
