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


class _StartupTraceback(logging.Filter):
    """Drops amqtt's "Broker startup failed" traceback: the CLI reports the cause in one line (a port in use
    printed 15 lines of amqtt internals first). Kept at debug level, where the whole story is wanted."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Broker startup failed" or logging.getLogger().isEnabledFor(logging.DEBUG)


async def serve(config: dict[str, Any]) -> None:
    broker = HardenedBroker(config)
    amqtt_log = logging.getLogger("amqtt.broker")
    quiet = _StartupTraceback()
    amqtt_log.addFilter(quiet)
    try:
        await broker.start()
    finally:
        amqtt_log.removeFilter(quiet)
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
