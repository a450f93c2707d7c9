"""A client's packets take effect in the order it sent them, up to the end of its connection.

amqtt handles each packet it reads in a task of its own. A DISCONNECT read right behind
PUBLISHes could be acted on first: the session ended, the publish tasks still running were
cancelled and messages already queued for routing were dropped. The same happened when a
connection ended (end of stream, a malformed packet) right behind them. mosquitto_pub and
many devices send CONNECT, PUBLISH and DISCONNECT back to back, so real messages were lost
whenever the loop was busy (in stock amqtt too).

``PublishTracker`` counts the PUBLISH handlers amqtt has started for one connection; the
framing guard awaits ``settled()`` before it hands amqtt a DISCONNECT or an end, and the
broker's message loop routes what they queued before it handles the disconnect.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from broker_plugin.amqtt_compat import BrokerProtocolHandler


class PublishTracker:
    def __init__(self, handler: BrokerProtocolHandler, bound: float) -> None:
        self.bound = bound  # seconds to wait at most (a handler cancelled before it ran never reports back)
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()
        original: Callable[[Any], Awaitable[None]] = handler.handle_publish
        # Counted when amqtt's reader calls it (synchronously, as it creates the task), not when the task starts.
        handler.handle_publish = lambda packet: self(original(packet))  # type: ignore[method-assign]

    async def _run(self, handling: Awaitable[None]) -> None:
        try:
            await handling
        finally:
            self._running -= 1
            if not self._running:
                self._idle.set()

    def __call__(self, handling: Awaitable[None]) -> Awaitable[None]:
        self._running += 1
        self._idle.clear()
        return self._run(handling)

    async def settled(self) -> None:
        """Return once every PUBLISH read so far has been handled (queued for routing), or after ``bound``."""
        if self._idle.is_set():
            return
        try:
            await asyncio.wait_for(self._idle.wait(), self.bound)
        except TimeoutError:
            pass
