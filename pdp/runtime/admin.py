"""The local admin interface of a running broker: one JSON request line in, one JSON answer line out.

A Unix socket rather than a TCP port, so that devices (which reach the broker only over the network) can
never reach it, and so that access control is the operating system's: the socket file is mode 0600 in a
directory the broker creates 0700, and every connection is checked again by its peer credentials
(SO_PEERCRED: only the broker's own user or root). The same credentials name the operator in the
evidence when a command changes something (``kick``).

The protocol is deliberately small: ``{"command": "status", ...arguments}`` ->
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "one line"}``; the connection then closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import pwd
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("mqtt_pdp.admin")

MAX_REQUEST = 65_536  # bytes in one request line
REQUEST_TIMEOUT = 5.0  # seconds a client has to send its request line


class AdminError(Exception):
    """One line for the operator."""


@dataclass(frozen=True)
class Operator:
    """Who is on the other end of the socket, as the kernel says (not as the client claims)."""

    pid: int
    uid: int
    gid: int

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return f"uid {self.uid}"


Handler = Callable[[Mapping[str, Any], Operator], Awaitable[Any]]


def peer_credentials(sock: socket.socket) -> Operator:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return Operator(pid, uid, gid)


def _prepare(path: Path) -> None:
    """A stale socket of a broker that died is replaced; a live one, or anything that is not a socket, is not."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise AdminError(f"admin_socket {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise AdminError(f"admin_socket {path}: {exc.strerror or exc}") from None
        path.unlink()
    else:
        raise AdminError(f"admin_socket {path} is in use by another running broker")
    finally:
        probe.close()


class AdminServer:
    def __init__(self, path: str, handlers: Mapping[str, Handler]) -> None:
        self.path = Path(path)
        self.handlers = dict(handlers)
        self._server: asyncio.AbstractServer | None = None
        self.requests = 0

    async def start(self) -> None:
        _prepare(self.path)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_REQUEST)
        os.chmod(self.path, 0o600)  # connections before this are still checked by their credentials
        log.info("admin interface on %s", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            answer = await self._answer(reader, writer)
            writer.write(json.dumps(answer, separators=(",", ":"), default=str).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict[str, Any]:
        operator = peer_credentials(writer.get_extra_info("socket"))
        if operator.uid not in (0, os.geteuid()):
            log.warning("admin request from uid %d (pid %d) refused", operator.uid, operator.pid)
            return {"ok": False, "error": "permission denied: only the broker's user or root may use this socket"}
        try:
            line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
            request = json.loads(line)
        except (ValueError, asyncio.LimitOverrunError, asyncio.TimeoutError):
            return {"ok": False, "error": "request must be one JSON object on one line"}
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return {"ok": False, "error": "request must be a JSON object with a 'command'"}
        handler = self.handlers.get(request["command"])
        if handler is None:
            return {"ok": False, "error": f"unknown command {request['command']!r} "
                                          f"(known: {', '.join(sorted(self.handlers))})"}
        self.requests += 1
        try:
            return {"ok": True, "result": await handler(request, operator)}
        except AdminError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug in a command must not take the broker's admin interface down
            log.exception("admin command %s failed", request["command"])
            return {"ok": False, "error": f"{request['command']} failed: {exc!r}"}


def request(path: str, command: str, timeout: float = 10.0, **arguments: Any) -> Any:
    """The client side, for the CLI: the result, or AdminError with one line."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise AdminError(f"no broker is listening on {path} (is it running, with admin_socket set to this path?)") from None
        except PermissionError:
            raise AdminError(f"{path}: permission denied (run as the broker's user or root)") from None
        except OSError as exc:
            raise AdminError(f"{path}: {exc.strerror or exc}") from None
        sock.sendall(json.dumps({"command": command, **arguments}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        raise AdminError(f"{path}: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise AdminError(f"{path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        answer = json.loads(data)
    except ValueError:
        raise AdminError(f"{path}: not an mqtt-pdp admin socket (unreadable answer)") from None
    if not answer.get("ok"):
        raise AdminError(str(answer.get("error")))
    return answer.get("result")
