"""In-memory Streams for testing channels without a session (no frames, no sockets).

`stream_pair(request)` gives (client, agent): two objects that keep the Stream contract
of docs/ARCHITECTURE.md towards each other:
- read(max_bytes) returns b"" once the peer half-closed and all was read;
- write(data) waits for credit: at most `window` bytes sit unread at the peer;
- close() half-closes; reset(code, message) ends both directions at once: every later
  (and pending) read/write on either side raises vproxy.errors.StreamResetError(code,
  message), data not yet read is dropped;
- notify(fields) / next_notice() carry NOTICEs, in order (next_notice raises the
  StreamResetError once the stream is reset and no notice is left);
- wait_closed() returns when both directions are closed, or after a reset.

Plus helpers for tests: `read_until`, `read_exactly`, `collect_notices`.
"""

import asyncio
from typing import Dict, List, Optional, Tuple

from vproxy.errors import StreamResetError

try:
    from vproxy.mux import OpenRequest
except ImportError:  # pragma: no cover - before vproxy.mux had it
    from dataclasses import dataclass, field

    @dataclass(frozen=True)
    class OpenRequest:  # type: ignore[no-redef]
        vm: str
        channel: str
        mode: str = "rw"
        options: Dict[str, str] = field(default_factory=dict, hash=False)


_ids = iter(range(1, 1 << 30))


class MemStream:
    def __init__(self, stream_id: int, request: "OpenRequest", window: int):
        self.stream_id = stream_id
        self.request = request
        self.info: Dict[str, str] = {}
        self.window = window
        self.peer: "MemStream" = self  # set by stream_pair
        self._buf = bytearray()  # bytes written by the peer, not yet read
        self._remote_ended = False
        self._local_ended = False
        self._error: Optional[StreamResetError] = None
        self._changed = asyncio.Event()  # anything happened on this side
        self._notices: "asyncio.Queue[Dict[str, str]]" = asyncio.Queue()
        self._closed = asyncio.Event()
        self.bytes_in = 0
        self.bytes_out = 0

    def __repr__(self) -> str:
        return "<MemStream %d %s/%s>" % (self.stream_id, self.request.vm, self.request.channel)

    def _poke(self) -> None:
        self._changed.set()
        if self._error is not None or (self._local_ended and self._remote_ended):
            self._closed.set()

    async def _wait(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    async def read(self, max_bytes: int = 65536) -> bytes:
        while True:
            if self._error is not None:
                raise self._error
            if self._buf:
                data = bytes(self._buf[:max_bytes])
                del self._buf[:max_bytes]
                self.bytes_in += len(data)
                self.peer._poke()  # credit for the writer
                return data
            if self._remote_ended:
                return b""
            await self._wait()

    async def readexactly(self, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            chunk = await self.read(size - len(out))
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(out), size)
            out += chunk
        return bytes(out)

    async def write(self, data: bytes) -> None:
        view = memoryview(bytes(data))
        while view:
            if self._error is not None:
                raise self._error
            if self._local_ended:
                raise StreamResetError(1, "write after close()")
            credit = self.window - len(self.peer._buf)
            if credit <= 0:
                await self._wait()
                continue
            part, view = view[:credit], view[credit:]
            self.peer._buf += part
            self.bytes_out += len(part)
            self.peer._poke()

    async def close(self) -> None:
        if self._local_ended or self._error is not None:
            return
        self._local_ended = True
        self.peer._remote_ended = True
        self.peer._poke()
        self._poke()

    def reset(self, code: int = 0, message: str = "") -> None:
        if self._error is not None:
            return
        err = StreamResetError(code, message)
        for side in (self, self.peer):
            side._error = err
            side._buf.clear()
            side._poke()

    def notify(self, fields: Dict[str, str]) -> None:
        if self._error is not None:
            return
        self.peer._notices.put_nowait(dict(fields))
        self.peer._poke()

    async def next_notice(self) -> Dict[str, str]:
        while True:
            if not self._notices.empty():
                return self._notices.get_nowait()
            if self._error is not None:
                raise self._error
            await self._wait()

    def pending_notices(self) -> List[Dict[str, str]]:
        out = []
        while not self._notices.empty():
            out.append(self._notices.get_nowait())
        return out

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def error(self) -> Optional[StreamResetError]:
        return self._error

    async def wait_closed(self) -> None:
        await self._closed.wait()


def stream_pair(request: "Optional[OpenRequest]" = None, *, window: int = 256 * 1024,
                info: Optional[Dict[str, str]] = None) -> Tuple[MemStream, MemStream]:
    """(client side, agent side) of one stream; *info* is what ACCEPT carried."""
    request = request or OpenRequest("", "test")
    sid = next(_ids)
    client, agent = MemStream(sid, request, window), MemStream(sid, request, window)
    client.peer, agent.peer = agent, client
    client.info = dict(info or {})
    agent.info = dict(info or {})
    return client, agent


async def read_until(stream, needle: bytes, timeout: float = 20.0,
                     buf: Optional[bytearray] = None) -> bytes:
    """Read until *needle*; returns everything up to and including it (the rest stays
    in *buf* when given). Raises asyncio.TimeoutError / EOFError saying what came."""
    if buf is None:
        buf = bytearray()

    async def _go() -> bytes:
        while True:
            i = buf.find(needle)
            if i >= 0:
                out = bytes(buf[: i + len(needle)])
                del buf[: i + len(needle)]
                return out
            chunk = await stream.read(65536)
            if not chunk:
                raise EOFError("EOF before %r; got %r" % (needle, bytes(buf[-500:])))
            buf.extend(chunk)

    try:
        return await asyncio.wait_for(_go(), timeout)
    except asyncio.TimeoutError:
        raise asyncio.TimeoutError("no %r within %.1f s; got %r" % (needle, timeout, bytes(buf[-500:]))) from None


async def read_exactly(stream, n: int, timeout: float = 20.0) -> bytes:
    return await asyncio.wait_for(stream.readexactly(n), timeout)


def collect_notices(stream) -> List[Dict[str, str]]:
    return stream.pending_notices()


async def open_channel(provider, vm: str, channel: str, mode: str = "rw",
                       options: Optional[Dict[str, str]] = None, identity: object = "tester",
                       window: int = 256 * 1024) -> MemStream:
    """What the agent does for one OPEN, over a MemStream pair: `provider.open()` (may
    raise ChannelRefused), then `channel.run()` on the agent side in a task. Returns the
    client side, with ``.info`` from the channel and ``.task`` (the run task)."""
    request = OpenRequest(vm, channel, mode, dict(options or {}))
    ch = await provider.open(request, identity)
    client, agent = stream_pair(request, info=ch.info, window=window)
    client.task = asyncio.ensure_future(ch.run(agent))  # type: ignore[attr-defined]
    client.channel = ch  # type: ignore[attr-defined]
    return client
