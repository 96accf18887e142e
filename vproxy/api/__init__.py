"""The Python API for scripts and CI tests: a VM's consoles, guest channels and VNC, sync or async.

    import vproxy.api

    with vproxy.api.connect("vmhost1:7443", cert="alice.pem", key="alice.key", ca="ca.pem") as client:
        with client.console("web1") as console:
            console.login("root", prompt="root@web1:~# ")
            assert console.run("echo $((6*7))") == "42"

    async with await vproxy.api.connect_async("vmhost1:7443", identity="alice") as client:
        console = await client.console("web1")
        ...                                   # the same methods, awaited

docs/API.md is the guide (its examples are run by tests/test_docs_examples.py).

Rules this module keeps:
- One implementation: `AsyncClient` / `AsyncStream` / `AsyncConsole` do the work on
  vproxy.client; the sync `Client` / `Stream` / `Console` run those coroutines on an
  event loop that each sync Client owns in a daemon thread ("vproxy-api") and wait for
  the result. So the sync API works in plain scripts, in pytest, and even inside
  someone else's running event loop (not from its own loop thread: that raises).
- Arguments of `connect` left out are found as the CLI finds them (one resolver,
  vproxy.client.credentials): the environment variables VPROXY_HOST, VPROXY_IDENTITY,
  VPROXY_PKI_DIR, VPROXY_CERT, VPROXY_KEY, VPROXY_CA, VPROXY_CRL, then the client
  configuration file (its [hosts.NAME] entry when the address is a NAME there, then its
  [defaults]); an explicit cert beats an identity, as in the CLI.
- Everything raised on purpose is a vproxy.errors.VproxyError: UserError (cannot
  connect, missing file), ChannelRefused (the agent's code and reason), StreamResetError,
  SessionClosed, ConsoleReadOnly, and vproxy.expect's ExpectTimeout / ExpectEOF /
  LoginFailed.
- Opening retries, for up to ``wait`` seconds, while the agent answers UNAVAILABLE or
  NO_SUCH_VM (a VM still starting); any other refusal is raised at once.
- Input is never dropped silently: on a console opened "rw" where someone else is the
  writer, `send` waits up to WRITER_GRACE seconds for the role (a writer that just
  left may linger at the agent), then raises ConsoleReadOnly; on one opened "ro" it
  raises at once.
- `close()` of a stream waits until what was written has left this side and the
  agent has received it (one ping after it), then resets the stream: the agent still
  delivers those bytes, then drops the viewer at once (a half-close would make a
  console viewer linger). Closing twice is harmless; `write_eof()` half-closes.
- The VNC screenshot is a minimal RFB 3.8 client (security type None: the agent hands
  QEMU the connection with skipauth; raw encoding, 32-bit true colour) and a PNG writer
  made of zlib and struct. Nothing outside the standard library.
"""

import asyncio
import logging
import os
import re
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Optional, Set, Tuple, Union

from vproxy.client import connection as _client
from vproxy.errors import ChannelRefused, SessionClosed, UserError, VproxyError
from .credentials import resolve_credentials, resolve_target_for_api
from .expect import AsyncExpect, Patterns, PatternLike
from vproxy.client.forward import bridge
from vproxy.mux import RefuseCode, ResetCode
from vproxy.net.address import format_host_port

__all__ = [
    "connect",
    "connect_async",
    "Client",
    "AsyncClient",
    "Stream",
    "AsyncStream",
    "Console",
    "AsyncConsole",
    "Listener",
    "AsyncListener",
    "Screenshot",
    "ConsoleReadOnly",
    "RfbError",
    "resolve_credentials",
]

log = logging.getLogger("vproxy.api")

PathLike = Union[str, "os.PathLike[str]"]
LogTarget = Union[None, PathLike, BinaryIO]

#: Refusals worth waiting out: the VM is not there (yet) or its QMP is not ready.
RETRY_CODES = (RefuseCode.UNAVAILABLE, RefuseCode.NO_SUCH_VM)
DEFAULT_WAIT = 10.0
#: Seconds input on a "rw" console that is read-only for now waits for the writer role.
WRITER_GRACE = 2.0


