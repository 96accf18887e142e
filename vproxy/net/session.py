"""The asyncio binding of the sans-IO core: Session and Stream.

A Session is an asyncio.Protocol on top of any transport (TLS in production, a
socketpair in tests). It feeds received bytes to vproxy.mux.Connection, turns the
events into Stream state, and pulls frames out of the core whenever the transport can
take them, a bounded amount at a time so that an interactive frame never queues behind
much bulk data.
"""

import asyncio
import logging
from collections import deque
from typing import Awaitable, Callable, Deque, Dict, List, Optional, Tuple

from vproxy import mux
from . import tcpinfo
from .transport import WRITE_HIGH_WATER, thread_read_view
from vproxy.errors import ChannelRefused, SessionClosed, StreamResetError
from vproxy.mux import OpenRequest, Priority, ResetCode

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
        self.session._conn.accept(self.stream_id, self.info)
        self.session._data_queued()  # the opener is waiting for this

    def refuse(self, code: int, message: str) -> None:
        self.session._conn.refuse(self.stream_id, code, message)
        self._finish(ChannelRefused(code, message))
        self.session._schedule_flush()

    # -- data -------------------------------------------------------------------------

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Up to max_bytes; b"" once the peer half-closed (and everything was read)."""
        while not self._chunks:
            if self.error is not None:
                raise self.error
            if self.remote_ended:
                return b""
            self._readable.clear()
            await self._readable.wait(self.session._loop)
        chunks: Deque[bytes] = self._chunks  # type: ignore[assignment]
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
        self.session._consumed(self.stream_id, len(chunk))
        if not chunks:
            self._chunks = ()
            if self.remote_ended:
                self._maybe_done()
        return chunk

    def _gather(self, max_bytes: int) -> bytes:
        """Take up to max_bytes off the front of _chunks, as one bytes object."""
        chunks: Deque[bytes] = self._chunks  # type: ignore[assignment]
        parts = [memoryview(chunks.popleft())[self._offset :]]
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
        parts = []
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
        conn = self.session._conn
        conn.send_data(self.stream_id, bytes(data))
        self.bytes_out += len(data)
        self.session._data_queued()
        while conn.send_buffered(self.stream_id) > WRITE_HIGH_WATER and self.error is None:
            self._writable.clear()
            self.session._blocked_writers.add(self)
            await self._writable.wait(self.session._loop)
        if self.error is not None:
            raise self.error

    async def close(self) -> None:
        """Half-close: tell the peer we send no more. Reading goes on."""
        if self.local_ended or self.error is not None:
            return
        self.local_ended = True
        self.session._conn.end_stream(self.stream_id)
        self.session._schedule_flush()
        self._maybe_done()

    def reset(self, code: int = ResetCode.CANCEL, message: str = "") -> None:
        if self.error is not None and self._closed.is_set():
            return
        self.session._conn.reset_stream(self.stream_id, code, message)
        self.session._schedule_flush()
        self._finish(StreamResetError(code, message or "reset by this side"))

    # -- notices ----------------------------------------------------------------------

    def notify(self, fields: Dict[str, str]) -> None:
        if self.error is not None or self._closed.is_set():
            return
        self.session._conn.send_notice(self.stream_id, fields)
        self.session._schedule_flush()

    async def next_notice(self) -> Dict[str, str]:
        while not self._notices:
            if self.error is not None or self._closed.is_set():
                raise self.error or SessionClosed("stream closed")
            self._notice_ready.clear()
            await self._notice_ready.wait(self.session._loop)
        return self._notices.popleft()  # type: ignore[union-attr]

    def pending_notices(self) -> List[Dict[str, str]]:
        out = list(self._notices or ())
        self._notices = None
        return out

    # -- lifetime ---------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait(self.session._loop)

    def _maybe_done(self) -> None:
        if self.local_ended and self.remote_ended and not self._chunks:
            self._closed.set()
            self.session._streams.pop(self.stream_id, None)

    def _finish(self, error: Optional[Exception]) -> None:
        if error is not None and self.error is None:
            self.error = error
        self._readable.set()
        self._writable.set()
        self._notice_ready.set()
        self._closed.set()
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(error or SessionClosed("stream closed"))
        self.session._streams.pop(self.stream_id, None)


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
        self.peer_identity = None  # set by whoever wires TLS in
        self._streams: Dict[int, Stream] = {}
        self._blocked_writers: "set[Stream]" = set()
        self._paused = False
        self._flush_scheduled = False
        self._timer: Optional[asyncio.TimerHandle] = None
        self._probe: Optional[asyncio.TimerHandle] = None  # the next RTT probe
        self._pings: Deque["asyncio.Future[float]"] = deque()
        self._tasks: "set[asyncio.Task]" = set()
        self._loop = asyncio.get_event_loop()
        # what transports read into: this thread's buffer, shared by its sessions
        self._read_view = thread_read_view("session", READ_BUFFER)
        self.ready = self._loop.create_future()  # set once the transport is up
        self.closed = self._loop.create_future()  # result: the reason, as text
        self.close_reason: Optional[str] = None
        self.remote_goaway: Optional[str] = None

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._conn.last_received = self._loop.time()
        self._schedule_timer()
        self._observe_path_rtt()
        self._probe = self._loop.call_later(RTT_PROBES[0], self._probe_rtt, RTT_PROBES[1:])
        if not self.ready.done():
            self.ready.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_view

    def buffer_updated(self, nbytes: int) -> None:
        # The core keeps nothing that points into the buffer (it copies out a
        # frame cut between two reads), so the next read may overwrite it, and
        # the sessions of one thread can share it (transports call get_buffer()
        # and buffer_updated() back to back).
        self.data_received(self._read_view[:nbytes])  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        events = self._conn.receive_data(data, self._loop.time())
        for event in events:
            self._handle(event)
        self._flush()

    def eof_received(self) -> bool:
        self._lost("the peer closed the connection")
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if exc is not None:
            from vproxy.security.tls import describe_tls_error

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
        answer = stream._answer = self._loop.create_future()
        self._streams[sid] = stream
        self._data_queued()
        # A timer on the answer itself, not wait_for(shield(...)): those cost three
        # more turns of the event loop between the ACCEPT and this task.
        timer = None if timeout is None else self._loop.call_later(timeout, _expire, answer)
        try:
            await answer
        except _OpenTimedOut:
            stream.reset(ResetCode.CANCEL, "open timed out")
            raise SessionClosed("no answer to the open request within %.0f s" % timeout) from None
        finally:
            if timer is not None:
                timer.cancel()
        return stream

    async def ping(self, timeout: float = 10.0) -> float:
        """Round-trip time in seconds."""
        fut = self._loop.create_future()
        self._pings.append(fut)
        self._conn.ping(self._loop.time())
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

    # -- internals --------------------------------------------------------------------

    async def _drained(self) -> None:
        while self._streams:
            await asyncio.sleep(0.05)

    def _consumed(self, stream_id: int, size: int) -> None:
        if self._conn.acknowledge(stream_id, size, self._loop.time()):
            self._schedule_flush()  # a WINDOW frame is queued

    def _handle(self, event: mux.Event) -> None:
        stream = self._streams.get(getattr(event, "stream_id", 0))
        if isinstance(event, mux.DataReceived):
            if stream is not None:
                if not stream._chunks:
                    stream._chunks = deque()
                stream._chunks.append(event.data)  # type: ignore[union-attr]
                stream.bytes_in += len(event.data)
                stream._readable.set()
            else:  # the application already let go of it: free the credit
                self._conn.acknowledge(event.stream_id, len(event.data), self._loop.time())
        elif isinstance(event, mux.StreamOpened):
            self._incoming(event)
        elif isinstance(event, mux.StreamAccepted):
            if stream is not None and stream._answer is not None:
                stream.info = event.info
                stream._answer.set_result(None)
        elif isinstance(event, mux.StreamRefused):
            if stream is not None:
                stream._finish(ChannelRefused(event.code, event.message))
        elif isinstance(event, mux.StreamEnded):
            if stream is not None:
                stream.remote_ended = True
                stream._readable.set()
                stream._maybe_done()
        elif isinstance(event, mux.StreamReset):
            if stream is not None:
                stream._finish(StreamResetError(event.code, event.message))
        elif isinstance(event, mux.StreamClosed):
            if stream is not None and stream.local_ended and stream.remote_ended:
                stream._maybe_done()
        elif isinstance(event, mux.NoticeReceived):
            if stream is not None:
                if stream._notices is None:
                    stream._notices = deque(maxlen=MAX_NOTICES)
                stream._notices.append(event.fields)
                stream._notice_ready.set()
        elif isinstance(event, mux.PingAcknowledged):
            while self._pings:
                fut = self._pings.popleft()
                if not fut.done():
                    fut.set_result(event.rtt)
                    break
        elif isinstance(event, mux.GoAwayReceived):
            self.remote_goaway = event.message or "the peer is going away"
            if event.code != mux.ErrorCode.NO_ERROR:
                self.close_reason = "the peer ended the session: %s (%s)" % (
                    event.message, _code_name(event.code))
        elif isinstance(event, mux.ConnectionTerminated):
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
        if self._on_open is None:
            stream.refuse(mux.RefuseCode.NO_SUCH_CHANNEL, "this side accepts no streams")
            return
        task = self._loop.create_task(self._serve(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, stream: Stream) -> None:
        try:
            await self._on_open(stream)  # type: ignore[misc]
        except (StreamResetError, SessionClosed, ChannelRefused):
            pass
        except Exception:
            log.exception("%s: handler for %r failed", self.name, stream)
            if not stream.closed:
                if stream.stream_id in self._streams and self._conn.stream_state(stream.stream_id) == mux.StreamState.PENDING:
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
            self._loop.call_soon(self._flush)

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
                    stream._writable.set()
        if self._conn.is_drained and self._conn.local_goaway and self.close_reason is None:
            pass  # goaway() closes once drained

    def _probe_rtt(self, later: Tuple[float, ...]) -> None:
        """Ping now, then again after each delay in `later`: the shortest round trip
        seen is the base RTT that stream windows grow by (vproxy.mux.Config). A few
        samples, because one taken while a side was busy says little."""
        if self.closed.done() or self.transport is None or self.transport.is_closing():
            return
        self._observe_path_rtt()
        self._conn.probe_rtt(self._loop.time())
        self._flush()
        if later:
            self._probe = self._loop.call_later(later[0], self._probe_rtt, later[1:])

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
        self._timer = self._loop.call_at(self._conn.next_deadline(), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed.done():
            return
        for event in self._conn.handle_timer(self._loop.time()):
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
            stream._finish(error)
        for fut in self._pings:
            if not fut.done():
                fut.set_exception(error)
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()  # retrieved: nobody has to wait for it
        self.closed.set_result(self.close_reason)
        for task in list(self._tasks):
            task.cancel()


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
