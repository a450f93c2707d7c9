"""Retention of the assertion store: the broker prunes old records once an hour when asked to."""

from __future__ import annotations

import asyncio
import logging
import time

from pdp.evidence.store import AssertionStore, CheckpointSigner

log = logging.getLogger("mqtt_pdp.retention")
PRUNE_INTERVAL = 3600.0


def prune_store(path: str, before: float, sign_checkpoint: CheckpointSigner | None = None) -> int:
    """Delete records older than ``before`` (epoch seconds); the chain keeps a checkpoint so verify still works
    (signed, when the broker signs its heads, so that verify can tell retention from deletion)."""
    store = AssertionStore(path)
    try:
        return store.prune(before, sign_checkpoint)
    finally:
        store.close()


async def prune_forever(path: str, days: float, interval: float = PRUNE_INTERVAL,
                        sign_checkpoint: CheckpointSigner | None = None) -> None:
    while True:
        try:
            removed = await asyncio.to_thread(prune_store, path, time.time() - days * 86400, sign_checkpoint)
            if removed:
                log.info("retention: pruned %d assertion records older than %g days", removed, days)
        except Exception:  # retention must never stop the broker; the next round tries again
            log.exception("pruning the assertion store failed")
        await asyncio.sleep(interval)
