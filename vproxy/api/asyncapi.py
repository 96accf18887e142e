"""The async API: AsyncClient, its streams, consoles and listeners (see vproxy.api).

Rules this module keeps:
- The work is done here, on vproxy.client; the sync API (vproxy.api.syncapi) only runs
  these coroutines on its own loop.
- Opening retries, for up to ``wait`` seconds, while the agent answers UNAVAILABLE or
  NO_SUCH_VM (a VM still starting); any other refusal is raised at once.
- Input is never dropped silently: on a console opened "rw" where someone else is the
  writer, `send` waits up to WRITER_GRACE seconds for the role, then raises
  ConsoleReadOnly; on one opened "ro" it raises at once.
- `close()` of a stream delivers what was written (the agent has read it: one ping
  after it), then resets the stream; closing twice is harmless.
"""

import asyncio
import logging
import os
import time
from typing import Any, BinaryIO, Dict, List, Optional, Set, Tuple, Union

from vproxy.client import connection as _client
from vproxy.client.forward import bridge
from vproxy.errors import ChannelRefused, VproxyError
from vproxy.mux import RefuseCode, ResetCode
from vproxy.net.address import format_host_port

from .credentials import PathLike, resolve_target_for_api
from .expect import AsyncExpect, ExpectTimeout
from .rfb import RfbError, Screenshot, rfb_capture

log = logging.getLogger("vproxy.api")

LogTarget = Union[None, PathLike, BinaryIO]

#: Refusals worth waiting out: the VM is not there (yet) or its QMP is not ready.
RETRY_CODES = (RefuseCode.UNAVAILABLE, RefuseCode.NO_SUCH_VM)
DEFAULT_WAIT = 10.0
#: The agent's built-in channels (vproxy.agent.builtin.NAMES): channel("", NAME).
BUILTINS = ("sink", "source", "echo")
#: Seconds input on a "rw" console that is read-only for now waits for the writer role.
WRITER_GRACE = 2.0


class ConsoleReadOnly(VproxyError):
    """Input on a console where this viewer is read-only: the agent would drop it."""


def _open_log(target: LogTarget) -> Tuple[Optional[BinaryIO], bool]:
    if target is None:
        return None, False
    if hasattr(target, "write"):
        return target, False  # type: ignore[return-value]
    return open(os.fspath(target), "ab"), True


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
        self._server: Optional["asyncio.base_events.Server"] = None
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


class AsyncClient:
    """A session with one agent (async). ``raw`` is the vproxy.client.AgentClient underneath."""

    def __init__(self, raw: "_client.AgentClient"):
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
        hotplug=True adds the port if the VM does not have it.

        With vm "" (no VM), *name* is one of the agent's built-in channels, which need
        no QEMU (for measuring a link): "sink" (counts what it reads; after your
        write_eof it answers the count as decimal text), "source" (zeros until you
        close) or "echo"."""
        if not vm:
            if name not in BUILTINS:
                raise ValueError("with no VM, the channel is one of the agent's built-ins (%s), not %r"
                                 % (", ".join(BUILTINS), name))
            if hotplug:
                raise ValueError("hotplug is for a VM's guest channels, not the built-in %s" % name)
            stream = await self.open("", name, "rw", wait=wait)
            return AsyncStream(stream, name="built-in channel %s" % name, newline=newline,
                               timeout=timeout, log=log)
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
