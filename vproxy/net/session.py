"""The asyncio binding of the sans-IO core: Session and Stream.

A Session is an asyncio.Protocol on top of any transport (TLS in production, a
socketpair in tests). It feeds received bytes to vproxy.mux.Connection, turns the
events into Stream state, and pulls frames out of the core whenever the transport can
take them, a bounded amount at a time so that an interactive frame never queues behind
much bulk data.

Session and Stream use none of each other's private members: a Stream asks its session
through Session.stream_*() (and wake_when_writable, stream_gone, loop); the session
tells a stream through Stream.feed_*(), answered(), wake_writer(), check_done() and
finish(). Those are public for each other, not for applications.
"""

import asyncio
import logging
from collections import deque
from typing import Any, Awaitable, Callable, Deque, Dict, List, Optional, Tuple, Union, cast

from vproxy import mux
from . import tcpinfo
from .transport import WRITE_HIGH_WATER, thread_read_view
from vproxy.errors import ChannelRefused, SessionClosed, StreamResetError
from vproxy.mux import OpenRequest, Priority, ResetCode
from vproxy.security.tls import describe_tls_error

log = logging.getLogger("vproxy.session")

# Stream.write waits while more than WRITE_HIGH_WATER of its bytes are unsent: the
# transport's own high-water mark, so that one stream alone has enough queued to refill
# the transport each time it drains.
PULL_LIMIT = 64 * 1024  # bytes of data frames taken from the core per transport write
# Stream.read joins small received pieces into one, up to GATHER_MAX bytes; a piece of
# GATHER_BELOW bytes or more is handed over as it is (copying it costs more than the
# read saved; and a large fresh allocation costs a page fault per 4 KiB)
GATHER_BELOW = 16 * 1024
GATHER_MAX = 64 * 1024
RTT_PROBES = (0.02, 0.1, 1.0, 10.0)  # seconds from the start, then between pings that
                                     # measure the base round trip
READ_BUFFER = 256 * 1024  # what the transport may read into the session at once
MAX_NOTICES = 256  # notices kept per stream for a reader that does not ask for them


