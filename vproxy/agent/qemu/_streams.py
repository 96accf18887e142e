"""Small helpers shared by the channel kinds: codes, option parsing, stream etiquette
and copying bytes between a stream and a non-blocking socket."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, AsyncIterator, Dict, Mapping, Optional

from vproxy.errors import ChannelRefused, SessionClosed, StreamResetError
from vproxy.mux import MAX_PAYLOAD, RefuseCode, ResetCode
from vproxy.net.tasks import Nursery

log = logging.getLogger("vproxy.qemu")

#: Bytes moved per read between a QEMU socket (or a console's ring) and a stream: one
#: mux frame's payload, so that every stream write is one DATA frame. Deliberately not
#: the client's BULK_CHUNK (vproxy.client.forward, 256 KiB, one program's bulk
#: traffic): the agent copies for many streams and viewers at once, and a console
#: drains its chardev synchronously in steps of this size, so small steps let every
#: stream and viewer move in turn.
FRAME_CHUNK = MAX_PAYLOAD

#: What a stream's read/write raise when the stream or the session is over.
STREAM_ERRORS = (StreamResetError, SessionClosed, ConnectionError)

__all__ = ["RefuseCode", "ResetCode", "FRAME_CHUNK", "STREAM_ERRORS", "refuse", "int_option",
           "safe_notify", "safe_reset", "safe_close", "copy_socket_to_stream", "socket_chunks", "ended_with"]


def refuse(code: int, message: str) -> ChannelRefused:
    return ChannelRefused(code, message)


def int_option(options: Mapping[str, str], name: str) -> Optional[int]:
    """A non-negative integer option, None if absent; BAD_REQUEST if malformed."""
    value = options.get(name)
    if value is None or value == "":
        return None
    try:
        n = int(value, 10)
    except ValueError:
        n = -1
    if n < 0:
        raise refuse(RefuseCode.BAD_REQUEST,
                     "option %s=%r is not a non-negative integer" % (name, value))
    return n


def safe_notify(stream: Any, fields: Dict[str, str]) -> None:
    try:
        stream.notify(fields)
    except Exception:  # the stream is already over: nothing to tell
        pass


def safe_reset(stream: Any, code: int, message: str) -> None:
    try:
        stream.reset(code, message)
    except Exception:
        pass


async def safe_close(stream: Any) -> None:
    try:
        await stream.close()
    except Exception:
        pass


async def socket_chunks(sock: socket.socket) -> AsyncIterator[bytes]:
    """What QEMU writes to the agent's end of a chardev socket, a frame's worth at a
    time, until EOF; an error on the socket (QEMU went away) is an EOF too."""
    loop = asyncio.get_event_loop()
    while True:
        try:
            data = await loop.sock_recv(sock, FRAME_CHUNK)
        except OSError:
            return
        if not data:
            return
        yield data


async def copy_socket_to_stream(sock: socket.socket, stream: Any) -> str:
    """Copy until EOF on *sock*: "eof" then, "error" if the stream broke first (an end
    like any other for a pump in a Nursery, not an error that would cancel its sibling
    before the channel has looked)."""
    async for data in socket_chunks(sock):
        try:
            await stream.write(data)
        except STREAM_ERRORS:
            return "error"
    return "eof"


def ended_with(task: "asyncio.Task[str]", outcome: str) -> bool:
    """Has this pump task ended by itself (not cancelled, not failed), returning *outcome*?"""
    return (task.done() and not task.cancelled() and task.exception() is None
            and task.result() == outcome)


class GoneOnQemuExit:
    """For channels that copy between a stream and a QEMU socket in a Nursery: when
    QEMU goes away, reset the stream (CHANNEL_GONE, with the reason) and stop the
    copying. Subclasses set _stream, _gone_reason and _children (the Nursery, while
    run() copies) in __init__."""

    _stream: Any
    _gone_reason: str
    _children: Optional[Nursery]

    def _adopt(self, stream: Any) -> bool:
        """run()'s first step: take *stream*; False (the stream reset, CHANNEL_GONE) if
        QEMU went away before the channel ran."""
        self._stream = stream
        if self._gone_reason:
            safe_reset(stream, ResetCode.CHANNEL_GONE, self._gone_reason)
            return False
        return True

    def gone(self, reason: str) -> None:
        if self._gone_reason:
            return
        self._gone_reason = reason
        if self._stream is not None:
            safe_reset(self._stream, ResetCode.CHANNEL_GONE, reason)
        if self._children is not None:
            self._children.cancel()
