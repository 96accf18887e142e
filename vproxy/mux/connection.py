"""The vproxy/1 session state machine, without I/O.

Everything that decides what a session may do lives here: stream states (a table),
flow-control windows, priorities, keepalive and GOAWAY. Bytes come in through
receive_data(), events come out; the API methods queue frames that data_to_send()
hands back. Time is passed in (`now`, in seconds) so that tests control the clock.
"""

import math
import struct
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Deque, Dict, List, Optional, Tuple, Union

from . import events as ev
from . import frames as fr
from .errors import (
    ErrorCode,
    LocalProtocolError,
    RefuseCode,
    RemoteProtocolError,
    ResetCode,
)
from .frames import Flag, FrameType, Priority


@dataclass
class Config:
    initial_window: int = 256 * 1024  # credit a new stream starts with
    max_window: int = 16 * 1024 * 1024  # a stream's window grows up to this (BDP)
    min_window: int = 4 * 1024  # floor when the session budget is spent
    session_window_limit: int = 64 * 1024 * 1024  # credit outstanding over all streams
    max_streams: int = 16384  # concurrent streams the peer may open
    keepalive_interval: float = 5.0  # ping after this long without hearing the peer
    keepalive_timeout: float = 10.0  # declare the peer dead after this long
    initial_rtt: float = 0.05  # assumed until the first ping answer
    max_control_backlog: int = 100000  # answers queued for a peer that does not read
    # A stream's window doubles while it holds less than two round trips of what its
    # reader takes: the bandwidth-delay product, twice. The round trip is the base
    # one (the shortest a ping took, or TCP's own minimum), never less than a floor;
    # the reader's rate is a moving average with this time constant. Neither may
    # follow the queue: under load a ping waits behind the bulk data in flight, and a
    # reader that fell behind takes what waited for it in one gulp; a window grown on
    # those grows the queue, which a keystroke on another stream waits behind.
    # The floor while an interactive stream is open: on a 2-CPU loopback a keystroke
    # beside a download took p99 1.4-1.6 ms with 0.25 ms, 2.1-2.4 ms with 0.5 ms.
    window_rtt_floor: float = 0.00025
    # ... and while none is, bulk streams only compete with each other: a longer
    # floor lets their windows grow further (2 ms gave 10-15 % more throughput than
    # 0.5 ms); they come back down once an interactive stream opens (a window more
    # than twice its target gives credit back).
    bulk_only_window_rtt_floor: float = 0.002
    window_rate_period: float = 0.02


class StreamState(Enum):
    OPENING = "opening"  # we sent OPEN, no answer yet
    PENDING = "pending"  # the peer sent OPEN, we have not answered
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed-local"  # we sent END_STREAM
    HALF_CLOSED_REMOTE = "half-closed-remote"  # the peer sent END_STREAM
    CLOSED = "closed"


class Input(Enum):
    SEND_ACCEPT = "send ACCEPT"
    RECV_ACCEPT = "receive ACCEPT"
    SEND_REFUSE = "send REFUSE"
    RECV_REFUSE = "receive REFUSE"
    SEND_DATA = "send DATA"
    RECV_DATA = "receive DATA"
    SEND_END = "send END_STREAM"
    RECV_END = "receive END_STREAM"
    SEND_NOTICE = "send NOTICE"
    RECV_NOTICE = "receive NOTICE"


S = StreamState  # short names keep the transition table below one readable line a row
I = Input  # noqa: E741
_LIVE = (S.OPEN, S.HALF_CLOSED_LOCAL, S.HALF_CLOSED_REMOTE)

