"""Session scenarios, each over a socketpair and over real mutual TLS."""

import asyncio
import hashlib
import os
import socket
import time

import pytest

from vproxy import mux
from vproxy.errors import ChannelRefused, SessionClosed, StreamResetError
from vproxy.mux import OpenRequest
from vproxy.mux import frames as fr
from vproxy.net.session import Session
from support.aio import run
from support.sessiontools import TRANSPORTS, echo_handler, session_pair


def req(channel="echo"):
    return OpenRequest("web1", channel, "rw", {"replay": "10"})


async def read_to_end(stream):
    parts = []
    while True:
        chunk = await stream.read()
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_echo_with_half_close(kind, pki):
    async def main():
        async with session_pair(kind, pki, echo_handler) as (client, server):
            stream = await client.open(req())
            assert stream.info == {"hello": "world"}
            payload = os.urandom(3 * 1024 * 1024)

            async def send():
                await stream.write(payload)
                await stream.close()  # half-close: the echo still comes back

            sender = asyncio.ensure_future(send())
            assert await read_to_end(stream) == payload
            await sender
            await asyncio.wait_for(stream.wait_closed(), 5)
    run(main())


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_refusal_reason_reaches_the_client_and_the_session_lives(kind, pki):
    async def main():
        async with session_pair(kind, pki, echo_handler) as (client, server):
            with pytest.raises(ChannelRefused) as info:
                await client.open(req("nope"))
            assert info.value.code == mux.RefuseCode.NO_SUCH_CHANNEL
            assert info.value.message == "no channel called nope"
            stream = await client.open(req())
            await stream.write(b"still here")
            assert await stream.read() == b"still here"
    run(main())


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_reset_with_code_and_notices(kind, pki):
    async def main():
        async with session_pair(kind, pki, echo_handler) as (client, server):
            stream = await client.open(req("reset"))
            with pytest.raises(StreamResetError) as info:
                await stream.read()
            assert info.value.code == mux.ResetCode.CHANNEL_GONE
            assert "went away" in info.value.message
            stream = await client.open(req("notice"))
            assert await stream.next_notice() == {"event": "writer-changed", "writer": "bob"}
            rtt = await client.ping()
            assert 0 < rtt < 1
    run(main())


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_a_stalled_stream_does_not_stall_another(kind, pki):
    """One stream's reader stops; another stream on the same session moves 32 MiB."""
    config = mux.Config(initial_window=256 * 1024)

    async def main():
        async with session_pair(kind, pki, echo_handler, config) as (client, server):
            stalled = await client.open(req("stall"))
            blocked = asyncio.ensure_future(stalled.write(os.urandom(8 * 1024 * 1024)))
            await asyncio.sleep(0.2)
            assert not blocked.done()  # its writer waits for credit that never comes
            busy = await client.open(req())
            payload = os.urandom(32 * 1024 * 1024)

            async def send():
                await busy.write(payload)
                await busy.close()

            start = time.perf_counter()
            sender = asyncio.ensure_future(send())
            echoed = await read_to_end(busy)
            await sender
            elapsed = time.perf_counter() - start
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
            # the stalled stream's receiver holds no more than the window it granted
            server_stream = next(s for s in server._streams.values() if s.request.channel == "stall")
            assert sum(map(len, server_stream._chunks)) <= config.initial_window
            assert not blocked.done()
            blocked.cancel()
            print("32 MiB echoed beside a stalled stream in %.2f s" % elapsed)
    run(main())


def test_keepalive_notices_a_dead_peer_within_seconds():
    config = mux.Config(keepalive_interval=0.3, keepalive_timeout=1.0)

    async def main():
        loop = asyncio.get_running_loop()
        ours, silent = socket.socketpair()  # `silent` never answers: a dead peer
        _, session = await loop.create_connection(lambda: Session(True, config), sock=ours)
        start = time.monotonic()
        reason = await asyncio.wait_for(session.wait_closed(), 5)
        assert "no answer from the peer" in reason
        assert time.monotonic() - start < 2.0
        silent.close()
    run(main())


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_goaway_drains_then_closes(kind, pki):
    async def main():
        async with session_pair(kind, pki, echo_handler) as (client, server):
            stream = await client.open(req())
            drain = asyncio.ensure_future(server.goaway("maintenance", drain_timeout=5))
            await asyncio.sleep(0.1)
            with pytest.raises(SessionClosed):
                await client.open(req())
            await stream.write(b"last words")  # the open stream still works
            assert await stream.read() == b"last words"
            await stream.close()
            assert await read_to_end(stream) == b""
            await asyncio.wait_for(drain, 5)
            reason = await asyncio.wait_for(client.wait_closed(), 5)
            assert reason
    run(main())


def test_garbage_from_the_peer_ends_the_session_with_a_goaway_naming_it():
    async def main():
        loop = asyncio.get_running_loop()
        ours, raw = socket.socketpair()
        _, session = await loop.create_connection(lambda: Session(False, None, echo_handler), sock=ours)
        raw.sendall(fr.header(3, 0x3F, 0, 1) + b"abc")
        reason = await asyncio.wait_for(session.wait_closed(), 5)
        assert "unknown frame type 0x3f" in reason
        raw.settimeout(5)
        data = raw.recv(65536)
        decoder = fr.FrameDecoder()
        decoder.feed(data)
        goaway = decoder.next_frame()
        assert goaway.type == fr.FrameType.GOAWAY and goaway.code == mux.ErrorCode.PROTOCOL_ERROR
        assert "unknown frame type" in goaway.message
        raw.close()
    run(main())


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_many_concurrent_streams(kind, pki):
    async def main():
        async with session_pair(kind, pki, echo_handler) as (client, server):
            async def one(i):
                s = await client.open(req())
                data = os.urandom(1000 + i)
                await s.write(data)
                await s.close()
                return await read_to_end(s) == data
            results = await asyncio.gather(*(one(i) for i in range(300)))
            assert all(results)
    run(main())


def test_a_tcp_session_takes_its_base_round_trip_from_tcp_at_once(pki):
    """Windows are sized on the base round trip from the first byte: over TCP it is
    TCP's own minimum (vproxy/tcpinfo.py), known before any ping has been answered."""
    async def main():
        async with session_pair("tls", pki, echo_handler) as (client, server):
            for side in (client, server):
                assert side._conn.min_rtt is not None and 0 < side._conn.min_rtt < 0.005
    run(main())


def test_a_closed_session_is_freed_at_once(pki):
    """Nothing scheduled keeps a closed session alive (the RTT probe timers did for
    11 s: 30 MB of an agent after a burst of 1,000 sessions)."""
    import gc
    import weakref

    async def main():
        async with session_pair("tls", pki, echo_handler) as (client, server):
            refs = [weakref.ref(client), weakref.ref(server)]
            await asyncio.sleep(0.3)  # two probes went out; the next is due at 1.12 s
        del client, server
        await asyncio.sleep(0.1)  # connection_lost runs; the loop is still running
        gc.collect()
        return [r() for r in refs]

    assert run(main()) == [None, None]