class ConsoleReadOnly(VproxyError):
    """Input on a console where this viewer is read-only: the agent would drop it."""


class RfbError(VproxyError):
    """The VNC server said something this minimal RFB client does not handle."""


# --------------------------------------------------------------------------- async API


def _open_log(target: LogTarget) -> Tuple[Optional[BinaryIO], bool]:
    if target is None:
        return None, False
    if hasattr(target, "write"):
        return target, False  # type: ignore[return-value]
    return open(os.fspath(target), "ab"), True  # type: ignore[arg-type]


class AsyncStream(AsyncExpect):
    """One open channel: the byte stream plus vproxy.expect's methods.

    ``info`` is what the agent's ACCEPT said (for a console: its id, offsets, writer)."""

    def __init__(self, stream: Any, *, name: str, newline: str = "\n", timeout: float = 30.0,
                 log: LogTarget = None):
        logfile, self._own_log = _open_log(log)
        super().__init__(stream, name=name, newline=newline, timeout=timeout, log=logfile)
        self.info: Dict[str, str] = dict(stream.info)
        self._closing = False

    @property
    def closed(self) -> bool:
        return self._closing or self.stream.closed

    async def write_eof(self) -> None:
        """Half-close: send no more (the peer sees end of stream); reading goes on."""
        await self.stream.close()

    async def close(self) -> None:
        """Deliver what was written, then let go of the channel (see the module doc)."""
        if self._closing:
            return
        self._closing = True
        s = self.stream
        try:
            if s.error is None and not s.closed:
                deadline = time.monotonic() + 5.0
                # the session's core still holds what the peer's window did not take yet
                while (s.error is None and s.session._conn.send_buffered(s.stream_id)
                       and time.monotonic() < deadline):
                    await asyncio.sleep(0.01)
                if s.error is None and not s.closed:
                    await s.session.ping(5.0)  # the agent has read all of it
        except (VproxyError, asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            if not s.closed:
                s.reset(ResetCode.CANCEL, "closed by the client")
            if self._own_log and self._x.log is not None:
                self._x.log.close()

    async def __aenter__(self) -> "AsyncStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        return "<%s %s>" % (type(self).__name__, self.name)


class AsyncConsole(AsyncStream):
    """A serial console viewer. ``mode`` is "rw" while this viewer is the writer, "ro"
    otherwise; it follows the agent's notices (writer changes). ``notices`` keeps
    every notice received; ``lost`` counts bytes the ring no longer held for us."""

    def __init__(self, stream: Any, *, name: str, requested_mode: str, **kw: Any):
        super().__init__(stream, name=name, **kw)
        self.requested_mode = requested_mode
        self.mode = self.info.get("mode", requested_mode)
        self.writer = self.info.get("writer", "")
        self.notices: List[Dict[str, str]] = []
        self.lost = 0

    def _take_notice(self, notice: Dict[str, str]) -> None:
        self.notices.append(notice)
        event = notice.get("event")
        if event == "writer-changed":
            self.mode = notice.get("mode", self.mode)
            self.writer = notice.get("writer", "")
        elif event == "read-only":
            self.mode = "ro"
            self.writer = notice.get("writer", self.writer)
        elif event == "lost":
            try:
                self.lost += int(notice.get("bytes", "0"))
            except ValueError:
                pass

    def _on_data(self) -> None:
        for notice in self.stream.pending_notices():
            self._take_notice(notice)

    async def refresh(self) -> None:
        """Take in the notices received so far (mode, writer, lost)."""
        self._on_data()

    async def _check_input(self) -> None:
        self._on_data()
        if self.mode != "ro":
            return
        if self.requested_mode == "ro":
            raise ConsoleReadOnly("%s was opened read-only (mode='ro'): cannot send input" % self.name)
        # A writer that just left may still be lingering at the agent: give it a moment.
        from .expect import ExpectTimeout

        try:
            await self.wait_for_writer(min(WRITER_GRACE, self.timeout))
        except ExpectTimeout:
            raise ConsoleReadOnly(
                "%s is read-only for you: %s is the writer, so input would be dropped; open "
                "it with mode='force' to take over, or wait_for_writer()"
                % (self.name, self.writer or "someone else")) from None

    async def wait_for_writer(self, timeout: Optional[float] = None) -> None:
        """Wait until this viewer is the writer (the current writer left)."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self._on_data()
        while self.mode == "ro":
            left = deadline - time.monotonic()
            if left <= 0:
                from .expect import ExpectTimeout

                raise ExpectTimeout("%s: still read-only after %.1f s (writer: %s)"
                                    % (self.name, timeout, self.writer))
            try:
                notice = await asyncio.wait_for(self.stream.next_notice(), left)
            except asyncio.TimeoutError:
                continue
            self._take_notice(notice)


class AsyncListener:
    """A local TCP listener: each connection is bridged to a new stream of one channel
    (e.g. point a VNC viewer at ``address``)."""

    def __init__(self, client: "AsyncClient", vm: str, channel: str, mode: str):
        self.client = client
        self.vm = vm
        self.channel = channel
        self.mode = mode
        self.connections = 0
        self._server: Optional[asyncio.AbstractServer] = None
        self._tasks: Set["asyncio.Task[Any]"] = set()

    async def _start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port)

    @property
    def host(self) -> str:
        return self._server.sockets[0].getsockname()[0] if self._server else ""

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1] if self._server else 0

    @property
    def address(self) -> str:
        """HOST:PORT to connect to (a VNC viewer wants HOST::PORT)."""
        return format_host_port(self.host, self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        stream = None
        try:
            stream = await self.client.open(self.vm, self.channel, self.mode)
            self.connections += 1
            outcome = await bridge(stream, reader, writer)
            if outcome != "closed":
                log.warning("%s %s of VM %s: %s", self.address, self.channel, self.vm, outcome)
        except (VproxyError, ConnectionError, OSError) as e:
            log.warning("%s %s of VM %s: %s", self.address, self.channel, self.vm, e)
        except asyncio.CancelledError:
            pass
        finally:
            if stream is not None and not stream.closed:
                stream.reset(ResetCode.CANCEL, "local connection closed")
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        await server.wait_closed()

    async def __aenter__(self) -> "AsyncListener":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class Screenshot:
    """A VNC framebuffer: ``width``, ``height``, ``rgb`` (3 bytes per pixel, rows top
    down), ``name`` (the desktop name QEMU gave)."""

    def __init__(self, width: int, height: int, rgb: bytes, name: str = ""):
        self.width, self.height, self.rgb, self.name = width, height, rgb, name

    def colours(self) -> int:
        """How many distinct colours the picture has (1: blank)."""
        rgb = self.rgb
        return len(set(zip(rgb[0::3], rgb[1::3], rgb[2::3])))

    def png(self) -> bytes:
        return encode_png(self.width, self.height, self.rgb)

    def save(self, path: PathLike) -> Path:
        path = Path(path)
        path.write_bytes(self.png())
        return path

    def __repr__(self) -> str:
        return "<Screenshot %dx%d %r>" % (self.width, self.height, self.name)


def encode_png(width: int, height: int, rgb: bytes) -> bytes:
    """An 8-bit RGB PNG (no filtering, zlib level 6)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    stride = width * 3
    raw = b"".join(b"\x00" + rgb[y * stride:(y + 1) * stride] for y in range(height))
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b""))