# (state, input) -> next state. Anything not here is an error. RESET is allowed in
# every state but CLOSED and always leads to CLOSED, so it is handled outside the table.
TRANSITIONS: Dict[Tuple[StreamState, Input], StreamState] = {
    (S.OPENING, I.RECV_ACCEPT): S.OPEN,
    (S.OPENING, I.RECV_REFUSE): S.CLOSED,
    (S.PENDING, I.SEND_ACCEPT): S.OPEN,
    (S.PENDING, I.SEND_REFUSE): S.CLOSED,
    (S.OPEN, I.SEND_DATA): S.OPEN,
    (S.OPEN, I.RECV_DATA): S.OPEN,
    (S.OPEN, I.SEND_END): S.HALF_CLOSED_LOCAL,
    (S.OPEN, I.RECV_END): S.HALF_CLOSED_REMOTE,
    (S.HALF_CLOSED_LOCAL, I.RECV_DATA): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_LOCAL, I.RECV_END): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, I.SEND_DATA): S.HALF_CLOSED_REMOTE,
    (S.HALF_CLOSED_REMOTE, I.SEND_END): S.CLOSED,
}
for _state in _LIVE:
    TRANSITIONS[(_state, I.SEND_NOTICE)] = _state
    TRANSITIONS[(_state, I.RECV_NOTICE)] = _state

# States where DATA may arrive and leaves the state as it is: receive_data()'s fast path.
_RECV_DATA_STATES = tuple(st for (st, inp), nxt in TRANSITIONS.items()
                          if inp is I.RECV_DATA and nxt is st)


def _join(parts: List[memoryview]) -> bytes:
    return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)


