"""Running the hardened broker until SIGINT or SIGTERM: what `mqtt-pdp broker` does."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from broker_plugin.amqtt_compat import BROKER_ERRORS
from broker_plugin.broker import HardenedBroker

log = logging.getLogger("mqtt_pdp.cli")


class BrokerFailed(Exception):
    """The broker could not start or stopped with an error; ``str()`` is one line for the user."""


async def serve(config: dict[str, Any]) -> None:
    broker = HardenedBroker(config)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    for name, server in broker._servers.items():
        for sock in getattr(server.instance, "sockets", []) or []:
            log.info("listener %s on %s", name, sock.getsockname()[:2])
    await stop.wait()
    log.info("shutting down")
    await broker.shutdown()


def run_broker(config: dict[str, Any]) -> None:
    try:
        asyncio.run(serve(config))
    except (*BROKER_ERRORS, OSError, ValueError) as exc:
        raise BrokerFailed(str(exc.__cause__ or exc)) from None