async def rfb_capture(stream: Any, timeout: float = 30.0) -> Screenshot:
    """One full framebuffer from an RFB server on *stream* (anything with async
    readexactly/write): RFB 3.8, security None, raw encoding, 32-bit true colour."""
    return await asyncio.wait_for(_rfb_capture(stream), timeout)


async def rfb_handshake(stream: Any) -> Tuple[int, int, str]:
    """RFB 3.8 up to the first update request on *stream* (anything with async
    readexactly/write): security None, shared, then SetPixelFormat (32-bit true colour)
    and SetEncodings (raw only). Returns the screen's width, height and name."""
    read = stream.readexactly
    version = await read(12)
    if not re.match(rb"RFB \d{3}\.\d{3}\n", version):
        raise RfbError("not a VNC server: it greeted with %r" % version)
    if version < b"RFB 003.008\n":
        raise RfbError("VNC server speaks %s; this client needs RFB 3.8" % version.decode().strip())
    await stream.write(b"RFB 003.008\n")
    count = (await read(1))[0]
    if count == 0:
        (length,) = struct.unpack(">I", await read(4))
        raise RfbError("the VNC server refused: %s" % (await read(length)).decode("utf-8", "replace"))
    types = await read(count)
    if 1 not in types:
        raise RfbError("the VNC server wants authentication (security types %s)" % list(types))
    await stream.write(b"\x01")  # security None
    (result,) = struct.unpack(">I", await read(4))
    if result != 0:
        (length,) = struct.unpack(">I", await read(4))
        raise RfbError("VNC security handshake failed: %s" % (await read(length)).decode("utf-8", "replace"))
    await stream.write(b"\x01")  # ClientInit: shared
    width, height = struct.unpack(">HH", await read(4))
    await read(16)  # the server's pixel format: we set our own
    (length,) = struct.unpack(">I", await read(4))
    name = (await read(length)).decode("utf-8", "replace")
    # SetPixelFormat: 32 bpp, depth 24, little-endian, true colour, 8 bits each, R<<16 G<<8 B
    await stream.write(struct.pack(">B3xBBBBHHHBBB3x", 0, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0))
    await stream.write(struct.pack(">BxHi", 2, 1, 0))  # SetEncodings: raw only
    return width, height, name


