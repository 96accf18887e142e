"""The sync API: Client, Stream, Console, Listener and connect (see vproxy.api).

Rules this module keeps:
- Each sync Client owns an event loop in a daemon thread ("vproxy-api") and runs the
  async API's coroutines there, waiting for the result: so it works in plain scripts,
  in pytest, and inside someone else's running event loop; called from its own loop
  thread it raises (use the async API there).
- Closing the Client ends the session and stops the thread; closing twice is harmless.
"""

import asyncio
import threading
from typing import Any, List, Optional, Union

from vproxy.client import connection as _client
from vproxy.errors import SessionClosed

from .asyncapi import AsyncClient, AsyncConsole, AsyncListener, AsyncStream, connect_async
from .credentials import PathLike
from .expect import PatternLike, Patterns
from .rfb import Screenshot


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
