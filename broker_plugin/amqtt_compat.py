"""Every use of amqtt, in one place, with a start-up check that amqtt still has the shape we patch.

The hardened broker overrides private methods of ``amqtt.broker.Broker`` and
reads private state (sessions, subscriptions, retained messages). A new amqtt
could rename or reshape any of them without a crash, silently removing a
security property; ``check_amqtt`` refuses to start the broker unless the
version is the pinned one *and* every private member we touch exists with the
parameters we expect. Nothing outside ``broker_plugin`` imports amqtt.
"""

from __future__ import annotations

import asyncio

import inspect
from importlib.metadata import version

from amqtt.adapters import (
    ReaderAdapter,
    StreamReaderAdapter,
    StreamWriterAdapter,
    WriterAdapter,
)
from amqtt.broker import Broker, RetainedApplicationMessage, Server
from amqtt.contexts import Action, ListenerConfig, ListenerType
from amqtt.errors import (
    AMQTTError,
    BrokerError,
    MQTTError,
    NoDataError,
    PluginError,
    PluginLoadError,
)
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import INCOMING, OutgoingApplicationMessage, Session
from amqtt.utils import format_client_message, gen_client_id
from transitions import MachineError

__all__ = [
    "AMQTT_VERSION",
    "BROKER_ERRORS",
    "NOT_AUTHORIZED",
    "QOS_1",
    "QOS_2",
    "AMQTTError",
    "Action",
    "BaseAuthPlugin",
    "BaseTopicPlugin",
    "Broker",
    "BrokerError",
    "BrokerEvents",
    "BrokerProtocolHandler",
    "ConnackPacket",
    "DisconnectPacket",
    "INCOMING",
    "ListenerConfig",
    "ListenerType",
    "MQTTError",
    "MachineError",
    "NoDataError",
    "OutgoingApplicationMessage",
    "PluginError",
    "PluginLoadError",
    "PubackPacket",
    "PubcompPacket",
    "PublishPacket",
    "PubrecPacket",
    "PubrelPacket",
    "ReaderAdapter",
    "RetainedApplicationMessage",
    "Server",
    "Session",
    "StreamReaderAdapter",
    "stream_of",
    "StreamWriterAdapter",
    "WriterAdapter",
    "abort_connection",
    "abort_writer",
    "check_amqtt",
    "format_client_message",
    "gen_client_id",
]

AMQTT_VERSION = "0.12.1"
# What `mqtt-pdp broker` reports as one line instead of a traceback.
BROKER_ERRORS = (AMQTTError, BrokerError, PluginError, PluginLoadError)

# Private methods of Broker we override or call, with the parameter names our code relies on.
BROKER_METHODS: dict[str, tuple[str, ...]] = {
    "_create_ssl_context": ("listener",),
    "_client_connected": ("self", "listener_name", "reader", "writer"),
    "_create_server_instance": ("self", "listener_name", "listener_type", "address", "port", "ssl_context"),
    "stream_connected": ("self", "reader", "writer", "listener_name"),
    "_initialize_client_session": ("self", "reader", "writer", "remote_address", "remote_port"),
    "_handle_client_session": ("self", "reader", "writer", "client_session", "handler", "server", "listener_name"),
    "_client_message_loop": ("self", "client_session", "handler"),
    "_authenticate": ("self", "session", "_"),
    "_topic_filtering": ("self", "session", "topic", "action"),
    "_handle_disconnect": ("self", "client_session", "handler", "disconnect_waiter"),
    "_handle_subscription": ("self", "client_session", "handler", "subscribe_waiter"),
    "_handle_unsubscription": ("self", "client_session", "handler", "unsubscribe_waiter"),
    "_handle_message_delivery": ("self", "client_session", "handler", "wait_deliver"),
    "_publish_retained_messages_for_subscription": ("self", "subscription", "session"),
    "_publish_session_retained_messages": ("self", "session"),
    "add_subscription": ("self", "subscription", "session"),
    "_del_subscription": ("self", "a_filter", "session"),
    "_del_all_subscriptions": ("self", "session"),
    "_run_broadcast": ("self", "running_tasks"),
    "_retain_broadcast_message": ("self", "broadcast", "qos", "target_session"),
    "_stop_handler": ("self", "handler"),
    "_cleanup_session": ("self", "client_id"),
    "_delete_session": ("self", "client_id"),
    "_get_handler": ("self", "session"),
    "_matches": ("self", "topic", "a_filter"),
    "retain_message": ("self", "source_session", "topic_name", "data", "qos"),
}
# Private state of a Broker instance we read or change.
BROKER_STATE = ("_sessions", "_subscriptions", "_retained_messages", "_broadcast_queue", "_servers",
                "plugins_manager", "listeners_config", "config")