async def _rfb_capture(stream: Any) -> Screenshot:
    read = stream.readexactly
    width, height, name = await rfb_handshake(stream)
    await stream.write(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))  # full update
    pixels = bytearray(width * height * 4)
    covered = 0
    while covered < width * height:
        kind = (await read(1))[0]
        if kind == 0:  # FramebufferUpdate
            (rects,) = struct.unpack(">xH", await read(3))
            for _ in range(rects):
                x, y, w, h, encoding = struct.unpack(">HHHHi", await read(12))
                if encoding != 0:
                    raise RfbError("VNC server sent encoding %d although only raw was asked for" % encoding)
                data = await read(w * h * 4)
                if x + w > width or y + h > height:
                    raise RfbError("VNC rectangle %dx%d+%d+%d outside the %dx%d screen"
                                   % (w, h, x, y, width, height))
                for row in range(h):
                    at = ((y + row) * width + x) * 4
                    pixels[at:at + w * 4] = data[row * w * 4:(row + 1) * w * 4]
                covered += w * h
        elif kind == 1:  # SetColourMapEntries (not for true colour, but skip it)
            _, n = struct.unpack(">xHH", await read(5))
            await read(6 * n)
        elif kind == 2:  # Bell
            pass
        elif kind == 3:  # ServerCutText
            (length,) = struct.unpack(">3xI", await read(7))
            await read(length)
        else:
            raise RfbError("unknown VNC server message type %d" % kind)
    rgb = bytearray(width * height * 3)
    rgb[0::3] = pixels[2::4]
    rgb[1::3] = pixels[1::4]
    rgb[2::3] = pixels[0::4]
    return Screenshot(width, height, bytes(rgb), name)


