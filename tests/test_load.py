"""Load (issue 5, point 4) against the real agent process over real mutual TLS on
loopback, bounded in count and time:

- 1,000 concurrent client sessions, each opening an echo stream and exchanging a few
  bytes while all 1,000 are open; the agent's RSS is measured and printed; then two
  more such rounds against the same agent: once it has been idle for RELEASE_DELAY it
  gives the heap back (vproxy.memory), and its RSS after round 3 is within
  PLATEAU_MARGIN of that after round 1 (a leak of 10 KiB a session would add 20 MiB);
- 10,000 concurrent streams on one session (echo, a few bytes each), then the stream
  limit: the agent's max_streams (mux.Config.max_streams, 16384; neither the command
  line nor the config file sets it) refuses the next open with TOO_MANY_STREAMS and a
  clear message, and the session lives on.
"""

import asyncio
import os
import time

import pytest
from support.agenttools import AgentProcess
from vproxy import mux
from vproxy.agent.server import RELEASE_DELAY
from vproxy.client.connection import connect
from vproxy.errors import ChannelRefused
from vproxy.mux import RefuseCode

pytestmark = pytest.mark.slow

CLIENTS = 1000
STREAMS = 10000
WAVE = 1000
ROUNDS = 3
PLATEAU_MARGIN = 8 * 1024  # KiB. Measured: +1.4 MiB after round 2, +2.4 after round 4


def rss_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for %d" % pid)


def fds(pid: int) -> int:
    return len(os.listdir("/proc/%d/fd" % pid))


def connect_as(pki, address):
    return connect(address, pki.alice.cert, pki.alice.key, pki.ca, server_name="localhost")


def glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


def settled_rss(pid: int, done) -> int:
    """The agent's RSS once done(rss) says it has released the burst's heap, which it
    does RELEASE_DELAY after its last session ended; the last reading at the deadline."""
    deadline = time.monotonic() + RELEASE_DELAY + 30
    while True:
        rss = rss_kib(pid)
        if done(rss) or time.monotonic() > deadline:
            return rss
        time.sleep(0.5)


async def echo_hello(client, i):
    """Open an echo stream on client i, check a greeting comes back; the stream."""
    stream = await client.open("", "echo", "rw")
    msg = b"client %d says hi" % i
    await stream.write(msg)
    got = b""
    while len(got) < len(msg):
        chunk = await asyncio.wait_for(stream.read(), 30)
        assert chunk, "EOF on client %d" % i
        got += chunk
    assert got == msg
    return stream


async def another_round(pki, address):
    """1,000 more concurrent sessions with an echo stream each, then all closed."""
    gate = asyncio.Semaphore(64)

    async def one(i):
        async with gate:
            client = await connect_as(pki, address)
        return client, await echo_hello(client, i)

    pairs = await asyncio.gather(*(one(i) for i in range(CLIENTS)), return_exceptions=True)
    ok = [p for p in pairs if not isinstance(p, BaseException)]
    for _, stream in ok:
        await stream.close()
    await asyncio.gather(*(client.close() for client, _ in ok), return_exceptions=True)
    bad = [p for p in pairs if isinstance(p, BaseException)]
    assert not bad, "%d of %d sessions failed, first: %r" % (len(bad), CLIENTS, bad[0])


