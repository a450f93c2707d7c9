"""Frames between the broker and its helper processes (assertion writer, loader): a 4-byte length, then bytes.

The processes are the broker's own children, started from this package; what they send is trusted as much
as the broker's own memory, so the payloads are pickles.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from typing import IO, Any

LENGTH = struct.Struct("!I")


def send(stream: IO[bytes], message: Any) -> None:
    send_raw(stream, [pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)])


def send_raw(stream: IO[bytes], blobs: list[bytes]) -> None:
    stream.write(b"".join(part for blob in blobs for part in (LENGTH.pack(len(blob)), blob)))
    stream.flush()


def receive(stream: IO[bytes]) -> Any:
    return pickle.loads(receive_raw(stream))


def receive_raw(stream: IO[bytes]) -> bytes:
    header = stream.read(LENGTH.size)
    if len(header) < LENGTH.size:
        raise EOFError("pipe closed")
    (size,) = LENGTH.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("pipe closed mid-frame")
    return data


async def read_frame(stream: asyncio.StreamReader) -> bytes:
    """One frame's bytes; EOFError when the pipe closes (the process ended)."""
    try:
        (size,) = LENGTH.unpack(await stream.readexactly(LENGTH.size))
        return await stream.readexactly(size)
    except asyncio.IncompleteReadError:
        raise EOFError("pipe closed") from None


def frame(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return LENGTH.pack(len(data)) + data