class AsyncClient:
    """A session with one agent (async). ``raw`` is the vproxy.client.Client underneath."""

    def __init__(self, raw: "_client.Client"):
        self.raw = raw
        self.address = raw.address

    async def list_vms(self) -> List[dict]:
        """The VMs this identity may open, with their consoles, channels and VNC
        (what `vproxy ls --json` shows)."""
        return await self.raw.list_vms()

    async def ping(self) -> float:
        """Round trip to the agent, in seconds."""
        return await self.raw.ping()

    async def open(self, vm: str, channel: str, mode: str = "rw",
                   options: Optional[Dict[str, str]] = None, *, wait: float = 0.0,
                   timeout: float = 30.0) -> Any:
        """A raw vproxy.session.Stream; retries refusals in RETRY_CODES for *wait* s."""
        deadline = time.monotonic() + wait
        delay = 0.1
        while True:
            try:
                return await self.raw.open(vm, channel, mode, options, timeout=timeout)
            except ChannelRefused as e:
                left = deadline - time.monotonic()
                if e.code not in RETRY_CODES or left <= 0:
                    raise
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 1.0)

    async def console(self, vm: str, console: Optional[str] = None, *, mode: str = "rw",
                      replay: Union[None, int, str] = None, offset: Optional[int] = None,
                      wait: float = DEFAULT_WAIT, timeout: float = 30.0,
                      log: LogTarget = None, newline: str = "\r") -> AsyncConsole:
        """Attach to a serial console (default: the VM's first).

        mode: "rw" (the writer unless someone else is; then read-only until they
        leave), "ro", or "force" (take the writer role). replay: the last N bytes the
        agent kept, or "all"; offset: resume from that byte offset. Without either you
        get output from now on. timeout: the default for expect/login/run. log: a path
        or binary file that gets everything received."""
        channel = "console:%s" % console if console else "console"
        options: Dict[str, str] = {}
        if replay is not None:
            options["replay"] = str(replay)
        if offset is not None:
            options["offset"] = str(int(offset))
        stream = await self.open(vm, channel, mode, options, wait=wait)
        name = "console %s of VM %s" % (stream.info.get("console", console or "?"), vm)
        return AsyncConsole(stream, name=name, requested_mode=mode, newline=newline,
                            timeout=timeout, log=log)

    async def channel(self, vm: str, name: str, *, hotplug: bool = False,
                      wait: float = DEFAULT_WAIT, timeout: float = 30.0,
                      log: LogTarget = None, newline: str = "\n") -> AsyncStream:
        """A virtio-serial guest channel by port name (e.g. org.qemu.guest_agent.0);
        hotplug=True adds the port if the VM does not have it."""
        stream = await self.open(vm, "channel:%s" % name, "hotplug" if hotplug else "rw", wait=wait)
        return AsyncStream(stream, name="guest channel %s of VM %s" % (name, vm), newline=newline,
                           timeout=timeout, log=log)

    async def vnc(self, vm: str, *, wait: float = DEFAULT_WAIT, timeout: float = 30.0) -> AsyncStream:
        """One VNC connection to the VM's display: the RFB byte stream."""
        stream = await self.open(vm, "vnc", "rw", wait=wait)
        return AsyncStream(stream, name="VNC display of VM %s" % vm, timeout=timeout)

    async def screenshot(self, vm: str, path: Optional[PathLike] = None, *,
                         wait: float = DEFAULT_WAIT, timeout: float = 30.0) -> Screenshot:
        """The VM's screen through the tunnel; saved as PNG to *path* if given."""
        stream = await self.open(vm, "vnc", "rw", wait=wait)
        try:
            shot = await rfb_capture(stream, timeout)
        except asyncio.TimeoutError:
            raise RfbError("no complete screen from the VNC display of VM %s within %.0f s"
                           % (vm, timeout)) from None
        except asyncio.IncompleteReadError:
            raise RfbError("the VNC display of VM %s closed mid-screen" % vm) from None
        finally:
            if not stream.closed:
                stream.reset(ResetCode.CANCEL, "screenshot taken")
        if path is not None:
            shot.save(path)
        return shot

    async def listen(self, vm: str, channel: str = "vnc", *, host: str = "127.0.0.1",
                     port: int = 0, mode: str = "rw") -> AsyncListener:
        """A local TCP listener whose every connection is a new stream of *channel*
        ("vnc", "console", "channel:NAME", ...). Loopback and a free port by default."""
        listener = AsyncListener(self, vm, channel, mode)
        await listener._start(host, port)
        return listener

    async def close(self) -> None:
        await self.raw.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        return "<AsyncClient %s>" % self.address


