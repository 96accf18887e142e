"""TLS connections driven straight on a non-blocking ssl.SSLSocket, for asyncio.

Why this exists
---------------
asyncio's own TLS (``loop.create_connection(ssl=...)``) runs OpenSSL over a memory
BIO and moves every byte through Python buffers; on these machines that halves
throughput (about 520 MB/s) against OpenSSL working on the socket itself (1050-1385
MB/s), and ``ssh -L`` does 488-767 MB/s. It also hides failures: when an asyncio TLS
server refuses a client certificate, the alert OpenSSL produced is not flushed (the
client sees a bare EOF), and the server's handshake failure never reaches our code.

Here OpenSSL reads and writes the socket directly (a non-blocking ``ssl.SSLSocket``),
and the event loop only tells us when the socket is readable or writable
(``loop.add_reader`` / ``add_writer``). That works on any selector event loop (the
default on Unix, and uvloop); Windows' proactor loop has no add_reader.

What that takes
---------------
- TLS can turn a read into a write and a write into a read (post-handshake messages,
  key updates): ``SSLWantWriteError`` from a read waits for writability, and
  ``SSLWantReadError`` from a write waits for readability.
- A write that failed with SSLWantWrite/ReadError must be retried with the same bytes
  (OpenSSL may have sent part of it already), so the block offered stays put until
  OpenSSL takes it whole.
- Decrypted data can sit inside OpenSSL (``SSLSocket.pending()``) while the socket
  itself has nothing more to read: the fd will not wake us for it.
- Closing: flush, send close_notify, half-close the TCP connection, then read and
  discard until the peer closes too (bounded). Closing a socket with unread data makes
  the kernel send a reset that can destroy what we sent last, such as the alert that
  tells a client why its certificate was refused.

A clean close (close_notify: eof_received(), then connection_lost(None)) is told
from a TCP close without it (connection_lost(ssl.SSLEOFError)) only if the context
lacks ssl.OP_IGNORE_UNEXPECTED_EOF, which Python 3.9 sets by default.

Public API: create_connection(), start_server() -> Server, TlsTransport,
HandshakeTimeout.
"""

import asyncio
import collections
import errno
import logging
import socket
import ssl
import threading
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple, TypeVar, Union

from .address import format_sockname

log = logging.getLogger("vproxy.transport")

READ_SIZE = 256 * 1024  # bytes read from OpenSSL per readiness callback, at most
_per_thread = threading.local()


def thread_read_view(user: str, size: int) -> memoryview:
    """This thread's read buffer for *user* ("transport", "session"), *size* bytes,
    made on first use.

    One per thread, not one per connection: a thousand idle sessions would hold
    256 MiB. Not one per process: OpenSSL reads release the GIL. The connections of
    one event loop take turns with it, so each must be done with what it read before
    its callback returns (it copies out what it keeps). Each user has a buffer of its
    own: a transport may read into its own (an alert, while failing a write) while a
    session is still parsing what was read into the session's."""
    view: Optional[memoryview] = getattr(_per_thread, user, None)
    if view is None:
        view = memoryview(bytearray(size))
        setattr(_per_thread, user, view)
    return view
RECORD_SIZE = 16 * 1024  # a full TLS record: small writes are joined up to this
SEND_BLOCK = 256 * 1024  # bytes offered to OpenSSL per SSL_write, at most
WRITE_HIGH_WATER = 256 * 1024  # pause_writing() above this many unsent bytes (resume at 1/4)
CLOSE_TIMEOUT = 30.0  # close(): longest wait to flush and send close_notify
LINGER_TIMEOUT = 2.0  # after our FIN: longest wait for the peer's, reading meanwhile
_CONNLOST_WARN = 5  # warn (once) when this many writes came after close or loss

HandshakeErrorCallback = Callable[[Any, BaseException], None]


def _timeout_bases() -> Tuple[type, ...]:
    # asyncio.TimeoutError is the builtin TimeoutError from Python 3.11 on.
    if issubclass(asyncio.TimeoutError, TimeoutError):
        return (TimeoutError,)
    return (asyncio.TimeoutError, TimeoutError)


class HandshakeTimeout(*_timeout_bases()):  # type: ignore[misc]
    """The TLS handshake did not finish in time: an asyncio.TimeoutError and a
    builtin TimeoutError (so vproxy.security.tls.describe_tls_error() recognises it)."""


