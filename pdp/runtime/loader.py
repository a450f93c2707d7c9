"""The loader process: reads and parses changed policy, registry and CRL files away from the broker's interpreter.

Parsing 10,000 rules or re-reading a 10 MB registry is a few hundred milliseconds of pure Python. Run
in a thread of the broker, it shares the interpreter lock with message delivery, and every message
waits at each hand-over: message p99 during a reload was 10-14 times the idle p99. This process does
the reading and parsing (``parse_changes``, the same code a direct load runs) and sends what changed
against the version in force (``pdp.runtime.delta``); the broker applies it on its event loop in steps
of well under a millisecond (``run_in_steps``), builds the index the same way and swaps.

The process keeps the last version of each source it sent, so that the next delta is small. The broker
says which versions are in force with each request: a delta is computed against the kept version only
when it is the one in force, else against nothing. If the process dies or answers wrongly, the broker
loads that change itself (as before) and starts a new process for the next one.

Run by the broker as ``python -m pdp.runtime.loader``; frames on stdin/stdout (``pdp.pipes``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import sys
import time
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pdp.pipes import frame, read_frame, receive, send, send_raw
from pdp.runtime.decision_point import DecisionPoint, ParsedChange, PdpSettings, Snapshot, parse_changes
from pdp.runtime.delta import (applying_policy, applying_registry, frames, policy_delta, registry_delta)
from pdp.runtime.sources import FileSignature

log = logging.getLogger("mqtt_pdp.loader")
T = TypeVar("T")
STEP_BUDGET = 0.0001  # seconds of work between two hand-backs to the event loop
LOADER_NICENESS = 10
# A loader silent for this long is stuck (stopped, swapping): the change is then parsed in the broker. A
# revocation waits that long, so it is short: 10 s, or 5 times the slowest parse seen (the broker's own
# parse at start counts), whichever is longer: a whole 100,000-device registry takes 1-3 s.
MIN_REPLY_TIMEOUT = 10.0
REPLY_TIMEOUT_FACTOR = 5.0
IN_BROKER = object()  # no loader reply: parse this change in the broker


class LoaderError(Exception):
    """The loader process could not answer: the broker loads this change itself."""


@dataclass(frozen=True)
class Reply:
    """A loader's answer: what ``parse_changes`` found, with each changed source as a delta and its frames."""

    signature: FileSignature
    rejected: dict[str, str]
    seconds: float
    parts: list[tuple[str, Any, int]]  # source name, its delta (or whole version for a CRL), frames that follow
    blobs: list[bytes]  # the frames, still pickled: unpickled one step at a time


# -- the process ------------------------------------------------------------------------------------------


class LoaderState:
    """The loader process's memory: the settings and the last version of each source it parsed."""

    def __init__(self, settings: PdpSettings) -> None:
        self.settings = settings
        self.sources = settings.sources()
        self.versions: dict[str, Any] = {}
        first = parse_changes(settings, self.sources, (), None)
        if first is not None:
            self.versions.update(first.parts)

    def load(self, old: FileSignature, in_force: Mapping[str, str]) -> tuple[dict[str, Any] | None, list[bytes]]:
        change = parse_changes(self.settings, self.sources, old, self.versions.get("registry"))
        if change is None:
            return None, []
        parts: list[tuple[str, Any, int]] = []
        blobs: list[bytes] = []
        for name, version in change.parts.items():
            kept = self.versions.get(name)
            base = kept if kept is not None and getattr(kept, "revision", None) == in_force.get(name) else None
            items: list[Any] = []
            if name == "policy":
                delta, items = policy_delta(base, version, with_texts=self.settings.verify_with_casbin)
            elif name == "registry":
                delta, items = registry_delta(base, version)  # type: ignore[assignment]
            else:
                delta = version
            chunks = frames(items)
            parts.append((name, delta, len(chunks)))
            blobs += [pickle.dumps(chunk, protocol=pickle.HIGHEST_PROTOCOL) for chunk in chunks]
            self.versions[name] = version
        meta = {"signature": change.signature, "rejected": change.rejected, "seconds": change.seconds, "parts": parts}
        return meta, blobs


def main() -> int:
    # Ctrl-C reaches the whole process group; the broker ends this process (closing its stdin).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # expendable: if memory runs out, the kernel takes this process before the broker (it restarts it)
        Path("/proc/self/oom_score_adj").write_text("500")
    except OSError:
        pass
    # Background work: on a busy machine the broker and its clients come first (a parse that takes
    # a few hundred milliseconds alone may take longer; nothing waits on it but the change itself).
    try:
        os.nice(LOADER_NICENESS)
        if hasattr(os, "sched_setscheduler"):  # Linux: a CPU-bound batch job, never preempting on wake-up
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError:
        pass
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    try:
        settings = receive(inp)
    except EOFError:
        return 0
    state = LoaderState(settings)
    try:
        send(out, ("ready",))
        while True:
            try:
                old, in_force = receive(inp)
            except EOFError:
                return 0  # the broker is gone
            started = time.perf_counter()
            meta, blobs = state.load(old, in_force)
            if meta is not None:
                meta["seconds"] = time.perf_counter() - started
            send_raw(out, [pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL), *blobs])
    except BrokenPipeError:
        # The broker is gone (killed mid-parse). Python would report the pipe again when flushing at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