HANDLER_METHODS = ("init_from_connect", "attach", "mqtt_connack_authorize", "start", "stop", "mqtt_publish",
                   "handle_connection_closed", "wait_disconnect", "get_next_pending_subscription",
                   "get_next_pending_unsubscription", "mqtt_deliver_next_message", "handle_publish", "_send_packet",
                   "_retry_deliveries", "_handle_qos1_message_flow")
# The acknowledgement waiters amqtt's reader completes, which the per-session sender (delivery.py) registers.
HANDLER_STATE = ("_puback_waiters", "_pubrec_waiters", "_pubcomp_waiters")
SESSION_FIELDS = ("inflight_out", "next_packet_id", "client_id", "clean_session", "will_flag", "will_message",
                  "will_topic", "will_qos",
                  "will_retain", "keep_alive", "username", "password", "remote_address", "remote_port",
                  "ssl_object", "attributes", "retained_messages", "transitions", "parent", "is_anonymous",
                  "delivered_message_queue")
RETAINED_FIELDS = ("source_session", "topic", "data", "qos")
# The listener's connection accounting, which the hardened broker does itself (refusing, not queueing, when full).
SERVER_METHODS = ("acquire_connection", "release_connection")
SERVER_STATE = ("semaphore", "conn_count", "max_connections", "instance")


def amqtt_shape_problems(installed_version: str | None = None) -> list[str]:
    """Every way the installed amqtt differs from what the hardened broker patches; empty when it matches."""
    problems = []
    installed = installed_version or version("amqtt")
    if installed != AMQTT_VERSION:
        problems.append(f"amqtt {installed} is installed, the hardened broker patches amqtt {AMQTT_VERSION}")
    for name, expected in BROKER_METHODS.items():
        member = getattr(Broker, name, None)
        if member is None or not callable(member):
            problems.append(f"Broker.{name} is missing")
            continue
        params = tuple(inspect.signature(member).parameters)
        if params != expected:
            problems.append(f"Broker.{name} takes {params}, expected {expected}")
    init_source = inspect.getsource(Broker.__init__)
    for name in BROKER_STATE:
        if f"self.{name}" not in init_source and not hasattr(Broker, name):
            problems.append(f"Broker no longer sets {name}")
    for name in HANDLER_METHODS:
        if not callable(getattr(BrokerProtocolHandler, name, None)):
            problems.append(f"BrokerProtocolHandler.{name} is missing")
    handler_init = inspect.getsource(inspect.getmro(BrokerProtocolHandler)[1].__init__)
    for name in HANDLER_STATE:
        if f"self.{name}" not in handler_init:
            problems.append(f"ProtocolHandler no longer sets {name}")
    if "self._writer" not in inspect.getsource(StreamWriterAdapter.__init__):
        problems.append("StreamWriterAdapter no longer keeps the asyncio writer as _writer")
    for name in SERVER_METHODS:
        if not callable(getattr(Server, name, None)):
            problems.append(f"Server.{name} is missing")
    server_init = inspect.getsource(Server.__init__)
    for name in SERVER_STATE:
        if f"self.{name}" not in server_init:
            problems.append(f"Server no longer sets {name}")
    session = Session()
    for name in SESSION_FIELDS:
        if not hasattr(session, name):
            problems.append(f"Session has no {name}")
    retained = RetainedApplicationMessage(None, "t", b"x", 0)
    for name in RETAINED_FIELDS:
        if not hasattr(retained, name):
            problems.append(f"RetainedApplicationMessage has no {name}")
    return problems


def abort_connection(handler: BrokerProtocolHandler) -> bool:
    """Drop a handler's connection at once: no drain, no TLS close_notify, nothing left to await.

    amqtt's own close drains first (a peer that does not read blocks it) and its
    handler stop waits for a reader task whose cancellation Python 3.11 can lose
    under traffic; a revoked connection must end regardless. False when the
    transport is not a TCP stream (then the caller falls back to amqtt's stop).
    """
    return abort_writer(getattr(handler, "writer", None))


def abort_writer(writer: WriterAdapter | None) -> bool:
    """``abort_connection`` for a connection that has no handler yet (before or during CONNECT)."""
    stream = getattr(writer, "_writer", None) if isinstance(writer, StreamWriterAdapter) else None
    transport = getattr(stream, "transport", None)
    if transport is None:
        return False
    writer.is_closed = True  # type: ignore[union-attr]
    transport.abort()
    return True


def stream_of(reader: ReaderAdapter) -> asyncio.StreamReader | None:
    """The asyncio stream under amqtt's TCP reader adapter (None for other transports)."""
    stream = getattr(reader, "_reader", None) if isinstance(reader, StreamReaderAdapter) else None
    return stream if isinstance(stream, asyncio.StreamReader) else None


def check_amqtt() -> None:
    """Refuse to run the hardened broker on an amqtt whose internals are not the ones we patch."""
    problems = amqtt_shape_problems()
    if problems:
        raise BrokerError("HardenedBroker cannot run on this amqtt: " + "; ".join(problems))