class Stream:
    """One multiplexed byte stream. See docs/ARCHITECTURE.md for the contract."""

    def __init__(self, session: "Session", stream_id: int, request: OpenRequest, priority: int):
        self.session = session
        self.stream_id = stream_id
        self.request = request
        self.priority = priority
        self.info: Dict[str, str] = {}
        # Received and not read yet: () until data comes, and whenever all was read
        # (an idle stream holds no deque: 10,000 idle streams are a use case).
        self._chunks: "Deque[bytes] | Tuple[()]" = ()
        self._offset = 0  # bytes of _chunks[0] already read
        self._readable = _Event()
        self._writable = _Event()
        self._writable.set()
        self._notices: Optional[Deque[Dict[str, str]]] = None  # made by the first one
        self._notice_ready = _Event()
        self._closed = _Event()
        self._answer: Optional["asyncio.Future[None]"] = None
        self.remote_ended = False
        self.local_ended = False
        self.error: Optional[Exception] = None
        self.bytes_in = 0
        self.bytes_out = 0

    def __repr__(self) -> str:
        return "<Stream %d %s>" % (self.stream_id, self.request.describe())

    # -- answering an open (the side that received it) --------------------------------

    def accept(self, info: Optional[Dict[str, str]] = None) -> None:
        self.info = dict(info or {})
        self.session.stream_accept(self.stream_id, self.info)

    def refuse(self, code: int, message: str) -> None:
        self.session.stream_refuse(self.stream_id, code, message)
        self.finish(ChannelRefused(code, message))

    # -- data -------------------------------------------------------------------------

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Up to max_bytes; b"" once the peer half-closed (and everything was read)."""
        while not self._chunks:
            if self.error is not None:
                raise self.error
            if self.remote_ended:
                return b""
            self._readable.clear()
            await self._readable.wait(self.session.loop)
        chunks: Deque[bytes] = self._chunks
        chunk = chunks[0]
        offset = self._offset
        size = len(chunk) - offset
        if size < GATHER_BELOW and len(chunks) > 1 and max_bytes > size:
            chunk = self._gather(min(max_bytes, GATHER_MAX))  # small pieces: join them
        elif size <= max_bytes:
            chunks.popleft()
            if offset:
                chunk = chunk[offset:]
                self._offset = 0
        else:  # part of the first chunk; the offset saves copying the rest
            self._offset = offset + max_bytes
            chunk = chunk[offset : self._offset]
        self.session.stream_consumed(self.stream_id, len(chunk))
        if not chunks:
            self._chunks = ()
            if self.remote_ended:
                self.check_done()
        return chunk

    def _gather(self, max_bytes: int) -> bytes:
        """Take up to max_bytes off the front of _chunks, as one bytes object."""
        chunks: Deque[bytes] = self._chunks  # type: ignore[assignment]
        parts: List[Union[bytes, memoryview]] = [memoryview(chunks.popleft())[self._offset :]]
        self._offset = 0
        size = len(parts[0])
        while chunks and size < max_bytes:
            chunk = chunks[0]
            if size + len(chunk) <= max_bytes:
                parts.append(chunks.popleft())
                size += len(chunk)
            else:
                self._offset = max_bytes - size
                parts.append(memoryview(chunk)[: self._offset])
                size = max_bytes
        return b"".join(parts)

    async def readexactly(self, size: int) -> bytes:
        parts: List[bytes] = []
        while size:
            chunk = await self.read(size)
            if not chunk:
                raise asyncio.IncompleteReadError(b"".join(parts), size)
            parts.append(chunk)
            size -= len(chunk)
        return b"".join(parts)

    async def write(self, data: bytes) -> None:
        """Queue data; waits while the peer's window and our buffer are full."""
        if self.error is not None:
            raise self.error
        if self.local_ended:
            raise StreamResetError(ResetCode.STREAM_CLOSED, "write after close()")
        if not data:
            return
        session = self.session
        buffered = session.stream_write(self.stream_id, bytes(data))
        self.bytes_out += len(data)
        while buffered > WRITE_HIGH_WATER and self.error is None:
            self._writable.clear()
            session.wake_when_writable(self)
            await self._writable.wait(session.loop)
            buffered = session.send_buffered(self.stream_id)
        if self.error is not None:
            raise self.error

    async def close(self) -> None:
        """Half-close: tell the peer we send no more. Reading goes on."""
        if self.local_ended or self.error is not None:
            return
        self.local_ended = True
        self.session.stream_end(self.stream_id)
        self.check_done()

    def reset(self, code: int = ResetCode.CANCEL, message: str = "") -> None:
        if self.error is not None and self._closed.is_set():
            return
        self.session.stream_reset(self.stream_id, code, message)
        self.finish(StreamResetError(code, message or "reset by this side"))

    # -- notices ----------------------------------------------------------------------

    def notify(self, fields: Dict[str, str]) -> None:
        if self.error is not None or self._closed.is_set():
            return
        self.session.stream_notice(self.stream_id, fields)

    async def next_notice(self) -> Dict[str, str]:
        while not self._notices:
            if self.error is not None or self._closed.is_set():
                raise self.error or SessionClosed("stream closed")
            self._notice_ready.clear()
            await self._notice_ready.wait(self.session.loop)
        return self._notices.popleft()

    def pending_notices(self) -> List[Dict[str, str]]:
        out = list(self._notices or ())
        self._notices = None
        return out

    # -- lifetime ---------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait(self.session.loop)

    # -- what the session tells the stream ----------------------------------------------
    # Called by Session only (public so that neither reaches into the other's private
    # members): the peer's frames, turned into this stream's state.

    def expect_answer(self) -> "asyncio.Future[None]":
        """The future that the peer's ACCEPT sets (and REFUSE or the end fails)."""
        answer = self._answer = self.session.loop.create_future()
        return answer

    def answered(self, info: Dict[str, str]) -> None:
        """The peer accepted the open this side sent."""
        if self._answer is not None:
            self.info = info
            self._answer.set_result(None)

    def feed_data(self, data: bytes) -> None:
        """Bytes from the peer, for read()."""
        if not self._chunks:
            self._chunks = deque()
        self._chunks.append(data)
        self.bytes_in += len(data)
        self._readable.set()

    def feed_eof(self) -> None:
        """The peer half-closed: read() returns b"" once the rest was read."""
        self.remote_ended = True
        self._readable.set()
        self.check_done()

    def feed_notice(self, fields: Dict[str, str]) -> None:
        """A NOTICE from the peer, for next_notice(); the oldest go beyond MAX_NOTICES."""
        if self._notices is None:
            self._notices = deque(maxlen=MAX_NOTICES)
        self._notices.append(fields)
        self._notice_ready.set()

    def wake_writer(self) -> None:
        """The session sent enough of what write() queued: a waiting write() goes on."""
        self._writable.set()

    def check_done(self) -> None:
        """Closed once both sides ended and everything received was read."""
        if self.local_ended and self.remote_ended and not self._chunks:
            self._closed.set()
            self.session.stream_gone(self.stream_id)

    def finish(self, error: Optional[Exception]) -> None:
        """The stream is over (refused, reset or the session ended): wake every waiter;
        they raise `error` (the first one given) where there is one."""
        if error is not None and self.error is None:
            self.error = error
        self._readable.set()
        self._writable.set()
        self._notice_ready.set()
        self._closed.set()
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(error or SessionClosed("stream closed"))
        self.session.stream_gone(self.stream_id)