async def connect_async(address: Optional[str] = None, *, cert: Optional[PathLike] = None,
                        key: Optional[PathLike] = None, ca: Optional[PathLike] = None,
                        crl: Optional[PathLike] = None, identity: Optional[str] = None,
                        pki_dir: Optional[PathLike] = None, server_name: Optional[str] = None,
                        timeout: float = _client.CONNECT_TIMEOUT) -> AsyncClient:
    """Connect to an agent over mutual TLS (see `resolve_credentials` for defaults)."""
    target = resolve_target_for_api(address, cert=cert, key=key, ca=ca, crl=crl, identity=identity,
                                    pki_dir=pki_dir, server_name=server_name)
    return AsyncClient(await target.connect(timeout=timeout))


# --------------------------------------------------------------------------- sync API


class _LoopThread:
    """An event loop running forever in a daemon thread; `run` waits for a coroutine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="vproxy-api", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            if tasks:
                self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def run(self, coro: Any) -> Any:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("the sync vproxy API was called from its own event loop thread; "
                               "use the async API (vproxy.api.connect_async) there")
        if not self.alive:
            coro.close()
            raise SessionClosed("this vproxy client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except (KeyboardInterrupt, SystemExit):
            future.cancel()
            raise

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


class Stream:
    """The sync face of an AsyncStream: the same methods, without await."""

    def __init__(self, inner: AsyncStream, loop: _LoopThread):
        self._inner = inner
        self._loop = loop

    def _run(self, coro: Any) -> Any:
        return self._loop.run(coro)

    # what was seen / settings
    name = property(lambda self: self._inner.name)
    info = property(lambda self: self._inner.info)
    transcript = property(lambda self: self._inner.transcript, doc="Everything received.")
    before = property(lambda self: self._inner.before)
    after = property(lambda self: self._inner.after)
    match = property(lambda self: self._inner.match)
    match_index = property(lambda self: self._inner.match_index)
    eof = property(lambda self: self._inner.eof)
    closed = property(lambda self: self._inner.closed)
    prompt = property(lambda self: self._inner.prompt,
                      lambda self, value: setattr(self._inner, "prompt", value))
    newline = property(lambda self: self._inner.newline,
                       lambda self, value: setattr(self._inner, "newline", value))
    timeout = property(lambda self: self._inner.timeout,
                       lambda self, value: setattr(self._inner, "timeout", value))

    def read(self, max_bytes: int = 65536, timeout: Optional[float] = None) -> bytes:
        """Up to max_bytes; b"" at end of stream; ExpectTimeout after *timeout* s."""
        return self._run(self._inner.read(max_bytes, timeout))

    def write(self, data: Union[bytes, str]) -> None:
        self._run(self._inner.write(data))

    send = write

    def sendline(self, line: Union[str, bytes] = "") -> None:
        self._run(self._inner.sendline(line))

    def expect(self, patterns: Patterns, timeout: Optional[float] = None) -> Any:
        """Wait for the first of *patterns* (see vproxy.expect); returns the match."""
        return self._run(self._inner.expect(patterns, timeout))

    def read_until(self, pattern: PatternLike, timeout: Optional[float] = None) -> bytes:
        return self._run(self._inner.read_until(pattern, timeout))

    def discard(self) -> bytes:
        return self._inner.discard()

    def login(self, user: str = "root", password: Optional[str] = None, **kw: Any) -> None:
        """See vproxy.expect.AsyncExpect.login."""
        self._run(self._inner.login(user, password, **kw))

    def run(self, command: str, **kw: Any) -> str:
        """See vproxy.expect.AsyncExpect.run: the command's output as text."""
        return self._run(self._inner.run(command, **kw))

    def write_eof(self) -> None:
        self._run(self._inner.write_eof())

    def close(self) -> None:
        if self._loop.alive:
            self._run(self._inner.close())

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return "<%s %s>" % (type(self).__name__, self.name)


