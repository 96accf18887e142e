"""vproxy.transport over real TLS 1.3 connections on 127.0.0.1.

Each test runs its own event loop (asyncio.run) with both ends in it: a server from
transport.start_server() and clients from transport.create_connection().
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import threading
import time
from typing import Callable, List, Optional, Tuple

import pytest

from support.aio import run
from vproxy.net import transport
from vproxy.security.tls import describe_tls_error

MiB = 1024 * 1024


class Recorder(asyncio.Protocol):
    """Records everything a transport tells it."""

    def __init__(self) -> None:
        loop = asyncio.get_event_loop()
        self.transport: Optional[transport.TlsTransport] = None
        self.made = loop.create_future()
        self.lost = loop.create_future()  # result: the exception (or None)
        self.data = bytearray()
        self.eof = False
        self.calls: List[str] = []
        self._waiters: List[Tuple[int, asyncio.Future]] = []

    def connection_made(self, t) -> None:
        self.calls.append("connection_made")
        self.transport = t
        self.made.set_result(None)

    def data_received(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        assert not self.eof and not self.lost.done()
        self.data += data
        for size, fut in self._waiters:
            if len(self.data) >= size and not fut.done():
                fut.set_result(None)

    def eof_received(self) -> bool:
        self.calls.append("eof_received")
        self.eof = True
        return False

    def connection_lost(self, exc) -> None:
        self.calls.append("connection_lost")
        assert not self.lost.done(), "connection_lost called twice"
        self.lost.set_result(exc)

    async def received(self, size: int) -> bytes:
        if len(self.data) < size:
            fut = asyncio.get_event_loop().create_future()
            self._waiters.append((size, fut))
            await asyncio.wait([fut, self.lost], return_when=asyncio.FIRST_COMPLETED)
        return bytes(self.data)


class Echo(asyncio.Protocol):
    def connection_made(self, t) -> None:
        self.transport = t

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class Servers:
    """Collects what start_server() produced: protocols and handshake failures."""

    def __init__(self, factory: Callable[[], asyncio.Protocol]):
        self.factory = factory
        self.protocols: List[asyncio.Protocol] = []
        self.failures: List[Tuple[object, BaseException]] = []
        self.failed = asyncio.Event()

    def make(self) -> asyncio.Protocol:
        protocol = self.factory()
        self.protocols.append(protocol)
        return protocol

    def on_handshake_error(self, peer, exc) -> None:
        self.failures.append((peer, exc))
        self.failed.set()


async def serve(pki, factory: Callable[[], asyncio.Protocol] = Echo, **kwargs):
    """(server, port, Servers) for a server on 127.0.0.1 with the test PKI."""
    record = Servers(factory)
    server = await transport.start_server(record.make, "127.0.0.1", 0, pki.server_context(),
                                          on_handshake_error=record.on_handshake_error,
                                          **kwargs)
    return server, server.sockets[0].getsockname()[1], record


async def connect(pki, port: int, factory: Callable[[], asyncio.Protocol] = Recorder,
                  pair=None, **kwargs):
    return await transport.create_connection(factory, "127.0.0.1", port,
                                             pki.client_context(pair), "localhost", **kwargs)


# --------------------------------------------------------------------------- basics

def test_echo_round_trip(pki):
    async def main():
        server, port, record = await serve(pki)
        t, p = await connect(pki, port)
        assert p.calls == ["connection_made"] and p.transport is t
        t.write(b"hello, ")
        t.write(bytearray(b"world"))
        t.write(memoryview(b"!"))
        assert await p.received(13) == b"hello, world!"

        ssl_object = t.get_extra_info("ssl_object")
        assert isinstance(ssl_object, ssl.SSLSocket)
        assert ssl_object.version() == "TLSv1.3"
        assert ssl_object.selected_alpn_protocol() == "vproxy/1"
        assert t.get_extra_info("socket") is ssl_object
        assert t.get_extra_info("peername") == ("127.0.0.1", port)
        assert t.get_extra_info("sockname")[0] == "127.0.0.1"
        assert dict(x[0] for x in t.get_extra_info("peercert")["subject"])["commonName"] \
            == "localhost"
        assert ssl_object.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert t.get_extra_info("nothing", "default") == "default"

        assert not t.is_closing()
        t.close()
        assert t.is_closing()
        assert await p.lost is None
        assert p.calls == ["connection_made", "connection_lost"]
        server.close()
        await server.wait_closed()
        assert record.failures == []

    run(main())


def test_server_sees_the_client_identity_and_clean_close(pki):
    async def main():
        server, port, record = await serve(pki, Recorder)
        t, p = await connect(pki, port, pair=pki.bob)
        t.write(b"x")
        while not record.protocols:
            await asyncio.sleep(0.01)
        sp = record.protocols[0]
        assert await sp.received(1) == b"x"
        peercert = sp.transport.get_extra_info("peercert")
        assert dict(x[0] for x in peercert["subject"])["commonName"] == "bob"
        t.close()
        assert await sp.lost is None  # close_notify: eof_received, then a clean close
        assert sp.calls == ["connection_made", "eof_received", "connection_lost"]
        assert await p.lost is None
        server.close()

    run(main())


def test_write_after_close_is_ignored_and_abort_is_immediate(pki):
    async def main():
        server, port, _ = await serve(pki)
        t, p = await connect(pki, port)
        t.write(b"x" * MiB)
        t.abort()
        assert t.is_closing() and t.get_write_buffer_size() == 0
        t.write(b"ignored")
        assert await p.lost is None
        server.close()

    run(main())


# --------------------------------------------------------------------------- bulk, flow control

class BulkPeer(asyncio.Protocol):
    """Sends `total` bytes (random blocks, each prefixed with its number) honouring
    pause_writing, while hashing what it receives; closes once it has sent all and
    received `total` bytes. Checks each pause/resume against the transport's buffer."""

    CHUNK = 64 * 1024

    def __init__(self, total: int, seed: bytes, pause_reading_for: float = 0.0):
        self.total = total
        self.block = hashlib.sha256(seed).digest() * (self.CHUNK // 32)
        self.pause_reading_for = pause_reading_for
        self.sent = 0
        self.sent_hash = hashlib.sha256()
        self.received = 0
        self.received_hash = hashlib.sha256()
        self.paused = False
        self.pauses = 0
        self.resumes = 0
        self.max_buffer = 0
        self.data_while_paused = 0
        self.reading_paused = False
        self.transport = None
        self.done = asyncio.get_event_loop().create_future()

    def connection_made(self, t) -> None:
        self.transport = t
        if self.pause_reading_for:
            t.pause_reading()
            self.reading_paused = True
            asyncio.get_event_loop().call_later(self.pause_reading_for, self._resume_reading)
        self._pump()

    def _resume_reading(self) -> None:
        self.reading_paused = False
        self.transport.resume_reading()

    def pause_writing(self) -> None:
        size = self.transport.get_write_buffer_size()
        assert size > self.transport.get_write_buffer_limits()[1]
        assert not self.paused
        self.paused = True
        self.pauses += 1

    def resume_writing(self) -> None:
        assert self.paused
        assert self.transport.get_write_buffer_size() <= self.transport.get_write_buffer_limits()[0]
        self.paused = False
        self.resumes += 1
        asyncio.get_event_loop().call_soon(self._pump)

    def _pump(self) -> None:
        t = self.transport
        while not self.paused and self.sent < self.total and not t.is_closing():
            size = min(self.CHUNK, self.total - self.sent)
            chunk = (self.sent // self.CHUNK).to_bytes(8, "big") + self.block[8:size]
            chunk = chunk[:size]
            self.sent_hash.update(chunk)
            self.sent += size
            t.write(chunk)
            self.max_buffer = max(self.max_buffer, t.get_write_buffer_size())
        self._maybe_done()

    def data_received(self, data: bytes) -> None:
        if self.reading_paused:
            self.data_while_paused += len(data)
        self.received += len(data)
        self.received_hash.update(data)
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.sent == self.total and self.received >= self.total and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("closed early"))


def test_64_mib_each_way_intact_with_flow_control(pki):
    total = 64 * MiB

    async def main():
        server, port, record = await serve(pki, lambda: BulkPeer(total, b"server"))
        # The client does not read for a while: the server's writes must back up.
        t, client = await connect(pki, port, lambda: BulkPeer(total, b"client", 0.3))
        while not record.protocols:
            await asyncio.sleep(0.01)
        peer = record.protocols[0]
        await asyncio.gather(client.done, peer.done)

        assert client.received == peer.sent == total
        assert peer.received == client.sent == total
        assert client.received_hash.digest() == peer.sent_hash.digest()
        assert peer.received_hash.digest() == client.sent_hash.digest()
        assert client.data_while_paused == 0  # pause_reading() was honoured
        for side in (client, peer):
            assert side.pauses >= 1 and side.resumes >= 1
            # The protocol stops when asked: the buffer never exceeds high + one write.
            assert side.max_buffer <= transport.WRITE_HIGH_WATER + BulkPeer.CHUNK
        t.close()
        server.close()

    run(main(), timeout=120)


def test_close_flushes_pending_data(pki):
    payload = os.urandom(8 * MiB)

    class SendAndClose(asyncio.Protocol):
        def connection_made(self, t) -> None:
            t.write(payload)
            self.buffered_at_close = t.get_write_buffer_size()
            t.close()

        def connection_lost(self, exc) -> None:
            self.lost = exc

    async def main():
        server, port, record = await serve(pki, SendAndClose)
        t, p = await connect(pki, port)
        assert await p.lost is None
        assert p.eof and p.calls == ["connection_made", "eof_received", "connection_lost"]
        assert hashlib.sha256(p.data).digest() == hashlib.sha256(payload).digest()
        sender = record.protocols[0]
        assert sender.buffered_at_close > 0  # close() really had something to flush
        await asyncio.sleep(0)
        assert sender.lost is None
        server.close()

    run(main())


def test_small_writes_go_out_at_once(pki):
    async def main():
        server, port, _ = await serve(pki)
        t, p = await connect(pki, port)
        assert t.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        start = time.perf_counter()
        for i in range(50):
            t.write(b"%d" % (i % 10))
            assert t.get_write_buffer_size() == 0  # sent from write() itself
            assert len(await p.received(i + 1)) == i + 1
        # 50 round trips; a 40 ms delayed ACK on each would take 2 s
        assert time.perf_counter() - start < 1.5
        t.close()
        server.close()

    run(main())


def test_data_left_inside_openssl_is_delivered(pki):
    # 5000 bytes, then full records, all in the client's socket when it starts reading:
    # each 256 KiB read stops 5000 bytes into a record. After the second read the
    # socket is empty and the last 5000 bytes are inside OpenSSL: no readiness event
    # will come for them. (The first read comes from resume_reading(), the second from
    # the readiness event of the same loop iteration.)
    first, second = b"a" * 5000, b"b" * (2 * transport.READ_SIZE)

    class SendTwo(asyncio.Protocol):
        def connection_made(self, t) -> None:
            t.write(first)
            t.write(second)
            self.transport = t

    class PausedAtFirst(Recorder):
        def connection_made(self, t) -> None:
            super().connection_made(t)
            t.pause_reading()
            t.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)

    async def main():
        server, port, record = await serve(pki, SendTwo)
        t, p = await connect(pki, port, PausedAtFirst)
        while not record.protocols or record.protocols[0].transport.get_write_buffer_size():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # all of it is in the client's socket now
        t.resume_reading()
        total = len(first) + len(second)
        data = await asyncio.wait_for(p.received(total), 5)
        assert data == first + second
        t.close()
        server.close()

    run(main())