OpenHandler = Callable[[Stream], Awaitable[None]]

class _Event:
    """asyncio.Event's behaviour without its deque of waiters: about 100 bytes where
    an asyncio.Event takes 900, and a stream has four."""

    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = False
        self._waiters: Optional[List["asyncio.Future[None]"]] = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if self._value:
            return
        self._value = True
        waiters, self._waiters = self._waiters, None
        for fut in waiters or ():
            if not fut.done():
                fut.set_result(None)

    def clear(self) -> None:
        self._value = False

    async def wait(self, loop: asyncio.AbstractEventLoop) -> None:
        # the loop is passed in: get_running_loop() costs a getpid() system call
        # (Python < 3.12), once per read() that waits
        if self._value:
            return
        fut = loop.create_future()
        if self._waiters is None:
            self._waiters = [fut]
        else:
            self._waiters.append(fut)
        try:
            await fut
        finally:
            waiters = self._waiters
            if waiters is not None and fut in waiters:  # cancelled while waiting
                waiters.remove(fut)


class Session(asyncio.BufferedProtocol):
    """One vproxy/1 session over one transport.

    A BufferedProtocol: the transport reads into the session's buffer and the core
    copies each stream's data out of it once (data_received() works too).

    client: True on the side that connected (odd stream ids).
    on_open: coroutine run for each stream the peer opens; it must accept() or
    refuse() the stream, then serve it.
    """

    def __init__(
        self,
        client: bool,
        config: Optional[mux.Config] = None,
        on_open: Optional[OpenHandler] = None,
        name: str = "session",
    ):
        self._conn = mux.Connection(client, config)
        self._on_open = on_open
        self.name = name
        self.transport: Optional[asyncio.Transport] = None
        # who the peer is (vproxy.agent.channels.PeerIdentity), set by whoever wires
        # TLS in (or SO_PEERCRED on the agent's local socket)
        self.peer_identity: Any = None
        self._streams: Dict[int, Stream] = {}
        self._blocked_writers: "set[Stream]" = set()
        self._paused = False
        self._flush_scheduled = False
        self._timer: Optional[asyncio.TimerHandle] = None
        self._probe: Optional[asyncio.TimerHandle] = None  # the next RTT probe
        self._pings: Deque["asyncio.Future[float]"] = deque()
        self._tasks: "set[asyncio.Task[None]]" = set()
        self.loop = asyncio.get_event_loop()  # public for Stream, which waits on it
        # what transports read into: this thread's buffer, shared by its sessions
        self._read_view = thread_read_view("session", READ_BUFFER)
        self.ready = self.loop.create_future()  # set once the transport is up
        self.closed = self.loop.create_future()  # result: the reason, as text
        self.close_reason: Optional[str] = None
        self.remote_goaway: Optional[str] = None

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # what Session is used on
        self._conn.last_received = self.loop.time()
        self._schedule_timer()
        self._observe_path_rtt()
        self._probe = self.loop.call_later(RTT_PROBES[0], self._probe_rtt, RTT_PROBES[1:])
        if not self.ready.done():
            self.ready.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_view

    def buffer_updated(self, nbytes: int) -> None:
        # The core keeps nothing that points into the buffer (it copies out a
        # frame cut between two reads), so the next read may overwrite it, and
        # the sessions of one thread can share it (transports call get_buffer()
        # and buffer_updated() back to back).
        self.data_received(self._read_view[:nbytes])

    def data_received(self, data: bytes) -> None:
        events = self._conn.receive_data(data, self.loop.time())
        for event in events:
            self._handle(event)
        self._flush()

    def eof_received(self) -> bool:
        self._lost("the peer closed the connection")
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if exc is not None:
            self._lost("connection lost: %s" % describe_tls_error(exc))
        else:
            self._lost(self.close_reason or "the connection was closed")

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._flush()

    # -- public API -------------------------------------------------------------------

    async def open(
        self,
        request: OpenRequest,
        priority: int = Priority.BULK,
        timeout: Optional[float] = 30.0,
    ) -> Stream:
        """Open a stream; raises ChannelRefused with the agent's code and message."""
        if self.closed.done():
            raise SessionClosed(self.close_reason or "the session is closed")
        try:
            sid = self._conn.open_stream(request.to_fields(), priority)
        except mux.LocalProtocolError as e:
            raise SessionClosed(e.message) from None
        stream = Stream(self, sid, request, priority)
        answer = stream.expect_answer()
        self._streams[sid] = stream
        self._data_queued()
        # A timer on the answer itself, not wait_for(shield(...)): those cost three
        # more turns of the event loop between the ACCEPT and this task.
        timer = None if timeout is None else self.loop.call_later(timeout, _expire, answer)
        try:
            await answer
        except _OpenTimedOut:
            assert timeout is not None  # only the timer raises it
            stream.reset(ResetCode.CANCEL, "open timed out")
            raise SessionClosed("no answer to the open request within %.0f s" % timeout) from None
        finally:
            if timer is not None:
                timer.cancel()
        return stream

    async def ping(self, timeout: float = 10.0) -> float:
        """Round-trip time in seconds."""
        fut = self.loop.create_future()
        self._pings.append(fut)
        self._conn.ping(self.loop.time())
        self._flush()
        return await asyncio.wait_for(fut, timeout)

    @property
    def rtt(self) -> Optional[float]:
        return self._conn.rtt

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    async def goaway(self, message: str = "", drain_timeout: float = 10.0) -> None:
        """Graceful close: no new streams, let open ones finish, then close."""
        self._conn.goaway(mux.ErrorCode.NO_ERROR, message)
        self._flush()
        try:
            await asyncio.wait_for(self._drained(), drain_timeout)
        except asyncio.TimeoutError:
            pass
        self.close(message or "closed")

    def close(self, reason: str = "closed") -> None:
        if self.close_reason is None:
            self.close_reason = reason
        if not self._conn.local_goaway and not self._conn.terminated:
            self._conn.goaway(mux.ErrorCode.NO_ERROR, reason)
        self._flush()
        if self.transport is not None:
            self.transport.close()
        self._lost(reason)

    async def wait_closed(self) -> str:
        return await asyncio.shield(self.closed)

    def send_buffered(self, stream_id: int) -> int:
        """Bytes written to the stream that the core still holds (the peer's window
        has not taken them yet, or the transport could not)."""
        return self._conn.send_buffered(stream_id)

    # -- what a stream asks of its session ----------------------------------------------
    # Called by Stream only (public so that neither reaches into the other's private
    # members): each queues a frame in the core and sees that it gets sent.

    def stream_accept(self, stream_id: int, info: Dict[str, str]) -> None:
        self._conn.accept(stream_id, info)
        self._data_queued()  # the opener is waiting for this

    def stream_refuse(self, stream_id: int, code: int, message: str) -> None:
        self._conn.refuse(stream_id, code, message)
        self._schedule_flush()

    def stream_write(self, stream_id: int, data: bytes) -> int:
        """Queue data; returns what the stream has buffered once the transport took
        what it could."""
        conn = self._conn
        conn.send_data(stream_id, data)
        self._data_queued()
        return conn.send_buffered(stream_id)

    def stream_end(self, stream_id: int) -> None:
        self._conn.end_stream(stream_id)
        self._schedule_flush()

    def stream_reset(self, stream_id: int, code: int, message: str) -> None:
        self._conn.reset_stream(stream_id, code, message)
        self._schedule_flush()

    def stream_notice(self, stream_id: int, fields: Dict[str, str]) -> None:
        self._conn.send_notice(stream_id, fields)
        self._schedule_flush()

    def stream_consumed(self, stream_id: int, size: int) -> None:
        """The application read `size` bytes: give the peer credit for them."""
        if self._conn.acknowledge(stream_id, size, self.loop.time()):
            self._schedule_flush()  # a WINDOW frame is queued

    def wake_when_writable(self, stream: Stream) -> None:
        """stream.wake_writer() once its buffer is down to WRITE_HIGH_WATER."""
        self._blocked_writers.add(stream)

    def stream_gone(self, stream_id: int) -> None:
        """The stream is closed: the session forgets it."""
        self._streams.pop(stream_id, None)

    # -- internals --------------------------------------------------------------------

    async def _drained(self) -> None:
        while self._streams:
            await asyncio.sleep(0.05)

    def _handle(self, event: mux.Event) -> None:
        _HANDLERS[type(event)](self, event)

    # One method per event of the core (the table _HANDLERS below). Events of a stream
    # the application already let go of are dropped, but for the credit of its data.

    def _on_data(self, event: mux.DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.feed_data(event.data)
        else:  # the application already let go of it: free the credit
            self._conn.acknowledge(event.stream_id, len(event.data), self.loop.time())

    def _on_accepted(self, event: mux.StreamAccepted) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.answered(event.info)

    def _on_refused(self, event: mux.StreamRefused) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.finish(ChannelRefused(event.code, event.message))

    def _on_ended(self, event: mux.StreamEnded) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.feed_eof()

    def _on_reset(self, event: mux.StreamReset) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.finish(StreamResetError(event.code, event.message))

    def _on_closed(self, event: mux.StreamClosed) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.check_done()

    def _on_notice(self, event: mux.NoticeReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.feed_notice(event.fields)

    def _on_ping_ack(self, event: mux.PingAcknowledged) -> None:
        while self._pings:
            fut = self._pings.popleft()
            if not fut.done():
                fut.set_result(event.rtt)
                break

    def _on_goaway(self, event: mux.GoAwayReceived) -> None:
        self.remote_goaway = event.message or "the peer is going away"
        if event.code != mux.ErrorCode.NO_ERROR:
            self.close_reason = "the peer ended the session: %s (%s)" % (
                event.message, _code_name(event.code))

    def _on_terminated(self, event: mux.ConnectionTerminated) -> None:
        self.close_reason = "%s (%s)" % (event.message, _code_name(event.code))
        log.warning("%s: ending session: %s", self.name, self.close_reason)
        self._flush()
        if self.transport is not None:
            self.transport.close()
        self._lost(self.close_reason)

    def _incoming(self, event: mux.StreamOpened) -> None:
        try:
            request = OpenRequest.from_fields(event.fields)
        except mux.BadRequest as e:
            self._conn.refuse(event.stream_id, mux.RefuseCode.BAD_REQUEST, str(e))
            return
        stream = Stream(self, event.stream_id, request, event.priority)
        self._streams[event.stream_id] = stream
        on_open = self._on_open
        if on_open is None:
            stream.refuse(mux.RefuseCode.NO_SUCH_CHANNEL, "this side accepts no streams")
            return
        task = self.loop.create_task(self._serve(on_open, stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, on_open: OpenHandler, stream: Stream) -> None:
        try:
            await on_open(stream)
        except (StreamResetError, SessionClosed, ChannelRefused):
            pass
        except Exception:
            log.exception("%s: handler for %r failed", self.name, stream)
            if not stream.closed:
                if (stream.stream_id in self._streams
                        and self._conn.stream_state(stream.stream_id) == mux.StreamState.PENDING):
                    stream.refuse(mux.RefuseCode.INTERNAL, "internal error in the agent")
                else:
                    stream.reset(ResetCode.INTERNAL, "internal error in the agent")

    def _data_queued(self) -> None:
        """A stream queued data: send it now if the transport is idle (as a socket
        with TCP_NODELAY would), else with the flush already due."""
        if self._flush_scheduled or self._paused:
            return
        transport = self.transport
        if transport is not None and not transport.get_write_buffer_size():
            self._flush()
        else:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.transport is None or self.transport.is_closing():
            return
        while not self._paused:
            out = self._conn.data_to_send(PULL_LIMIT)
            if not out:
                break
            self.transport.write(out)
        if self._blocked_writers:
            for stream in list(self._blocked_writers):
                if self._conn.send_buffered(stream.stream_id) <= WRITE_HIGH_WATER:
                    self._blocked_writers.discard(stream)
                    stream.wake_writer()
        if self._conn.is_drained and self._conn.local_goaway and self.close_reason is None:
            pass  # goaway() closes once drained

    def _probe_rtt(self, later: Tuple[float, ...]) -> None:
        """Ping now, then again after each delay in `later`: the shortest round trip
        seen is the base RTT that stream windows grow by (vproxy.mux.Config). A few
        samples, because one taken while a side was busy says little."""
        if self.closed.done() or self.transport is None or self.transport.is_closing():
            return
        self._observe_path_rtt()
        self._conn.probe_rtt(self.loop.time())
        self._flush()
        if later:
            self._probe = self.loop.call_later(later[0], self._probe_rtt, later[1:])

    def _observe_path_rtt(self) -> None:
        """TCP's minimum round trip, where the transport has one: the probe pings run
        through the same queues as the data, and a session that starts with a bulk
        transfer would otherwise size every window on a queue-inflated round trip
        (3 MiB windows and a 15 ms keystroke beside a download, on loopback)."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        rtt = tcpinfo.min_rtt(sock)
        if rtt is not None:
            self._conn.observe_path_rtt(rtt)

    def _schedule_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(self._conn.next_deadline(), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed.done():
            return
        for event in self._conn.handle_timer(self.loop.time()):
            self._handle(event)
        self._flush()
        if not self.closed.done():
            self._schedule_timer()

    def _lost(self, reason: str) -> None:
        if self.closed.done():
            return
        if self.close_reason is None:
            self.close_reason = reason
        if self._timer is not None:
            self._timer.cancel()
        if self._probe is not None:
            self._probe.cancel()  # it holds the session: a closed one would live 11 s on
        error = SessionClosed(self.close_reason)
        for stream in list(self._streams.values()):
            stream.finish(error)
        for fut in self._pings:
            if not fut.done():
                fut.set_exception(error)
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()  # retrieved: nobody has to wait for it
        self.closed.set_result(self.close_reason)
        for task in list(self._tasks):
            task.cancel()


# What Session._handle does with each event of the core.
_HANDLERS: Dict[type, Callable[[Session, Any], None]] = {
    mux.DataReceived: Session._on_data,
    mux.StreamOpened: Session._incoming,
    mux.StreamAccepted: Session._on_accepted,
    mux.StreamRefused: Session._on_refused,
    mux.StreamEnded: Session._on_ended,
    mux.StreamReset: Session._on_reset,
    mux.StreamClosed: Session._on_closed,
    mux.NoticeReceived: Session._on_notice,
    mux.PingAcknowledged: Session._on_ping_ack,
    mux.GoAwayReceived: Session._on_goaway,
    mux.ConnectionTerminated: Session._on_terminated,
}


class _OpenTimedOut(Exception):
    pass


def _expire(answer: "asyncio.Future[None]") -> None:
    if not answer.done():
        answer.set_exception(_OpenTimedOut())


def _code_name(code: int) -> str:
    try:
        return mux.ErrorCode(code).name
    except ValueError:
        return "code %d" % code