class Console(Stream):
    """The sync face of an AsyncConsole."""

    _inner: AsyncConsole

    def _refreshed(self) -> AsyncConsole:
        if self._loop.alive:  # notices are taken in on the loop's thread
            self._run(self._inner.refresh())
        return self._inner

    mode = property(lambda self: self._refreshed().mode,
                    doc='"rw" while this viewer is the writer, else "ro".')
    writer = property(lambda self: self._refreshed().writer, doc="Who writes now.")
    notices = property(lambda self: self._refreshed().notices, doc="Notices received.")
    lost = property(lambda self: self._refreshed().lost, doc="Bytes the agent no longer had.")

    def wait_for_writer(self, timeout: Optional[float] = None) -> None:
        self._run(self._inner.wait_for_writer(timeout))


class Listener:
    """The sync face of an AsyncListener: ``address``, ``host``, ``port``, ``close()``."""

    def __init__(self, inner: AsyncListener, loop: _LoopThread):
        self._inner = inner
        self._loop = loop

    address = property(lambda self: self._inner.address)
    host = property(lambda self: self._inner.host)
    port = property(lambda self: self._inner.port)
    connections = property(lambda self: self._inner.connections)

    def close(self) -> None:
        if self._loop.alive:
            self._loop.run(self._inner.close())

    def __enter__(self) -> "Listener":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Client:
    """A session with one agent, for code without asyncio. Made by `connect`."""

    def __init__(self, inner: AsyncClient, loop: _LoopThread):
        self._inner = inner
        self._loop = loop
        self.address = inner.address

    @property
    def async_client(self) -> AsyncClient:
        return self._inner

    def _run(self, coro: Any) -> Any:
        return self._loop.run(coro)

    def list_vms(self) -> List[dict]:
        return self._run(self._inner.list_vms())

    def ping(self) -> float:
        return self._run(self._inner.ping())

    def console(self, vm: str, console: Optional[str] = None, **kw: Any) -> Console:
        """See AsyncClient.console: mode, replay, offset, wait, timeout, log, newline."""
        return Console(self._run(self._inner.console(vm, console, **kw)), self._loop)

    def channel(self, vm: str, name: str, **kw: Any) -> Stream:
        """See AsyncClient.channel: hotplug, wait, timeout, log, newline."""
        return Stream(self._run(self._inner.channel(vm, name, **kw)), self._loop)

    def vnc(self, vm: str, **kw: Any) -> Stream:
        return Stream(self._run(self._inner.vnc(vm, **kw)), self._loop)

    def screenshot(self, vm: str, path: Optional[PathLike] = None, **kw: Any) -> Screenshot:
        return self._run(self._inner.screenshot(vm, path, **kw))

    def listen(self, vm: str, channel: str = "vnc", **kw: Any) -> Listener:
        return Listener(self._run(self._inner.listen(vm, channel, **kw)), self._loop)

    def close(self) -> None:
        """End the session and stop the loop thread; harmless if already closed."""
        if self._loop.alive:
            try:
                self._run(self._inner.close())
            finally:
                self._loop.stop()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return "<Client %s>" % self.address


def connect(address: Optional[str] = None, *, cert: Optional[PathLike] = None,
            key: Optional[PathLike] = None, ca: Optional[PathLike] = None,
            crl: Optional[PathLike] = None, identity: Optional[str] = None,
            pki_dir: Optional[PathLike] = None, server_name: Optional[str] = None,
            timeout: float = _client.CONNECT_TIMEOUT) -> Client:
    """Connect to an agent over mutual TLS; returns a sync Client (use it in a
    ``with`` block, or call close()). Arguments left out: see `resolve_credentials`."""
    loop = _LoopThread()
    try:
        inner = loop.run(connect_async(address, cert=cert, key=key, ca=ca, crl=crl, identity=identity,
                                       pki_dir=pki_dir, server_name=server_name, timeout=timeout))
    except BaseException:
        loop.stop()
        raise
    return Client(inner, loop)
