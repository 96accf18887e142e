"""Hostile peers against a real agent over real TLS: each gets a clear refusal or a
GOAWAY naming its fault, and the agent keeps serving everyone else."""

import asyncio
import os
import socket
import ssl

import pytest

from support.aio import run
from vproxy import mux
from vproxy.agent.server import Agent, AgentConfig
from vproxy.client.connection import connect
from vproxy.mux import frames as fr
from vproxy.mux import RefuseCode


async def start_agent(pki, **mux_options):
    config = AgentConfig(listen_port=0, cert=pki.server.cert, key=pki.server.key, ca=pki.ca,
                         crl=pki.crl, mux_config=mux.Config(**mux_options) if mux_options else None)
    agent = Agent(config)
    await agent.start()
    return agent


async def raw_tls(pki, agent):
    """A TLS connection with a good certificate, speaking raw frames."""
    host, port = agent.addresses[0].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(
        host, int(port), ssl=pki.client_context(pki.alice), server_hostname="localhost")
    return reader, writer


async def frames_until_close(reader, timeout=10):
    decoder = fr.FrameDecoder()
    out = []
    while True:
        try:
            data = await asyncio.wait_for(reader.read(65536), timeout)
        except (ConnectionError, ssl.SSLError):
            data = b""
        if not data:
            return out
        decoder.feed(data)
        while True:
            frame = decoder.next_frame()
            if frame is None:
                break
            out.append(frame)


async def still_serving(pki, agent):
    client = await connect(agent.addresses[0], pki.alice.cert, pki.alice.key, pki.ca, server_name="localhost")
    stream = await client.open("", "echo")
    await stream.write(b"ok")
    assert await stream.read() == b"ok"
    await client.close()


@pytest.mark.parametrize("wire, code, needle", [
    (fr.header(fr.MAX_PAYLOAD + 1, 0, 0, 1) + b"x" * 100, mux.ErrorCode.FRAME_SIZE_ERROR, "exceeds"),
    (os.urandom(3) + b"\x3f" + os.urandom(40), None, ""),
    (fr.encode_data(9, b"never opened"), mux.ErrorCode.PROTOCOL_ERROR, "never opened"),
])
def test_bad_frames_end_only_that_session_with_a_goaway(pki, wire, code, needle):
    async def main():
        agent = await start_agent(pki)
        reader, writer = await raw_tls(pki, agent)
        writer.write(wire)
        frames = await frames_until_close(reader)
        goaways = [f for f in frames if f.type == fr.FrameType.GOAWAY]
        assert goaways, "no GOAWAY before the agent hung up"
        if code is not None:
            assert goaways[-1].code == code and needle in goaways[-1].message
        else:
            assert goaways[-1].code != mux.ErrorCode.NO_ERROR and goaways[-1].message
        writer.close()
        await still_serving(pki, agent)
        await agent.shutdown()
    run(main())


def test_window_overrun_is_a_flow_control_goaway(pki):
    async def main():
        agent = await start_agent(pki, initial_window=16384)
        reader, writer = await raw_tls(pki, agent)
        writer.write(fr.encode_open(1, 65536, 1, {"vm": "", "channel": "sink", "mode": "rw"}))
        await asyncio.sleep(0.2)
        writer.write(fr.encode_data(1, b"x" * 16384) + fr.encode_data(1, b"overrun"))
        frames = await frames_until_close(reader)
        assert frames[-1].type == fr.FrameType.GOAWAY
        assert frames[-1].code == mux.ErrorCode.FLOW_CONTROL_ERROR
        writer.close()
        await still_serving(pki, agent)
        await agent.shutdown()
    run(main())


@pytest.mark.parametrize("fields, needle", [
    ({"vm": "../../etc/passwd", "channel": "console", "mode": "rw"}, "may not open"),
    ({"vm": "x" * 1000, "channel": "console", "mode": "rw"}, "VM name of 1000 characters"),
    ({"vm": "web1\nforged audit line", "channel": "console", "mode": "rw"}, "control characters"),
    ({"vm": "web1", "channel": "console", "mode": "root"}, "unknown mode"),
    ({"channel": "console", "mode": "rw"}, "no vm field"),
    ({"vm": "", "channel": "/dev/sda", "mode": "rw"}, "no built-in channel"),
])
def test_strange_open_requests_are_refused_with_a_reason(pki, fields, needle):
    async def main():
        agent = await start_agent(pki)
        agent.acl = None  # no VM access at all: every VM open must be refused
        reader, writer = await raw_tls(pki, agent)
        writer.write(fr.encode_open(1, 65536, 0, fields))
        decoder = fr.FrameDecoder()
        frame = None
        while frame is None:
            decoder.feed(await asyncio.wait_for(reader.read(65536), 10))
            frame = decoder.next_frame()
            while frame is not None and frame.type == fr.FrameType.PING:
                frame = decoder.next_frame()
        assert frame.type == fr.FrameType.REFUSE and needle in frame.message, frame
        writer.close()
        await still_serving(pki, agent)
        await agent.shutdown()
    run(main())


