"""Local listeners whose connections each become one vproxy stream (`vproxy forward`, `vproxy vnc`).

Rules kept here:
- One local connection is one stream, opened when the connection arrives; the agent's
  refusal is reported with its message and the local connection is closed.
- Bytes flow both ways at once, each direction with backpressure: the stream's credit
  limits what we read from the local socket, the local socket's buffer limits what we
  read from the stream.
- Half-close passes through both ways: EOF from the local peer half-closes the stream
  (the agent's side keeps sending), the stream's EOF shuts the local socket's write side
  (the local peer keeps sending). The connection ends when both directions have.
- A failure resets the other side: a broken local connection resets the stream
  (CANCEL, with the reason), a reset stream or a lost session resets the local TCP
  connection (RST, so the local program sees an error, not a clean end).
- Listening beyond the loopback interface is refused unless the caller says it is
  meant (`unsafe=True`, the CLI's --unsafe-listen), as ghostunnel does: whoever reaches
  the port gets the channel with *your* certificate's rights. A unix socket is created
  with mode 0600 (only its owner may connect).

No click here: messages for the user go through the `report` callback.
"""

import asyncio
import logging
import os
import socket
import struct
from typing import Awaitable, Callable, Optional, Set

from vproxy.errors import ChannelRefused, SessionClosed, StreamResetError, UserError
from vproxy.mux import ResetCode
from vproxy.net.address import ListenAddress, format_sockname, unix_listener
from vproxy.net.session import Stream
from vproxy.net.tasks import Nursery

log = logging.getLogger("vproxy.forward")

#: Bytes moved per read, each way: a new stream's whole credit (the mux's initial
#: window, 256 KiB) in one read, for one local program's bulk traffic (scp, a backup);
#: raised from 64 KiB for that. Deliberately not the agent's FRAME_CHUNK
#: (vproxy.agent.qemu._streams, one frame), which shares the agent among many streams.
BULK_CHUNK = 256 * 1024
LOCAL_BUFFER = 1 << 20  # asyncio StreamReader limit for local connections

StreamOpener = Callable[[], Awaitable[Stream]]
Reporter = Callable[[str], None]


# --------------------------------------------------------------------------- bridging

class _LocalBroken(Exception):
    """The local connection failed (reset, broken pipe)."""