def test_pause_and_resume_reading(pki):
    async def main():
        server, port, _ = await serve(pki)
        t, p = await connect(pki, port)
        t.pause_reading()
        assert not t.is_reading()
        t.write(b"ping")
        await asyncio.sleep(0.2)
        assert p.data == b""
        t.resume_reading()
        assert t.is_reading()
        assert await p.received(4) == b"ping"
        t.close()
        server.close()

    run(main())


# --------------------------------------------------------------------------- failures

def test_peer_abort_gives_connection_lost_with_an_error(pki):
    class AbortAtOnce(asyncio.Protocol):
        def connection_made(self, t) -> None:
            t.abort()

        def connection_lost(self, exc) -> None:
            self.lost = exc

    async def main():
        server, port, record = await serve(pki, AbortAtOnce)
        client_ctx = pki.client_context()
        # Python 3.9 sets this by default: OpenSSL then reports a TCP close without
        # close_notify as a clean close (eof_received). vproxy's contexts must not.
        client_ctx.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
        t, p = await transport.create_connection(Recorder, "127.0.0.1", port, client_ctx,
                                                 "localhost")
        exc = await p.lost
        assert isinstance(exc, OSError)  # ssl.SSLEOFError or ConnectionResetError
        assert not p.eof
        assert record.protocols[0].lost is None  # abort() itself is not an error
        server.close()

    run(main())