@pytest.mark.timeout(600)
def test_1000_concurrent_tls_clients_each_with_an_echo_stream(pki, tmp_path):
    with AgentProcess(pki, tmp_path, [], []) as agent:
        pid = agent.proc.pid
        rss_idle = rss_kib(pid)

        async def main():
            gate = asyncio.Semaphore(64)  # handshakes in flight (the agent drops one after 5 s)
            clients = []
            failures = []

            async def one(i):
                async with gate:
                    client = await connect_as(pki, agent.address)
                clients.append(client)
                return client

            t0 = time.monotonic()
            results = await asyncio.gather(*(one(i) for i in range(CLIENTS)), return_exceptions=True)
            connected = time.monotonic() - t0
            failures = [r for r in results if isinstance(r, BaseException)]
            assert not failures, "%d of %d connects failed, first: %r" % (len(failures), CLIENTS, failures[0])
            assert len(clients) == CLIENTS
            assert all(not c.session.closed.done() for c in clients)
            rss_connected = rss_kib(pid)
            open_fds = fds(pid)

            t1 = time.monotonic()
            streams = await asyncio.gather(*(echo_hello(c, i) for i, c in enumerate(clients)),
                                           return_exceptions=True)
            exchanged = time.monotonic() - t1
            bad = [s for s in streams if isinstance(s, BaseException)]
            assert not bad, "%d exchanges failed, first: %r" % (len(bad), bad[0])
            rss_streams = rss_kib(pid)
            # every session is still there, each with its stream open
            assert all(not c.session.closed.done() for c in clients)
            for s in streams:
                await s.close()
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
            return connected, exchanged, rss_connected, rss_streams, open_fds

        connected, exchanged, rss_connected, rss_streams, open_fds = asyncio.run(asyncio.wait_for(main(), 120))
        time.sleep(1.0)
        assert agent.proc.poll() is None
        rss_after = rss_kib(pid)
        fds_after = fds(pid)
        print("\n%d TLS sessions: connected in %.1f s, echo on each in %.1f s; agent RSS idle %d KiB, "
              "%d sessions %d KiB (%.1f KiB/session), with streams %d KiB, after close %d KiB; fds %d -> %d"
              % (CLIENTS, connected, exchanged, rss_idle, CLIENTS, rss_connected,
                 (rss_connected - rss_idle) / CLIENTS, rss_streams, rss_after, open_fds, fds_after))
        assert open_fds >= CLIENTS  # they really were concurrent: one socket each
        assert fds_after < 50, "the agent kept %d fds after every client left" % fds_after
        assert rss_streams < 200 * 1024, "agent RSS %d KiB for %d sessions" % (rss_streams, CLIENTS)

        # Rounds 2 and 3 against the same agent. Freed memory stays in glibc's heap
        # until the agent's idle release (without it: 110, 132, 159, 184 MB after
        # rounds 1-4, none of it live objects), so each figure is taken after it.
        if not glibc():
            pytest.skip("the plateau figures assume glibc's malloc_trim (vproxy.memory)")
        released = [settled_rss(pid, lambda rss: rss < rss_after * 0.6)]
        assert released[0] < rss_after * 0.6, \
            "the idle agent kept its RSS: %d KiB after close, %d KiB %.0f s later" \
            % (rss_after, released[0], RELEASE_DELAY + 30)
        for _ in range(ROUNDS - 1):
            asyncio.run(asyncio.wait_for(another_round(pki, agent.address), 120))
            released.append(settled_rss(pid, lambda rss: rss <= released[0] + PLATEAU_MARGIN))
        assert agent.proc.poll() is None
        print("agent RSS after each round of %d sessions, once released: %s KiB"
              % (CLIENTS, ", ".join(str(r) for r in released)))
        for rss in released[1:]:
            assert rss <= released[0] + PLATEAU_MARGIN, \
                "agent RSS grows from round to round (a leak?): %s KiB after rounds 1-%d" \
                % (released, len(released))


def test_10000_streams_on_one_session_and_the_stream_limit(pki, tmp_path):
    limit = mux.Config().max_streams  # what the agent runs with: nothing sets it otherwise
    with AgentProcess(pki, tmp_path, [], []) as agent:
        pid = agent.proc.pid
        rss_idle = rss_kib(pid)

        async def main():
            client = await connect_as(pki, agent.address)
            streams = []
            t0 = time.monotonic()

            for base in range(0, STREAMS, WAVE):  # opened in waves; all stay open
                wave = await asyncio.gather(*(echo_hello(client, i) for i in range(base, base + WAVE)),
                                            return_exceptions=True)
                bad = [s for s in wave if isinstance(s, BaseException)]
                assert not bad, "wave %d: %d failed, first: %r" % (base, len(bad), bad[0])
                streams += wave
            elapsed = time.monotonic() - t0
            assert len(streams) == STREAMS and client.session.stream_count >= STREAMS
            rss_streams = rss_kib(pid)

            # up to the limit: cheap opens without data, then one more is refused
            extra = []
            while len(streams) + len(extra) < limit:
                n = min(WAVE, limit - len(streams) - len(extra))
                extra += await asyncio.gather(*(client.open("", "echo", "rw") for _ in range(n)))
            try:
                await client.open("", "echo", "rw")
            except ChannelRefused as e:
                refusal = e
            else:
                raise AssertionError("stream %d beyond max_streams=%d was accepted" % (limit + 1, limit))
            assert refusal.code == RefuseCode.TOO_MANY_STREAMS
            assert "too many streams: at most %d per session" % limit in refusal.message
            # the session lives on and the streams still work
            assert not client.session.closed.done()
            await streams[0].write(b"x")
            assert await asyncio.wait_for(streams[0].read(), 10) == b"x"
            rss_limit = rss_kib(pid)
            for s in streams + extra:
                s.reset()
            # once some are gone, opening works again
            deadline = time.monotonic() + 30
            while True:
                try:
                    again = await client.open("", "echo", "rw")
                    break
                except ChannelRefused as e:
                    assert e.code == RefuseCode.TOO_MANY_STREAMS and time.monotonic() < deadline
                    await asyncio.sleep(0.2)
            await again.write(b"ok")
            assert await asyncio.wait_for(again.read(), 10) == b"ok"
            await client.close()
            return elapsed, rss_streams, rss_limit

        elapsed, rss_streams, rss_limit = asyncio.run(asyncio.wait_for(main(), 150))
        time.sleep(0.5)
        assert agent.proc.poll() is None
        print("\n%d echo streams on one session in %.1f s; agent RSS idle %d KiB, %d streams %d KiB "
              "(%.2f KiB/stream), at the limit of %d %d KiB, after %d KiB"
              % (STREAMS, elapsed, rss_idle, STREAMS, rss_streams, (rss_streams - rss_idle) / STREAMS,
                 limit, rss_limit, rss_kib(pid)))