# --------------------------------------------------------------------------- handshake

class _Handshake:
    """Drives do_handshake() on a non-blocking SSLSocket from readiness callbacks.

    on_done(exc) is called once: with None on success, or with the exception
    (HandshakeTimeout when `timeout` passes first). Never blocks the loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket,
                 timeout: Optional[float], on_done: Callable[[Optional[BaseException]], None]):
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._on_done: Optional[Callable[[Optional[BaseException]], None]] = on_done
        self._waiting = ""  # "read", "write" or "" (no callback registered)
        self._timer: Optional[asyncio.TimerHandle] = None
        if timeout is not None:
            self._timer = loop.call_later(timeout, self._timed_out, timeout)

    def step(self) -> None:
        try:
            self._sock.do_handshake()
        except ssl.SSLWantReadError:
            self._wait("read")
        except ssl.SSLWantWriteError:
            self._wait("write")
        except Exception as exc:  # SSLError, OSError (reset, EOF, ...)
            self._finish(exc)
        else:
            self._finish(None)

    def cancel(self) -> None:
        """Stop without calling on_done (the caller closes the socket)."""
        self._on_done = None
        self._stop()

    def _wait(self, what: str) -> None:
        if self._waiting == what:
            return
        self._unregister()
        if what == "read":
            self._loop.add_reader(self._fd, self.step)
        else:
            self._loop.add_writer(self._fd, self.step)
        self._waiting = what

    def _unregister(self) -> None:
        if self._waiting == "read":
            self._loop.remove_reader(self._fd)
        elif self._waiting == "write":
            self._loop.remove_writer(self._fd)
        self._waiting = ""

    def _stop(self) -> None:
        self._unregister()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _finish(self, exc: Optional[BaseException]) -> None:
        self._stop()
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done(exc)

    def _timed_out(self, timeout: float) -> None:
        self._timer = None
        self._finish(HandshakeTimeout("the TLS handshake did not finish within %g s" % timeout))


async def _handshake(loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket,
                     timeout: Optional[float]) -> None:
    """Complete the handshake of `sock` or raise its error (HandshakeTimeout too)."""
    done: "asyncio.Future[Optional[BaseException]]" = loop.create_future()

    def on_done(exc: Optional[BaseException]) -> None:
        if not done.done():
            done.set_result(exc)

    handshake = _Handshake(loop, sock, timeout, on_done)
    handshake.step()
    try:
        exc = await done
    except asyncio.CancelledError:
        handshake.cancel()
        raise
    if exc is not None:
        raise exc


# --------------------------------------------------------------------------- closing

class _Linger:
    """Half-closed socket: read and discard until the peer closes, then close it.

    The alert or close_notify we sent is in the kernel; closing the socket while the
    peer's data is still unread would make the kernel answer with a reset, which can
    overtake and destroy it. `timeout` bounds the wait.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float):
        self._loop = loop
        self._sock: Optional[socket.socket] = sock
        self._fd = sock.fileno()
        self._buffer = bytearray(64 * 1024)
        self._timer = loop.call_later(timeout, self._close)
        loop.add_reader(self._fd, self._drain)

    def _drain(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(16):
            try:
                n = sock.recv_into(self._buffer)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                return
            except (OSError, ValueError):
                n = 0
            if not n:
                self._close()
                return

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._timer.cancel()
        self._loop.remove_reader(self._fd)
        sock.close()


def _linger_close(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                  timeout: float = LINGER_TIMEOUT) -> None:
    """Send FIN after whatever we wrote, then close once the peer has closed too."""
    try:
        # On an SSLSocket this also drops the TLS layer: the rest is raw TCP.
        sock.shutdown(socket.SHUT_WR)
    except (OSError, ValueError):
        sock.close()
        return
    _Linger(loop, sock, timeout)


# --------------------------------------------------------------------------- transport

class TlsTransport(asyncio.Transport):
    """An asyncio.Transport over a connected, handshaken, non-blocking SSLSocket.

    Made by create_connection() and start_server(); the protocol gets
    connection_made() from start(). Data reaches the protocol in chunks of up to
    READ_SIZE bytes (several TLS records per call when they are there).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket,
                 protocol: asyncio.BaseProtocol):
        super().__init__(_extra_info(sock))
        self._loop = loop
        self._sock: Optional[ssl.SSLSocket] = sock  # None once we have let go of it
        self._fd = sock.fileno()
        self._ssl_read, self._ssl_write = _ssl_io(sock)
        self._protocol = protocol
        # one read buffer per thread, shared by its transports: _receive copies what it
        # read out before delivering it, so 256 KiB per idle session would be waste
        self._read_view = thread_read_view("transport", READ_SIZE)
        # Unsent data: blocks of bytes (or memoryviews of bytes), and the one block
        # OpenSSL was last offered and did not take: it must be offered again as is.
        self._queue: Deque[Union[bytes, memoryview]] = collections.deque()
        self._offered: Optional[Union[bytes, memoryview]] = None
        self._buffered = 0
        self._high = WRITE_HIGH_WATER
        self._low = WRITE_HIGH_WATER // 4
        self._protocol_paused = False
        self._reading = True  # the protocol has not paused reading
        self._eof = False  # the peer sent close_notify
        self._closing = False  # close() or abort() was called, or the connection failed
        self._read_wants_write = False  # SSL_read needs the socket writable
        self._write_wants_read = False  # SSL_write needs the socket readable
        self._unwrap_wants_write = False  # close_notify is waiting for writability
        self._reader_registered = False
        self._writer_registered = False
        self._lost_scheduled = False
        self._close_timer: Optional[asyncio.TimerHandle] = None
        self._writes_after_loss = 0

    def __repr__(self) -> str:
        state = "closing" if self._closing else "open"
        return "<TlsTransport fd=%d %s peer=%s>" % (self._fd, state, self.get_extra_info("peername"))

    def start(self) -> None:
        """Tell the protocol; start reading."""
        try:
            self._protocol.connection_made(self)
        except Exception as exc:
            self._fatal(exc, "protocol.connection_made() failed")
            return
        self._update_interest()
        # The handshake may have left decrypted data inside OpenSSL.
        self._loop.call_soon(self._on_readable)

    # -- asyncio.Transport: writing ---------------------------------------------------

    def write(self, data: Union[bytes, bytearray, memoryview]) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("data must be bytes-like, not %s" % type(data).__name__)
        if self._closing:
            self._writes_after_loss += 1
            if self._writes_after_loss == _CONNLOST_WARN:
                log.warning("%r: write() after close or loss (ignored, and not said again)",
                            self)
            return
        if not data:
            return
        if type(data) is not bytes:
            data = bytes(data)  # the caller may change its buffer after we return
        self._queue.append(data)
        self._buffered += len(data)
        if self._buffered == len(data):  # nothing was waiting: send now
            self._send()
            self._update_interest()
        self._maybe_pause_protocol()

    def writelines(self, list_of_data: Iterable[Union[bytes, bytearray, memoryview]]) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS transports do not half-close; use close()")

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def get_write_buffer_limits(self) -> Tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: Optional[int] = None, low: Optional[int] = None) -> None:
        if high is None:
            high = WRITE_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError("high (%r) must be >= low (%r) must be >= 0" % (high, low))
        self._high, self._low = high, low
        self._maybe_pause_protocol()

    # -- asyncio.Transport: reading ---------------------------------------------------

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    def pause_reading(self) -> None:
        if self._closing or not self._reading:
            return
        self._reading = False
        self._update_interest()

    def resume_reading(self) -> None:
        if self._closing or self._reading:
            return
        self._reading = True
        self._update_interest()
        self._loop.call_soon(self._on_readable)  # OpenSSL may hold data already

    # -- asyncio.Transport: lifetime --------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Send what is buffered, then close_notify, then close (connection_lost(None))."""
        if self._closing:
            return
        self._closing = True
        self._close_timer = self._loop.call_later(CLOSE_TIMEOUT, self._close_timed_out)
        if not self._buffered:
            self._send_close_notify()
        else:
            self._update_interest()

    def abort(self) -> None:
        """Close now, dropping buffered data (connection_lost(None))."""
        self._force_close(None)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    # -- readiness --------------------------------------------------------------------

    def _update_interest(self) -> None:
        """Register for exactly the readiness events the current state needs."""
        if self._sock is None:
            return
        want_read = self._write_wants_read or (
            not self._read_wants_write and not self._eof and (self._reading or self._closing))
        want_write = (self._read_wants_write or self._unwrap_wants_write
                      or (self._buffered > 0 and not self._write_wants_read))
        if want_read != self._reader_registered:
            if want_read:
                self._loop.add_reader(self._fd, self._on_readable)
            else:
                self._loop.remove_reader(self._fd)
            self._reader_registered = want_read
        if want_write != self._writer_registered:
            if want_write:
                self._loop.add_writer(self._fd, self._on_writable)
            else:
                self._loop.remove_writer(self._fd)
            self._writer_registered = want_write

    def _on_readable(self) -> None:
        if self._sock is None:
            return
        if self._write_wants_read:
            self._write_wants_read = False
            self._send()
        if self._sock is not None and not self._read_wants_write and not self._eof \
                and (self._reading or self._closing):
            self._receive()
        self._update_interest()

    def _on_writable(self) -> None:
        if self._sock is None:
            return
        if self._read_wants_write:
            self._read_wants_write = False
            if self._reading or self._closing:
                self._receive()
        if self._sock is not None and self._unwrap_wants_write:
            self._unwrap_wants_write = False
            self._send_close_notify()
        elif self._sock is not None and self._buffered and not self._write_wants_read:
            self._send()
        self._update_interest()

    # -- receiving --------------------------------------------------------------------

    def _receive(self) -> None:
        """Read what OpenSSL has, up to READ_SIZE, and hand it to the protocol.

        An asyncio.BufferedProtocol gets it in the buffer it gives (get_buffer(),
        buffer_updated()): no copy here and no new bytes object per read."""
        sock = self._sock
        assert sock is not None
        read = self._ssl_read
        buffered = isinstance(self._protocol, asyncio.BufferedProtocol)
        if buffered:
            try:
                view = memoryview(self._protocol.get_buffer(READ_SIZE))  # type: ignore[attr-defined]
                if not len(view):
                    raise RuntimeError("get_buffer() returned an empty buffer")
            except Exception as exc:
                self._fatal(exc, "protocol.get_buffer() failed")
                return
        else:
            view = self._read_view
        size = len(view)
        filled = 0
        error: Optional[Exception] = None
        eof = False
        while filled < size:
            try:
                n = read(size - filled, view[filled:])
            except ssl.SSLWantReadError:
                break
            except ssl.SSLWantWriteError:
                self._read_wants_write = True
                break
            except (BlockingIOError, InterruptedError):
                break
            except Exception as exc:  # alert (SSLError), reset, ragged EOF (SSLEOFError)
                error = exc
                break
            if not n:
                eof = True
                break
            filled += n
        if filled and not self._closing:
            if buffered:
                try:
                    self._protocol.buffer_updated(filled)  # type: ignore[attr-defined]
                except Exception as exc:
                    self._fatal(exc, "protocol.buffer_updated() failed")
            else:
                self._deliver(bytes(view[:filled]))
        if self._sock is None:  # the protocol aborted
            return
        if error is not None:
            self._fatal(error)
        elif eof:
            self._eof_received()
        elif filled == size and sock.pending():
            # The rest of a record is inside OpenSSL: the fd will not tell us.
            self._loop.call_soon(self._on_readable)

    def _deliver(self, data: bytes) -> None:
        try:
            self._protocol.data_received(data)  # type: ignore[attr-defined]
        except Exception as exc:
            self._fatal(exc, "protocol.data_received() failed")

    def _eof_received(self) -> None:
        self._eof = True
        if self._closing:
            return
        try:
            keep_open = self._protocol.eof_received()  # type: ignore[attr-defined]
        except Exception as exc:
            self._fatal(exc, "protocol.eof_received() failed")
            return
        if not keep_open:
            self.close()

    # -- sending ----------------------------------------------------------------------

    def _send(self) -> None:
        """Offer buffered data to OpenSSL until all is sent or the socket is full."""
        write = self._ssl_write
        while self._buffered:
            block = self._offered
            if block is None:
                block = self._offered = self._next_block()
            try:
                n = write(block)
            except ssl.SSLWantWriteError:
                break
            except ssl.SSLWantReadError:
                self._write_wants_read = True
                break
            except (BlockingIOError, InterruptedError):
                break
            except Exception as exc:  # EPIPE, ECONNRESET, SSLError
                self._write_failed(exc)
                return
            self._buffered -= n
            # OpenSSL takes the whole block (no partial-write mode); be safe anyway.
            self._offered = None if n >= len(block) else memoryview(block)[n:]
        self._maybe_resume_protocol()
        if self._closing and not self._buffered and self._sock is not None:
            self._send_close_notify()

    def _next_block(self) -> Union[bytes, memoryview]:
        """The next block to offer: at most SEND_BLOCK bytes, small writes joined."""
        queue = self._queue
        block = queue.popleft()
        if len(block) > SEND_BLOCK:
            view = memoryview(block)
            queue.appendleft(view[SEND_BLOCK:])
            return view[:SEND_BLOCK]
        if len(block) >= RECORD_SIZE or not queue:
            return block
        parts = [block]
        size = len(block)
        while queue and size < RECORD_SIZE and size + len(queue[0]) <= SEND_BLOCK:
            block = queue.popleft()
            parts.append(block)
            size += len(block)
        return b"".join(parts)

    def _write_failed(self, exc: Exception) -> None:
        """The peer is gone. If it told us why (a TLS alert), report that instead."""
        self._queue.clear()
        self._offered = None
        self._buffered = 0
        alert = self._pending_alert()
        self._fatal(alert if alert is not None else exc)

    def _pending_alert(self) -> Optional[ssl.SSLError]:
        """An alert waiting in the socket, e.g. the server refused our certificate
        (TLS 1.3 tells the client only after its handshake) and closed while we wrote."""
        sock = self._sock
        assert sock is not None
        for _ in range(64):
            try:
                if not sock.recv_into(self._read_view):
                    return None
            except ssl.SSLEOFError:
                return None
            except ssl.SSLError as exc:
                if isinstance(exc, (ssl.SSLWantReadError, ssl.SSLWantWriteError)):
                    return None
                return exc
            except (OSError, ValueError):
                return None
        return None

    def _maybe_pause_protocol(self) -> None:
        if self._buffered > self._high and not self._protocol_paused:
            self._protocol_paused = True
            self._call_protocol("pause_writing")

    def _maybe_resume_protocol(self) -> None:
        if self._protocol_paused and self._buffered <= self._low:
            self._protocol_paused = False
            self._call_protocol("resume_writing")

    def _call_protocol(self, method: str) -> None:
        try:
            getattr(self._protocol, method)()
        except Exception as exc:
            self._loop.call_exception_handler({
                "message": "protocol.%s() failed" % method,
                "exception": exc, "transport": self, "protocol": self._protocol,
            })

    # -- closing ----------------------------------------------------------------------

    def _send_close_notify(self) -> None:
        sock = self._sock
        assert sock is not None
        try:
            sock.unwrap()
        except ssl.SSLWantWriteError:
            self._unwrap_wants_write = True
            self._update_interest()
            return
        except ssl.SSLWantReadError:
            pass  # sent; the peer's close_notify has not come (we do not wait for it)
        except (OSError, ValueError):
            pass  # the peer is gone: nothing more can be said
        self._let_go()
        _linger_close(self._loop, sock)
        self._schedule_connection_lost(None)

    def _close_timed_out(self) -> None:
        self._close_timer = None
        log.debug("%r: could not flush within %g s; aborting", self, CLOSE_TIMEOUT)
        self._force_close(None)

    def _fatal(self, exc: Exception, message: Optional[str] = None) -> None:
        if message is not None:
            self._loop.call_exception_handler({
                "message": message, "exception": exc,
                "transport": self, "protocol": self._protocol,
            })
        else:
            log.debug("%r: %s", self, exc)
        self._force_close(exc)

    def _force_close(self, exc: Optional[Exception]) -> None:
        sock = self._sock
        if sock is None:
            return
        self._let_go()
        sock.close()
        self._schedule_connection_lost(exc)

    def _let_go(self) -> None:
        """Unregister and forget the socket (whoever called us closes it)."""
        self._closing = True
        self._queue.clear()
        self._offered = None
        self._buffered = 0
        if self._reader_registered:
            self._loop.remove_reader(self._fd)
            self._reader_registered = False
        if self._writer_registered:
            self._loop.remove_writer(self._fd)
            self._writer_registered = False
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._sock = None

    def _schedule_connection_lost(self, exc: Optional[Exception]) -> None:
        if not self._lost_scheduled:
            self._lost_scheduled = True
            self._loop.call_soon(self._protocol.connection_lost, exc)


def _ssl_io(sock: ssl.SSLSocket) -> Tuple[Callable[[int, Any], int], Callable[[Any], int]]:
    """read(n, buffer) and write(data) of the connection.

    SSLSocket.recv_into() and send() are Python wrappers around the C object's read()
    and write(); calling those directly saves two Python calls per 16 KiB TLS record.
    (With suppress_ragged_eofs=False, as here, the wrappers add nothing else.)
    """
    sslobj = getattr(sock, "_sslobj", None)
    if sslobj is not None and hasattr(sslobj, "read") and hasattr(sslobj, "write"):
        return sslobj.read, sslobj.write
    return (lambda n, buffer: sock.recv_into(buffer, n)), sock.send


def _extra_info(sock: ssl.SSLSocket) -> Dict[str, Any]:
    try:
        peername = sock.getpeername()
    except OSError:
        peername = None
    return {
        "socket": sock,
        "ssl_object": sock,
        "sslcontext": sock.context,
        "peercert": sock.getpeercert(),
        "cipher": sock.cipher(),
        "compression": sock.compression(),
        "peername": peername,
        "sockname": sock.getsockname(),
    }


def _prepare(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not TCP (a socketpair in tests)


# --------------------------------------------------------------------------- client

_Protocol = TypeVar("_Protocol", bound=asyncio.BaseProtocol)


async def create_connection(protocol_factory: Callable[[], _Protocol],
                            host: str, port: int, ssl_context: ssl.SSLContext,
                            server_hostname: Optional[str],
                            handshake_timeout: Optional[float] = 10.0,
                            ) -> Tuple[TlsTransport, _Protocol]:
    """Connect over TCP, do the TLS handshake, return (transport, protocol).

    Raises the original error: ssl.SSLError (ssl.SSLCertVerificationError...),
    OSError (ConnectionRefusedError...), or HandshakeTimeout (an asyncio.TimeoutError)
    when the handshake takes longer than handshake_timeout. The TCP connect itself is
    not bounded here: wrap the call in asyncio.wait_for() for an overall limit.
    """
    loop = asyncio.get_running_loop()
    raw = await _connect_tcp(loop, host, port)
    try:
        sock = ssl_context.wrap_socket(raw, server_side=False, server_hostname=server_hostname,
                                       do_handshake_on_connect=False, suppress_ragged_eofs=False)
    except BaseException:
        raw.close()
        raise
    try:
        await _handshake(loop, sock, handshake_timeout)
        protocol = protocol_factory()
    except BaseException:
        sock.close()
        raise
    transport = TlsTransport(loop, sock, protocol)
    transport.start()
    return transport, protocol


async def _connect_tcp(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket to the first address of host that answers."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError("getaddrinfo(%r) returned no addresses" % host)
    errors: List[OSError] = []
    for family, type_, proto, _, address in infos:
        sock = socket.socket(family, type_, proto)
        try:
            _prepare(sock)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            errors.append(exc)
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    if len({e.errno for e in errors}) == 1:
        raise errors[-1]
    raise OSError("cannot connect to %s port %d: %s"
                  % (host, port, "; ".join(str(e) for e in errors)))


# --------------------------------------------------------------------------- server

class Server:
    """Listening sockets; every accepted connection gets its own handshake, bounded
    by handshake_timeout, then a TlsTransport and a protocol from the factory."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sockets: List[socket.socket],
                 protocol_factory: Callable[[], asyncio.BaseProtocol],
                 ssl_context: ssl.SSLContext, handshake_timeout: Optional[float],
                 on_handshake_error: Optional[HandshakeErrorCallback], backlog: int):
        self._loop = loop
        self._sockets = sockets
        self._factory = protocol_factory
        self._context = ssl_context
        self._handshake_timeout = handshake_timeout
        self._on_handshake_error = on_handshake_error
        self._backlog = backlog
        self._handshakes: Dict[_Handshake, ssl.SSLSocket] = {}
        self._serving = False
        self._closed = loop.create_future()

    @property
    def sockets(self) -> Tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    @property
    def context(self) -> ssl.SSLContext:
        return self._context

    def set_context(self, ssl_context: ssl.SSLContext) -> None:
        """Use ssl_context for connections accepted from now on (a reload). Handshakes
        under way and connections already made keep the context they started with."""
        self._context = ssl_context

    def close(self) -> None:
        """Stop listening and drop the handshakes in progress. Connections already
        made stay up (as with asyncio's Server)."""
        if self._closed.done():
            return
        self._serving = False
        for sock in self._sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets = []
        for handshake, sock in list(self._handshakes.items()):
            handshake.cancel()
            sock.close()
        self._handshakes.clear()
        self._closed.set_result(None)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    async def __aenter__(self) -> "Server":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    def _start(self) -> None:
        self._serving = True
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(self._backlog):
            try:
                conn, peer = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: stop accepting for a moment, don't spin.
                    log.error("cannot accept connections: %s; retrying in 1 s", exc)
                    self._loop.remove_reader(listener.fileno())
                    self._loop.call_later(1.0, self._resume_accepting, listener)
                    return
                log.warning("accept() failed: %s", exc)
                return
            self._start_handshake(conn, peer)

    def _resume_accepting(self, listener: socket.socket) -> None:
        if self._serving and listener in self._sockets:
            self._loop.add_reader(listener.fileno(), self._accept, listener)

    def _start_handshake(self, conn: socket.socket, peer: Any) -> None:
        try:
            _prepare(conn)
            sock = self._context.wrap_socket(conn, server_side=True,
                                             do_handshake_on_connect=False,
                                             suppress_ragged_eofs=False)
        except Exception as exc:
            conn.close()
            self._report(peer, exc)
            return

        def done(exc: Optional[BaseException]) -> None:
            self._handshakes.pop(handshake, None)
            self._handshake_done(sock, peer, exc)

        handshake = _Handshake(self._loop, sock, self._handshake_timeout, done)
        self._handshakes[handshake] = sock
        handshake.step()

    def _handshake_done(self, sock: ssl.SSLSocket, peer: Any,
                        exc: Optional[BaseException]) -> None:
        if exc is not None:
            self._report(peer, exc)
            if isinstance(exc, HandshakeTimeout):
                sock.close()
            else:
                _linger_close(self._loop, sock)  # let the alert reach the client
            return
        try:
            protocol = self._factory()
        except Exception:
            log.exception("protocol factory failed for a connection from %s", format_sockname(peer))
            sock.close()
            return
        TlsTransport(self._loop, sock, protocol).start()

    def _report(self, peer: Any, exc: BaseException) -> None:
        if self._on_handshake_error is None:
            log.warning("TLS handshake with %s failed: %s", format_sockname(peer), exc)
            return
        try:
            self._on_handshake_error(peer, exc)
        except Exception:
            log.exception("on_handshake_error callback failed")


async def start_server(protocol_factory: Callable[[], asyncio.BaseProtocol],
                       host: Optional[str], port: int, ssl_context: ssl.SSLContext,
                       handshake_timeout: Optional[float] = 5.0,
                       on_handshake_error: Optional[HandshakeErrorCallback] = None,
                       backlog: int = 1024) -> Server:
    """Listen on host:port (every address of host; all interfaces for None or "").

    Each accepted connection does its TLS handshake without blocking the loop and is
    dropped if it has not finished after handshake_timeout seconds. A failed handshake
    calls on_handshake_error(peername, exc) (default: log a warning); the alert OpenSSL
    produced reaches the client before the socket is closed.
    """
    loop = asyncio.get_running_loop()
    sockets = await _listen(loop, host or None, port, backlog)
    server = Server(loop, sockets, protocol_factory, ssl_context, handshake_timeout,
                    on_handshake_error, backlog)
    server._start()
    return server


async def _listen(loop: asyncio.AbstractEventLoop, host: Optional[str], port: int,
                  backlog: int) -> List[socket.socket]:
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    sockets: List[socket.socket] = []
    seen = set()
    try:
        for family, type_, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, type_, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(exc.errno, "cannot listen on %s: %s"
                              % (format_sockname(address), exc.strerror)) from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


__all__ = ["TlsTransport", "Server", "HandshakeTimeout", "create_connection", "start_server"]