class _StreamError(Exception):
    """A fault that ends one stream only (reset with code)."""

    def __init__(self, code: ResetCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class _Stream:
    __slots__ = (
        "id", "state", "priority", "send_window", "send_buffer", "send_buffered",
        "end_pending", "queued", "recv_credit", "recv_window", "consumed", "rate_start",
        "rate_bytes", "rate",
    )

    def __init__(self, stream_id: int, state: StreamState, priority: int):
        self.id = stream_id
        self.state = state
        self.priority = priority
        self.send_window = 0  # bytes the peer lets us send
        self.send_buffer: Optional[Deque[memoryview]] = None  # made by the first data
        self.send_buffered = 0
        self.end_pending = False  # END_STREAM still to be sent after the buffer
        self.queued = False  # in a send queue
        self.recv_credit = 0  # bytes the peer may still send us
        self.recv_window = 0  # target window; counts against the session budget
        self.consumed = 0  # bytes the application read that we have not re-granted
        self.rate = 0.0  # bytes per second the reader takes (moving average)
        self.rate_start = 0.0  # rate_bytes were consumed since this time
        self.rate_bytes = 0

    def take(self, size: int, parts: List[Union[bytes, memoryview]]) -> None:
        """Move the first `size` buffered bytes to parts (views, no copy)."""
        buffer: Deque[memoryview] = self.send_buffer  # type: ignore[assignment]
        need = size
        while need:
            head = buffer[0]
            if len(head) <= need:
                parts.append(head)
                buffer.popleft()
                need -= len(head)
            else:
                parts.append(head[:need])
                buffer[0] = head[need:]
                need = 0
        self.send_buffered -= size


class Connection:
    """One side of a vproxy/1 session.

    client=True for the side that opened the TLS connection: its streams get odd ids,
    the other side's even ids.
    """

    def __init__(self, client: bool, config: Optional[Config] = None, now: float = 0.0):
        self.config = config or Config()
        self.client = client
        self._streams: Dict[int, _Stream] = {}
        self._next_local_id = 1 if client else 2
        self._last_remote_id = 0  # highest stream id the peer opened
        self._remote_open = 0  # streams the peer opened that are not closed
        self._control: List[bytes] = []
        # streams with data or an END_STREAM to send and the window for it, by Priority
        self._send_queues: Tuple[Deque[_Stream], Deque[_Stream]] = (deque(), deque())
        self._budget_used = 0  # sum of recv_window over streams
        self._interactive = 0  # open streams of Priority.INTERACTIVE
        self._decoder = fr.FrameDecoder()
        self._pings: Dict[bytes, float] = {}
        self._probes: "set[bytes]" = set()  # pings from probe_rtt()
        self._ping_counter = 0
        self.rtt: Optional[float] = None  # smoothed, seconds
        self.min_rtt: Optional[float] = None  # the shortest round trip seen (pings, path)
        self.last_received = now
        self.local_goaway: Optional[Tuple[int, str]] = None
        self.remote_goaway: Optional[Tuple[int, int, str]] = None
        self.terminated: Optional[Tuple[int, str]] = None

    # -- queries ----------------------------------------------------------------------

    def stream_state(self, stream_id: int) -> StreamState:
        s = self._streams.get(stream_id)
        return s.state if s else StreamState.CLOSED

    def send_buffered(self, stream_id: int) -> int:
        s = self._streams.get(stream_id)
        return s.send_buffered if s else 0

    def send_window(self, stream_id: int) -> int:
        s = self._streams.get(stream_id)
        return s.send_window if s else 0

    def recv_window(self, stream_id: int) -> int:
        s = self._streams.get(stream_id)
        return s.recv_window if s else 0

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def budget_used(self) -> int:
        return self._budget_used

    @property
    def is_drained(self) -> bool:
        """After a GOAWAY either way, True once no stream is left and nothing to send."""
        going_away = self.local_goaway or self.remote_goaway or self.terminated
        return bool(going_away) and not self._streams and not self._control

    def can_open(self) -> bool:
        return not (self.local_goaway or self.remote_goaway or self.terminated)

    # -- local actions ----------------------------------------------------------------

    def open_stream(self, fields: Dict[str, str], priority: int = Priority.BULK) -> int:
        if self.terminated:
            raise LocalProtocolError("the session is over")
        if self.remote_goaway:
            raise LocalProtocolError("the peer is going away: %s" % self.remote_goaway[2])
        if self.local_goaway:
            raise LocalProtocolError("this session is going away")
        sid = self._next_local_id
        if sid > fr.MAX_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted: open a new session")
        self._next_local_id += 2
        s = _Stream(sid, S.OPENING, Priority(priority))
        self._count_interactive(s, 1)
        self._grant_initial(s)
        self._streams[sid] = s
        self._control.append(fr.encode_open(sid, s.recv_window, s.priority, fields))
        return sid

    def accept(self, stream_id: int, info: Optional[Dict[str, str]] = None) -> None:
        s = self._local(stream_id, I.SEND_ACCEPT)
        self._grant_initial(s)
        self._control.append(fr.encode_accept(stream_id, s.recv_window, info or {}))
        self._queue_if_ready(s)

    def refuse(self, stream_id: int, code: int, message: str) -> None:
        s = self._local(stream_id, I.SEND_REFUSE)
        self._control.append(fr.encode_refuse(stream_id, code, message))
        self._forget(s)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        s = self._local(stream_id, I.SEND_DATA)
        if data:
            if s.send_buffer is None:
                s.send_buffer = deque()
            s.send_buffer.append(memoryview(data))
            s.send_buffered += len(data)
        if end_stream:
            self._local(stream_id, I.SEND_END)
            s.end_pending = True
        self._queue_if_ready(s)

    def end_stream(self, stream_id: int) -> None:
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, code: int = ResetCode.CANCEL, message: str = "") -> None:
        s = self._streams.get(stream_id)
        if s is None or s.state == S.CLOSED and not s.end_pending:
            return  # already gone: resetting twice is harmless
        self._control.append(fr.encode_reset(stream_id, code, message))
        self._forget(s)

    def send_notice(self, stream_id: int, fields: Dict[str, str]) -> None:
        self._local(stream_id, I.SEND_NOTICE)
        self._control.append(fr.encode_notice(stream_id, fields))

    def acknowledge(self, stream_id: int, size: int, now: float) -> bool:
        """The application consumed `size` bytes of the stream: give the peer credit.

        Credit goes out in batches (a WINDOW frame once half the window is consumed);
        returns True when this call queued one."""
        s = self._streams.get(stream_id)
        if s is None or s.state not in _RECV_DATA_STATES:
            return False
        s.consumed += size
        if s.consumed < s.recv_window // 2:
            return False
        increment = s.consumed
        s.rate_bytes += increment
        c = self.config
        elapsed = now - s.rate_start
        if elapsed > 0:
            weight = 1.0 - math.exp(-elapsed / c.window_rate_period)
            s.rate += (s.rate_bytes / elapsed - s.rate) * weight
            s.rate_start = now
            s.rate_bytes = 0
        floor = c.window_rtt_floor if self._interactive else c.bulk_only_window_rtt_floor
        rtt = max(self.min_rtt if self.min_rtt is not None else c.initial_rtt, floor)
        target = s.rate * 2 * rtt
        if target > s.recv_window:
            grow = min(s.recv_window, c.max_window - s.recv_window,
                       c.session_window_limit - self._budget_used)
            if grow > 0:
                s.recv_window += grow
                self._budget_used += grow
                increment += grow
        elif target * 2 < s.recv_window and s.recv_window > c.initial_window:
            # grown on a round trip or a rate that turned out shorter or slower:
            # give back part of what was consumed instead of all of it
            shrink = min(s.recv_window // 2, s.recv_window - c.initial_window, increment // 2)
            s.recv_window -= shrink
            self._budget_used -= shrink
            increment -= shrink
        s.consumed = 0
        s.recv_credit += increment
        self._control.append(fr.encode_window(stream_id, increment))
        return True

    def ping(self, now: float) -> bytes:
        """Queue a PING; returns its opaque bytes."""
        self._ping_counter += 1
        opaque = struct.pack(">Q", self._ping_counter)
        if len(self._pings) >= 16:
            self._pings.pop(next(iter(self._pings)))
        self._pings[opaque] = now
        self._control.append(fr.encode_ping(opaque))
        return opaque

    def probe_rtt(self, now: float) -> None:
        """A PING that only measures the round trip (rtt, min_rtt): its answer makes
        no PingAcknowledged event."""
        opaque = self.ping(now)
        self._probes.intersection_update(self._pings)  # forget those never answered
        self._probes.add(opaque)

    def observe_path_rtt(self, rtt: float) -> None:
        """A round trip measured below the mux (TCP's own minimum, say): a candidate
        for min_rtt that queued bulk data cannot have inflated, as it can a PING's."""
        if rtt > 0 and (self.min_rtt is None or rtt < self.min_rtt):
            self.min_rtt = rtt

    def goaway(self, code: int = ErrorCode.NO_ERROR, message: str = "") -> None:
        """Refuse new streams from now on; the streams already open carry on (drain)."""
        if self.local_goaway or self.terminated:
            return
        self.local_goaway = (code, message)
        self._control.append(fr.encode_goaway(self._last_remote_id, code, message))

    def data_to_send(self, limit: int = 256 * 1024) -> bytes:
        """Frames ready to go: control frames first, then interactive streams, then bulk,
        round-robin within a class, no more than `limit` bytes of data frames."""
        out: List[Union[bytes, memoryview]] = self._control
        self._control = []
        budget = limit
        streams = self._streams
        header = fr.HEADER.pack
        for queue in self._send_queues:
            while queue and budget > 0:
                s = queue.popleft()
                if streams.get(s.id) is not s:
                    continue
                size = min(s.send_window, fr.MAX_PAYLOAD, budget, s.send_buffered)
                end = s.end_pending and size == s.send_buffered
                if size == 0 and not end:
                    s.queued = False  # blocked on credit; WINDOW puts it back
                    continue
                # the DATA frame as a header and views of the buffered bytes: the
                # join below is the only copy
                out.append(header(size << 8, Flag.END_STREAM if end else 0, s.id))
                if size:
                    s.take(size, out)
                budget -= size + fr.HEADER_SIZE
                s.send_window -= size
                if end:
                    s.end_pending = False
                    s.queued = False
                    if s.state == S.CLOSED:
                        self._forget(s)
                elif s.send_buffered and s.send_window:
                    queue.append(s)
                else:
                    s.queued = False
        return b"".join(out)

    # -- timers -----------------------------------------------------------------------

    def next_deadline(self) -> float:
        """When handle_timer() should next be called (absolute time)."""
        c = self.config
        if self._pings:
            return self.last_received + c.keepalive_timeout
        return self.last_received + c.keepalive_interval

    def handle_timer(self, now: float) -> List[ev.Event]:
        if self.terminated:
            return []
        silent = now - self.last_received
        if silent >= self.config.keepalive_timeout:
            return [self._terminate(ErrorCode.KEEPALIVE_TIMEOUT,
                                    "no answer from the peer for %.0f s" % silent)]
        if silent >= self.config.keepalive_interval and not self._pings:
            self.ping(now)
        return []

    # -- receiving --------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> List[ev.Event]:
        """Feed bytes from the peer. A protocol violation ends with a
        ConnectionTerminated event (and a GOAWAY queued), never an exception.

        Consecutive DATA frames of one stream come out as one DataReceived."""
        if self.terminated:
            return []
        self.last_received = now
        raw, error = self._decoder.split(data)
        out: List[ev.Event] = []
        streams = self._streams
        run: List[memoryview] = []  # payloads of consecutive DATA frames of one stream
        run_id = 0
        try:
            for ftype, flags, sid, payload in raw:
                if ftype == 0 and not flags & Flag.END_STREAM:  # 0: FrameType.DATA
                    # The fast path: DATA within the window of a stream that may
                    # receive it, which is all _receive_stream_frame would do with it,
                    # without building a Frame. Anything else (an unknown or closed
                    # stream, more than the window) takes the slow path below, which
                    # keeps the checks and says what is wrong.
                    s = streams.get(sid)
                    size = len(payload)
                    if s is not None and s.state in _RECV_DATA_STATES and size <= s.recv_credit:
                        s.recv_credit -= size
                        if size:
                            if sid != run_id:
                                if run:
                                    out.append(ev.DataReceived(run_id, _join(run)))
                                    run = []
                                run_id = sid
                            run.append(payload)
                        continue
                if run:
                    out.append(ev.DataReceived(run_id, _join(run)))
                    run = []
                    run_id = 0
                frame = fr.decode_payload(ftype, flags, sid, payload.tobytes())
                self._receive_frame(frame, now, out)
                if self.terminated:
                    return out
            if run:
                out.append(ev.DataReceived(run_id, _join(run)))
                run = []
            if error is not None:
                raise error
            if len(self._control) > self.config.max_control_backlog:
                raise RemoteProtocolError(
                    "%d answers queued: the peer sends requests and does not read the answers"
                    % len(self._control), ErrorCode.OVERLOADED)
        except RemoteProtocolError as e:
            if run:  # the frames before the fault were good
                out.append(ev.DataReceived(run_id, _join(run)))
            out.append(self._terminate(e.code, e.message))
        return out

    def _receive_frame(self, f: fr.Frame, now: float, out: List[ev.Event]) -> None:
        t = f.type
        if t == FrameType.PING:
            if f.flags & Flag.ACK:
                sent = self._pings.pop(f.data, None)
                if sent is not None:
                    rtt = max(now - sent, 0.0)
                    self.rtt = rtt if self.rtt is None else 0.875 * self.rtt + 0.125 * rtt
                    if self.min_rtt is None or rtt < self.min_rtt:
                        self.min_rtt = rtt
                    if f.data in self._probes:
                        self._probes.discard(f.data)  # probe_rtt(): no event
                    else:
                        out.append(ev.PingAcknowledged(rtt))
            else:
                self._control.append(fr.encode_ping(f.data, ack=True))
            return
        if t == FrameType.GOAWAY:
            self._receive_goaway(f, out)
            return
        if t == FrameType.OPEN:
            self._receive_open(f, out)
            return
        s = self._streams.get(f.stream_id)
        if s is None:
            if not self._was_used(f.stream_id):
                raise RemoteProtocolError(
                    "%s frame for stream %d, which was never opened" % (t.name, f.stream_id))
            return  # a stream we already closed: frames in flight are dropped
        try:
            self._receive_stream_frame(s, f, now, out)
        except _StreamError as e:
            self._control.append(fr.encode_reset(s.id, e.code, e.message))
            self._forget(s)
            out.append(ev.StreamReset(s.id, e.code, e.message, remote=False))
            out.append(ev.StreamClosed(s.id))

    def _receive_stream_frame(self, s: _Stream, f: fr.Frame, now: float, out: List[ev.Event]) -> None:
        t = f.type
        if t == FrameType.DATA:
            end = bool(f.flags & Flag.END_STREAM)
            if f.data or not end:
                self._remote(s, I.RECV_DATA)
                if len(f.data) > s.recv_credit:
                    raise RemoteProtocolError(
                        "stream %d: %d bytes of DATA with only %d bytes of window"
                        % (s.id, len(f.data), s.recv_credit), ErrorCode.FLOW_CONTROL_ERROR)
                s.recv_credit -= len(f.data)
                if f.data:
                    out.append(ev.DataReceived(s.id, f.data))
            if end:
                self._remote(s, I.RECV_END)
                out.append(ev.StreamEnded(s.id))
                if s.state == S.CLOSED and not s.end_pending:
                    self._forget(s)
                    out.append(ev.StreamClosed(s.id))
        elif t == FrameType.WINDOW:
            if f.window == 0:
                raise RemoteProtocolError("stream %d: WINDOW with an increment of 0" % s.id)
            if s.send_window + f.window > fr.MAX_WINDOW:
                raise RemoteProtocolError("stream %d: window exceeds 2^31-1" % s.id,
                                          ErrorCode.FLOW_CONTROL_ERROR)
            if s.state in (S.OPENING, S.PENDING):
                raise RemoteProtocolError("stream %d: WINDOW before the stream was accepted" % s.id)
            s.send_window += f.window
            self._queue_if_ready(s)
        elif t == FrameType.ACCEPT:
            self._remote(s, I.RECV_ACCEPT, session_error=True)
            s.send_window = f.window
            out.append(ev.StreamAccepted(s.id, f.field_dict()))
            self._queue_if_ready(s)
        elif t == FrameType.REFUSE:
            self._remote(s, I.RECV_REFUSE, session_error=True)
            self._forget(s)
            out.append(ev.StreamRefused(s.id, f.code, f.message))
            out.append(ev.StreamClosed(s.id))
        elif t == FrameType.RESET:
            self._forget(s)
            out.append(ev.StreamReset(s.id, f.code, f.message, remote=True))
            out.append(ev.StreamClosed(s.id))
        elif t == FrameType.NOTICE:
            self._remote(s, I.RECV_NOTICE)
            out.append(ev.NoticeReceived(s.id, f.field_dict()))

    def _receive_open(self, f: fr.Frame, out: List[ev.Event]) -> None:
        sid = f.stream_id
        if (sid % 2 == 1) != (not self.client):
            raise RemoteProtocolError("OPEN for stream %d, which has this side's parity" % sid)
        if sid <= self._last_remote_id:
            raise RemoteProtocolError("OPEN for stream %d, not above %d" % (sid, self._last_remote_id))
        self._last_remote_id = sid
        if f.window > fr.MAX_WINDOW:
            raise RemoteProtocolError("OPEN with a window above 2^31-1", ErrorCode.FLOW_CONTROL_ERROR)
        if self.local_goaway:
            self._control.append(fr.encode_refuse(sid, RefuseCode.GOING_AWAY, "the agent is shutting down"))
            return
        if self._remote_open >= self.config.max_streams:
            self._control.append(fr.encode_refuse(
                sid, RefuseCode.TOO_MANY_STREAMS,
                "too many streams: at most %d per session" % self.config.max_streams))
            return
        s = _Stream(sid, S.PENDING, f.priority)
        self._count_interactive(s, 1)
        s.send_window = f.window
        self._streams[sid] = s
        self._remote_open += 1
        out.append(ev.StreamOpened(sid, f.field_dict(), f.priority))

    def _receive_goaway(self, f: fr.Frame, out: List[ev.Event]) -> None:
        self.remote_goaway = (f.last_stream_id, f.code, f.message)
        out.append(ev.GoAwayReceived(f.last_stream_id, f.code, f.message))
        # our streams above last_stream_id were never seen by the peer
        for s in list(self._streams.values()):
            if self._is_local(s.id) and s.id > f.last_stream_id:
                was_opening = s.state == S.OPENING
                self._forget(s)
                message = "the peer is going away" + (": " + f.message if f.message else "")
                if was_opening:
                    out.append(ev.StreamRefused(s.id, RefuseCode.GOING_AWAY, message))
                else:
                    out.append(ev.StreamReset(s.id, ResetCode.CANCEL, message))
                out.append(ev.StreamClosed(s.id))

    # -- helpers ----------------------------------------------------------------------

    def _is_local(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == self.client

    def _was_used(self, stream_id: int) -> bool:
        if self._is_local(stream_id):
            return stream_id < self._next_local_id
        return stream_id <= self._last_remote_id

    def _local(self, stream_id: int, inp: Input) -> _Stream:
        s = self._streams.get(stream_id)
        if s is None:
            raise LocalProtocolError("stream %d is closed" % stream_id)
        nxt = TRANSITIONS.get((s.state, inp))
        if nxt is None:
            raise LocalProtocolError("cannot %s on stream %d in state %s" % (inp.value, stream_id, s.state.value))
        s.state = nxt
        return s

    def _remote(self, s: _Stream, inp: Input, session_error: bool = False) -> None:
        nxt = TRANSITIONS.get((s.state, inp))
        if nxt is None:
            message = "stream %d: %s in state %s" % (s.id, inp.value, s.state.value)
            if session_error:
                raise RemoteProtocolError(message)
            raise _StreamError(ResetCode.STREAM_CLOSED, message)
        s.state = nxt

    def _grant_initial(self, s: _Stream) -> None:
        c = self.config
        s.rate_start = self.last_received  # the latest time we were told
        window = max(c.min_window, min(c.initial_window, c.session_window_limit - self._budget_used))
        s.recv_window = s.recv_credit = window
        self._budget_used += window

    def _queue_if_ready(self, s: _Stream) -> None:
        if s.queued or s.state in (S.OPENING, S.PENDING):
            return
        if (s.send_buffered and s.send_window) or (s.end_pending and s.send_buffered == 0):
            s.queued = True
            self._send_queues[s.priority].append(s)

    def _count_interactive(self, s: _Stream, change: int) -> None:
        if s.priority == Priority.INTERACTIVE:
            self._interactive += change

    def _forget(self, s: _Stream) -> None:
        s.state = S.CLOSED
        s.end_pending = False
        s.send_buffer = None
        s.send_buffered = 0
        if self._streams.pop(s.id, None) is not None:
            self._budget_used -= s.recv_window
            self._count_interactive(s, -1)
            if not self._is_local(s.id):
                self._remote_open -= 1

    def _terminate(self, code: int, message: str) -> ev.ConnectionTerminated:
        self.terminated = (code, message)
        self._control.append(fr.encode_goaway(self._last_remote_id, code, message))
        for s in list(self._streams.values()):
            self._forget(s)
        return ev.ConnectionTerminated(code, message)
