"""A broker in its own process, so that its CPU time can be measured apart from the load generator.

Usage: python -m bench.broker_proc MODE CONFIG_JSON ; prints "READY <port>" and runs until stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

from broker_plugin.amqtt_compat import Broker

from broker_plugin.broker import HardenedBroker


async def main(mode: str, config_path: str) -> None:
    with open(config_path) as handle:
        config = json.load(handle)
    broker = (HardenedBroker if mode.startswith("ours") else Broker)(config)
    await broker.start()
    port = broker._servers["default"].instance.sockets[0].getsockname()[1]
    print(f"READY {port}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    await broker.shutdown()


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(main(sys.argv[1], sys.argv[2]))