# -- the broker's side ------------------------------------------------------------------------------------


class LoaderProcess:
    """The broker's handle on its loader process; started again after it dies."""

    def __init__(self, settings: PdpSettings, slowest: float = 0.0) -> None:
        self.settings = settings
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.timeout_floor = MIN_REPLY_TIMEOUT
        self.slowest = slowest  # seconds: the longest parse seen, the broker's own at start included

    @property
    def reply_timeout(self) -> float:
        return max(self.timeout_floor, REPLY_TIMEOUT_FACTOR * self.slowest)

    async def _started(self) -> asyncio.subprocess.Process:
        if self.proc is not None and self.proc.returncode is None:
            return self.proc
        root = Path(__file__).resolve().parent.parent.parent
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        self.proc = await asyncio.create_subprocess_exec(
            # -P: never import from the working directory (code planted there would run as the broker).
            sys.executable, "-P", "-m", "pdp.runtime.loader", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env)
        self.starts += 1
        assert self.proc.stdin is not None
        self.proc.stdin.write(frame(self.settings))
        return self.proc

    async def start(self) -> None:
        """Start the process now, so that it has read the versions in force before the first change."""
        try:
            await self._started()
        except OSError as exc:  # tried again at the first change; loaded in the broker if it fails then too
            log.warning("the loader process did not start (%s); changes will be parsed in the broker", exc)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    async def load(self, old: FileSignature, in_force: Mapping[str, str]) -> Reply | None:
        """What changed since ``old``, or None if nothing did; LoaderError if the process failed."""
        started = time.perf_counter()
        try:
            reply = await asyncio.wait_for(self._exchange(old, in_force), self.reply_timeout)
        except asyncio.TimeoutError:
            await self.close(kill=True)
            raise LoaderError(f"no answer within {self.reply_timeout:.0f} s") from None
        except (EOFError, OSError, ConnectionError, pickle.UnpicklingError) as exc:
            await self.close(kill=True)
            raise LoaderError(f"{type(exc).__name__}: {exc}") from None
        self.slowest = max(self.slowest, time.perf_counter() - started)
        return reply

    async def _exchange(self, old: FileSignature, in_force: Mapping[str, str]) -> Reply | None:
        proc = await self._started()
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(frame((old, in_force)))
        await proc.stdin.drain()
        while True:
            message = pickle.loads(await read_frame(proc.stdout))
            if message != ("ready",):
                break
        if message is None:
            return None
        blobs = [await read_frame(proc.stdout) for _, _, count in message["parts"] for _ in range(count)]
        return Reply(message["signature"], message["rejected"], message["seconds"], message["parts"], blobs)

    async def close(self, kill: bool = False) -> None:
        """End the process: closing its stdin ends it; ``kill`` (a failed one) does not wait for that."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        if kill and proc.returncode is None:
            proc.kill()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


def applying(pdp: DecisionPoint, reply: Reply) -> Generator[None, None, Snapshot | bool | None]:
    """The next snapshot from a loader's reply, in steps: frames unpickled one at a time, deltas applied to
    the versions in force, the index built (DeltaMismatch if the reply does not fit them)."""
    blobs = iter(reply.blobs)

    def frames_of(count: int) -> Iterator[Any]:
        for _ in range(count):
            yield pickle.loads(next(blobs))

    parts: dict[str, Any] = {}
    replaced = None
    for name, delta, count in reply.parts:
        if name == "policy":
            before = pdp.snapshot.policy.rules
            parts[name] = yield from applying_policy(pdp.snapshot.policy, delta, frames_of(count))
            if delta.base is not None:
                replaced = (delta.start, delta.end, len(parts[name].rules) - (len(before) - delta.end))
        elif name == "registry":
            parts[name] = yield from applying_registry(pdp.snapshot.registry, delta, frames_of(count))
        else:
            parts[name] = delta
    return (yield from pdp.accept(ParsedChange(reply.signature, parts, reply.rejected, reply.seconds, replaced)))


async def run_in_steps(steps: Generator[None, None, T], budget: float = STEP_BUDGET, pause: float = 0.0) -> T:
    """Run a stepwise build on the event loop, handing back to it after ``budget`` seconds of steps (for
    ``pause`` seconds: background work that nothing waits on)."""
    deadline = time.perf_counter() + budget
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        if time.perf_counter() >= deadline:
            await asyncio.sleep(pause)
            deadline = time.perf_counter() + budget


if __name__ == "__main__":
    sys.exit(main())