async def bridge(stream: Stream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
    """Copy bytes between a local connection and a stream until both directions ended.

    Returns "closed" after a clean end both ways, otherwise a short reason ("local:
    ...", "stream: ..."); the other side has then been reset. Cancelling the call resets
    both sides. The local writer is closed in every case.
    """

    async def upstream() -> None:  # local -> stream
        while True:
            try:
                data = await reader.read(BULK_CHUNK)
            except OSError as e:
                raise _LocalBroken(e.strerror or str(e)) from None
            if not data:
                await stream.close()
                return
            await stream.write(data)

    async def downstream() -> None:  # stream -> local
        while True:
            data = await stream.read(BULK_CHUNK)
            if not data:
                break
            writer.write(data)
            try:
                await writer.drain()
            except OSError as e:
                raise _LocalBroken(e.strerror or str(e)) from None
        if writer.can_write_eof() and not writer.is_closing():
            try:
                writer.write_eof()
            except OSError as e:
                raise _LocalBroken(e.strerror or str(e)) from None

    try:
        async with Nursery() as nursery:
            nursery.start(upstream())
            nursery.start(downstream())
            await nursery.wait_all()  # both directions: one's EOF leaves the other running
    except _LocalBroken as error:
        stream.reset(ResetCode.CANCEL, "the local connection broke: %s" % error)
        writer.transport.abort()
        return "local: %s" % error
    except (StreamResetError, SessionClosed) as error:
        reset_local(writer)
        return "stream: %s" % error
    except asyncio.CancelledError:
        stream.reset(ResetCode.CANCEL, "the local forwarder stopped")
        reset_local(writer)
        raise
    writer.close()
    return "closed"


def reset_local(writer: asyncio.StreamWriter) -> None:
    """End a local connection abruptly: RST for TCP (SO_LINGER 0), close for unix."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


# --------------------------------------------------------------------------- listener

class Forwarder:
    """A local listener; each connection gets a stream from `open_stream()` and is
    bridged to it.

    prepared: a stream opened beforehand (e.g. to check access before a VNC viewer is
    started); the first connection uses it if it is still healthy.
    report: called with one line for the user on refusals and failures.
    """

    def __init__(self, listen: ListenAddress, open_stream: StreamOpener, *,
                 prepared: Optional[Stream] = None, report: Optional[Reporter] = None,
                 label: str = "stream"):
        self.listen = listen
        self.open_stream = open_stream
        self.prepared = prepared
        self.report = report or (lambda text: log.warning("%s", text))
        self.label = label
        self.address: Optional[ListenAddress] = None  # what we are bound to
        self.connections = 0
        self._server: Optional[asyncio.AbstractServer] = None
        self._tasks: Set[asyncio.Task] = set()
        self._unix_inode: Optional[int] = None

    async def start(self) -> ListenAddress:
        if self.listen.kind == "unix":
            sock = unix_listener(self.listen.path)
            self._unix_inode = os.stat(self.listen.path).st_ino
            self._server = await asyncio.start_unix_server(self._handle, sock=sock, limit=LOCAL_BUFFER)
            self.address = self.listen
        else:
            try:
                self._server = await asyncio.start_server(self._handle, self.listen.host, self.listen.port,
                                                          limit=LOCAL_BUFFER)
            except OSError as e:
                raise UserError("cannot listen on %s: %s" % (self.listen, e.strerror or e)) from None
            host, port = self._server.sockets[0].getsockname()[:2]
            self.address = ListenAddress("tcp", host=host, port=port)
        return self.address

    @property
    def active(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Stop listening; reset every open connection and its stream."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self.prepared is not None:
            self.prepared.reset(ResetCode.CANCEL, "not used")
            self.prepared = None
        if self._unix_inode is not None:
            try:
                if os.stat(self.listen.path).st_ino == self._unix_inode:
                    os.unlink(self.listen.path)
            except OSError:
                pass
            self._unix_inode = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # a handler of asyncio.start_server runs in a task
        self._tasks.add(task)
        self.connections += 1
        number = self.connections
        peer = _peer(writer)
        try:
            stream = self._take_prepared()
            if stream is None:
                try:
                    stream = await self.open_stream()
                except ChannelRefused as e:
                    self.report("connection %d from %s: the agent refused the %s: %s"
                                % (number, peer, self.label, e.message))
                    writer.close()
                    return
                except (SessionClosed, UserError) as e:
                    self.report("connection %d from %s: no %s: %s"
                                % (number, peer, self.label, getattr(e, "message", None) or e))
                    reset_local(writer)
                    return
            log.info("connection %d from %s: %r", number, peer, stream)
            outcome = await bridge(stream, reader, writer)
            log.info("connection %d from %s: %s (%d bytes in, %d out)", number, peer, outcome,
                     stream.bytes_in, stream.bytes_out)
            if outcome.startswith("stream: "):
                self.report("connection %d from %s: the %s ended: %s"
                            % (number, peer, self.label, outcome[8:]))
        except asyncio.CancelledError:
            # the forwarder is closing (bridge() reset both sides): end quietly, since
            # asyncio logs a handler task that ends cancelled as an error
            writer.transport.abort()
        except Exception:  # a bug: keep the listener alive, say what happened
            log.exception("connection %d from %s failed", number, peer)
            writer.transport.abort()
        finally:
            self._tasks.discard(task)

    def _take_prepared(self) -> Optional[Stream]:
        stream, self.prepared = self.prepared, None
        if stream is None:
            return None
        if stream.error is not None or stream.remote_ended:
            stream.reset(ResetCode.CANCEL, "stale")
            return None
        return stream


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return format_sockname(peer)
    return "a local socket"