@pytest.mark.parametrize("client, server_says, client_hears", [
    ("expired", "has expired", "expired"),
    ("revoked", "has been revoked", "revoked"),
    ("other_client", "unknown CA", "unknown CA"),
])
@pytest.mark.parametrize("client_writes", [False, True])
def test_refused_client_certificate(pki, client, server_says, client_hears, client_writes):
    class Client(Recorder):
        def connection_made(self, t) -> None:
            super().connection_made(t)
            if client_writes:  # as a session does at once: the write may meet a reset
                t.write(b"x" * 100000)

    async def main():
        server, port, record = await serve(pki, Recorder)
        # TLS 1.3: the client's handshake completes before the server judged its
        # certificate; the refusal (the alert) arrives on its first read.
        try:
            t, p = await connect(pki, port, Client, pair=getattr(pki, client))
        except ssl.SSLError as e:
            exc = e
        else:
            exc = await p.lost
        assert isinstance(exc, ssl.SSLError), repr(exc)
        assert client_hears in describe_tls_error(exc)

        await asyncio.wait_for(record.failed.wait(), 5)
        (peer, error), = record.failures
        assert peer[0] == "127.0.0.1"
        assert isinstance(error, ssl.SSLError)
        assert server_says in describe_tls_error(error)
        assert record.protocols == []  # the server never made a connection of it
        server.close()

    run(main())


