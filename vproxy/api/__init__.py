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

The package, one concern per module: asyncapi (AsyncClient, AsyncStream, AsyncConsole,
AsyncListener, connect_async), syncapi (Client, Stream, Console, Listener, connect: the
async API run on a loop thread), credentials (what connect() reads: arguments,
environment, the client configuration file), rfb (Screenshot and its RFB client),
expect (the expect core) and pytest_plugin. Every public name is re-exported here.

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
  SessionClosed, ConsoleReadOnly, and ExpectTimeout / ExpectEOF / LoginFailed (from
  vproxy.api.expect, exported here).
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

import importlib
from typing import TYPE_CHECKING, Any, Dict, List

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
    "ExpectTimeout",
    "ExpectEOF",
    "LoginFailed",
]

#: Where each name lives. The submodules are loaded on first use (PEP 562), so that
#: importing vproxy.api.pytest_plugin, which pytest does at every start through its
#: entry point, does not pull in asyncio, ssl and the client.
_HOMES: Dict[str, str] = {
    "connect": "syncapi", "Client": "syncapi", "Stream": "syncapi", "Console": "syncapi",
    "Listener": "syncapi",
    "connect_async": "asyncapi", "AsyncClient": "asyncapi", "AsyncStream": "asyncapi",
    "AsyncConsole": "asyncapi", "AsyncListener": "asyncapi", "ConsoleReadOnly": "asyncapi",
    "RETRY_CODES": "asyncapi", "DEFAULT_WAIT": "asyncapi", "WRITER_GRACE": "asyncapi",
    "LogTarget": "asyncapi", "log": "asyncapi",
    "Screenshot": "rfb", "RfbError": "rfb", "encode_png": "rfb", "rfb_capture": "rfb",
    "rfb_handshake": "rfb",
    "resolve_credentials": "credentials", "PathLike": "credentials",
    "ExpectTimeout": "expect", "ExpectEOF": "expect", "LoginFailed": "expect",
}

if TYPE_CHECKING:  # what the type checker sees; "X as X" marks a re-export outside __all__
    from .asyncapi import DEFAULT_WAIT as DEFAULT_WAIT
    from .asyncapi import RETRY_CODES as RETRY_CODES
    from .asyncapi import WRITER_GRACE as WRITER_GRACE
    from .asyncapi import AsyncClient, AsyncConsole, AsyncListener, AsyncStream, ConsoleReadOnly
    from .asyncapi import connect_async
    from .asyncapi import LogTarget as LogTarget
    from .asyncapi import log as log
    from .credentials import PathLike as PathLike
    from .credentials import resolve_credentials
    from .expect import ExpectEOF, ExpectTimeout, LoginFailed
    from .rfb import RfbError, Screenshot
    from .rfb import encode_png as encode_png
    from .rfb import rfb_capture as rfb_capture
    from .rfb import rfb_handshake as rfb_handshake
    from .syncapi import Client, Console, Listener, Stream, connect


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError("module %r has no attribute %r" % (__name__, name))
    value = getattr(importlib.import_module("." + home, __name__), name)
    globals()[name] = value  # found once; later lookups do not come here
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_HOMES))
