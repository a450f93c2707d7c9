"""Gateway identity translation: a gateway device publishing for the legacy devices behind it.

A child device without a certificate is registered with ``gateway: <gateway id>``. The
gateway publishes ``gw/<child id>/<topic>``; the broker delivers it as ``<topic>`` from
the child. Allowed only when all hold, so the gateway never gains a right through a
child and a child never gains one through its gateway:

* the gateway's own rules allow publishing the wire topic ``gw/<child id>/<topic>``
  (operators bound what a gateway may relay, e.g. to ``gw/+/sites/{location}/#``);
* the child is registered with this gateway and is active;
* the child's rules allow publishing ``<topic>``.

The other direction is the same with subscribe and receive: the gateway subscribes
``gw/<child id>/<filter>``; a message on a topic the filter matches is delivered to it as
``gw/<child id>/<topic>``, when its own rules grant the wire filter and wire topic and the
child's rules grant ``<filter>`` and ``<topic>``.

Pure: the caller passes both devices and the decision function.
"""

from __future__ import annotations

from collections.abc import Callable

from pdp.core.engine import Decision
from pdp.registry.device import Device

PREFIX = "gw/"


def split(topic: str) -> tuple[str, str] | None:
    """(child id, inner topic) of a gateway wire topic, or None when the topic is not one."""
    if not topic.startswith(PREFIX):
        return None
    child_id, sep, inner = topic[len(PREFIX):].partition("/")
    if not sep or not child_id or not inner:
        return None
    return child_id, inner


def child_decision(gateway: Device, child_id: str, child: Device | None, inner: str,
                   decide: Callable[[Device, str, str], Decision], action: str = "publish") -> Decision:
    """The child's side of a relayed publish, subscribe or receive; the gateway's own decision on the wire
    topic or filter is taken apart."""
    if child is None:
        return Decision(False, None, f"gateway {gateway.device_id}: unknown child device {child_id!r}")
    if child.gateway != gateway.device_id:
        return Decision(False, None, f"{gateway.device_id} is not the gateway of {child_id}")
    if child.status != "active":
        return Decision(False, None, f"child device {child_id} {child.status}")
    if action == "publish" and inner.startswith("$"):
        return Decision(False, None, "topics starting with '$' are reserved for the broker [MQTT-4.7.2-1]")
    decision = decide(child, action, inner)
    return Decision(decision.allowed, decision.rule_id, f"for child {child_id} ({inner}): {decision.reason}")