def test_refusal_seen_even_when_the_server_closes_at_once(pki):
    """A server that closes right after refusing (no lingering: here a blocking
    SSLSocket in a thread) resets the connection under the client's writes. The alert
    is in the client's socket all the same: the client must report it, not EPIPE/EOF."""
    listener = socket.create_server(("127.0.0.1", 0))
    server_ctx = pki.server_context()
    rounds = 5

    def refuse() -> None:
        for _ in range(rounds):
            conn, _ = listener.accept()
            try:
                server_ctx.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError):
                pass
            conn.close()

    class Writer(Recorder):
        def connection_made(self, t) -> None:
            super().connection_made(t)
            for _ in range(16):
                t.write(b"x" * 65536)

    async def main():
        port = listener.getsockname()[1]
        for _ in range(rounds):
            t, p = await connect(pki, port, Writer, pair=pki.expired)
            exc = await p.lost
            assert describe_tls_error(exc) == "the peer refused our certificate: it has expired"

    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    try:
        run(main())
    finally:
        thread.join(5)
        listener.close()


def test_client_refuses_a_server_of_another_ca(pki):
    async def main():
        record = Servers(Echo)
        server = await transport.start_server(
            record.make, "127.0.0.1", 0, pki.server_context(pki.other_server),
            on_handshake_error=record.on_handshake_error)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ssl.SSLCertVerificationError) as info:
            await connect(pki, port)
        assert "unknown CA" in describe_tls_error(info.value)
        await asyncio.wait_for(record.failed.wait(), 5)
        assert "unknown CA" in describe_tls_error(record.failures[0][1])
        server.close()

    run(main())


def test_connection_refused_is_an_oserror(pki):
    async def main():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # nothing listens there
        with pytest.raises(ConnectionRefusedError):
            await connect(pki, port)

    run(main())


def test_silent_connection_is_dropped_after_the_handshake_timeout(pki):
    async def main():
        loop = asyncio.get_running_loop()
        server, port, record = await serve(pki, handshake_timeout=1.0)
        silent = socket.socket()
        silent.setblocking(False)
        await loop.sock_connect(silent, ("127.0.0.1", port))
        start = time.monotonic()

        # Meanwhile other clients are served: the stalled handshake blocks nothing.
        t, p = await connect(pki, port)
        t.write(b"hi")
        assert await p.received(2) == b"hi"
        assert record.failures == []  # the silent one is still waiting
        t.close()

        assert await asyncio.wait_for(loop.sock_recv(silent, 100), 10) == b""
        elapsed = time.monotonic() - start
        assert 0.9 < elapsed < 5
        silent.close()
        (peer, error), = record.failures
        assert peer[0] == "127.0.0.1"
        assert isinstance(error, transport.HandshakeTimeout)
        assert isinstance(error, asyncio.TimeoutError) and isinstance(error, TimeoutError)
        assert describe_tls_error(error) == "the TLS handshake timed out"
        server.close()

    run(main())


def test_client_handshake_timeout(pki):
    async def main():
        loop = asyncio.get_running_loop()
        mute = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)  # never answers
        port = mute.sockets[0].getsockname()[1]
        start = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await connect(pki, port, handshake_timeout=0.3)
        assert time.monotonic() - start < 5
        mute.close()

    run(main())


def test_not_tls_is_reported(pki):
    async def main():
        loop = asyncio.get_running_loop()
        server, port, record = await serve(pki)
        plain = socket.socket()
        plain.setblocking(False)
        await loop.sock_connect(plain, ("127.0.0.1", port))
        await loop.sock_sendall(plain, b"GET / HTTP/1.0\r\n\r\n")
        await asyncio.wait_for(record.failed.wait(), 5)
        assert "HTTP request" in describe_tls_error(record.failures[0][1])
        plain.close()
        server.close()

    run(main())


# --------------------------------------------------------------------------- many

def test_200_concurrent_connections(pki):
    async def one(port: int, i: int) -> None:
        t, p = await connect(pki, port)
        message = b"client %d " % i * 100
        t.write(message)
        assert await p.received(len(message)) == message
        t.close()
        assert await p.lost is None

    async def main():
        server, port, record = await serve(pki)
        await asyncio.gather(*(one(port, i) for i in range(200)))
        assert len(record.protocols) == 200
        assert record.failures == []
        server.close()
        await server.wait_closed()

    run(main(), timeout=120)


def test_server_close_stops_listening(pki):
    async def main():
        server, port, _ = await serve(pki)
        assert server.is_serving()
        server.close()
        await server.wait_closed()
        assert not server.is_serving()
        with pytest.raises(ConnectionRefusedError):
            await connect(pki, port)

    run(main())