def test_more_streams_than_the_limit_are_refused_and_the_session_lives(pki):
    async def main():
        agent = await start_agent(pki, max_streams=20)
        client = await connect(agent.addresses[0], pki.alice.cert, pki.alice.key, pki.ca, server_name="localhost")
        streams = [await client.open("", "echo") for _ in range(20)]
        with pytest.raises(Exception) as info:
            await client.open("", "echo")
        assert getattr(info.value, "code", None) == RefuseCode.TOO_MANY_STREAMS
        await streams[0].close()
        assert await streams[0].read() == b""
        await asyncio.sleep(0.1)
        again = await client.open("", "echo")  # a slot is free again
        await again.write(b"x")
        assert await again.read() == b"x"
        await client.close()
        await agent.shutdown()
    run(main())


def test_tls_garbage_and_plaintext_are_dropped(pki):
    async def main():
        agent = await start_agent(pki)
        host, port = agent.addresses[0].rsplit(":", 1)
        for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(4096)):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(junk)
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert b"HTTP" not in data  # at most a TLS alert, then the agent hangs up
            assert await asyncio.wait_for(reader.read(65536), 10) == b""
            writer.close()
        await still_serving(pki, agent)
        await agent.shutdown()
    run(main())


def test_a_peer_that_never_reads_is_cut_off_and_others_are_served(pki):
    """A client floods PINGs and never reads: the answers it owes are capped, then the
    agent ends that session (OVERLOADED) instead of buffering without bound."""
    async def main():
        agent = await start_agent(pki, max_control_backlog=2000)
        host, port = agent.addresses[0].rsplit(":", 1)
        context = pki.client_context(pki.alice)
        pings = fr.encode_ping(b"\0" * 8) * 1000
        loop = asyncio.get_running_loop()
        held = []
        stop = []

        def flood():  # blocking, so in a thread: the agent runs on this loop
            sock = socket.create_connection((host, int(port)))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and we never read
            tls_sock = context.wrap_socket(sock, server_hostname="localhost")
            held.append(tls_sock)
            for _ in range(2000):  # at most ~34 MB
                if stop:
                    return
                try:
                    tls_sock.sendall(pings)
                except (OSError, ssl.SSLError):
                    return  # the agent hung up

        flooding = loop.run_in_executor(None, flood)
        while not held:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        for _ in range(200):
            if not agent.sessions:
                break
            await asyncio.sleep(0.1)
        stop.append(True)
        assert not agent.sessions, "the agent kept the session and buffered its answers"
        await flooding
        held[0].close()
        await still_serving(pki, agent)
        await agent.shutdown()
    run(main())


def test_sessions_beyond_the_limit_are_refused_with_a_reason(pki):
    async def main():
        config = AgentConfig(listen_port=0, cert=pki.server.cert, key=pki.server.key, ca=pki.ca,
                             crl=pki.crl, max_sessions=2)
        agent = Agent(config)
        await agent.start()
        address = agent.addresses[0]
        first = await connect(address, pki.alice.cert, pki.alice.key, pki.ca, server_name="localhost")
        second = await connect(address, pki.bob.cert, pki.bob.key, pki.ca, server_name="localhost")
        from vproxy.errors import UserError
        with pytest.raises(UserError) as info:
            await connect(address, pki.alice.cert, pki.alice.key, pki.ca, server_name="localhost")
        assert "too many sessions: this agent serves at most 2 at once" in info.value.message
        await first.close()
        for _ in range(50):
            if len(agent.sessions) < 2:
                break
            await asyncio.sleep(0.05)
        third = await connect(address, pki.alice.cert, pki.alice.key, pki.ca, server_name="localhost")
        await third.close()
        await second.close()
        await agent.shutdown()
    run(main())
