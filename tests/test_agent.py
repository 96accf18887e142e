"""The agent over real mutual TLS: who gets in, who is refused, and bench end to end."""

import asyncio
import json
import logging
import os
import ssl
import subprocess
import sys

import pytest

from vproxy import tls
from vproxy.agent import Agent, AgentConfig
from vproxy.client import connect
from vproxy.errors import ChannelRefused, UserError
from vproxy.mux import RefuseCode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def started_agent(pki, **kw):
    agent = Agent(AgentConfig(listen_port=0, cert=pki.server.cert, key=pki.server.key, ca=pki.ca,
                              crl=pki.crl, **kw))
    await agent.start()
    return agent


def test_a_good_client_gets_a_session_and_builtin_channels(pki):
    async def main():
        agent = await started_agent(pki)
        client = await connect(agent.addresses[0], pki.alice.cert, pki.alice.key, pki.ca,
                               server_name="localhost")
        assert str(client.session.peer_identity) == "localhost"
        stream = await client.open("", "echo")
        await stream.write(b"ping")
        assert await stream.read() == b"ping"
        with pytest.raises(ChannelRefused) as info:
            await client.open("", "nonsense")
        assert info.value.code == RefuseCode.NO_SUCH_CHANNEL
        with pytest.raises(ChannelRefused) as info:
            await client.open("web1", "console")
        assert info.value.code == RefuseCode.FORBIDDEN and "has no ACL" in info.value.message
        assert len(agent.sessions) == 1
        await client.close()
        await agent.shutdown()
    run(main())


@pytest.mark.parametrize("who, why", [
    ("expired", "expired"),
    ("not_yet_valid", "not valid yet"),
    ("revoked", "revoked"),
    ("other_client", "unknown CA"),
    ("wrong_eku", "not meant for this use"),
    ("self_signed", "unknown CA"),
])
def test_refused_certificates(pki, who, why, caplog):
    """Each refusal says why on both ends: to the user, and in the agent's log."""
    pair = getattr(pki, who)

    async def main():
        agent = await started_agent(pki)
        with pytest.raises(UserError) as info:
            await connect(agent.addresses[0], pair.cert, pair.key, pki.ca, server_name="localhost",
                          timeout=5)
        assert "refused the session" in info.value.message and why in info.value.message
        assert not agent.sessions
        # the agent keeps serving good clients
        client = await connect(agent.addresses[0], pki.alice.cert, pki.alice.key, pki.ca,
                               server_name="localhost")
        await client.close()
        await agent.shutdown()

    with caplog.at_level(logging.WARNING, logger="vproxy.agent"):
        run(main())
    assert any("refused connection from 127.0.0.1" in r.getMessage() for r in caplog.records)


def test_refused_without_a_client_certificate(pki):
    async def main():
        agent = await started_agent(pki)
        host, port = agent.addresses[0].rsplit(":", 1)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_verify_locations(pki.ca)
        context.set_alpn_protocols([tls.ALPN])
        reader, writer = await asyncio.open_connection(host, int(port), ssl=context,
                                                       server_hostname="localhost")
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            data = await asyncio.wait_for(reader.read(100), 5)
            if not data:
                raise ConnectionError("closed")
        writer.close()
        assert not agent.sessions
        await agent.shutdown()
    run(main())


def test_a_handshake_that_never_finishes_is_dropped(pki):
    async def main():
        agent = await started_agent(pki, handshake_timeout=0.5)
        host, port = agent.addresses[0].rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
        data = await asyncio.wait_for(reader.read(), 5)  # the agent hangs up
        assert data == b""
        writer.close()
        await agent.shutdown()
    run(main())


def test_serve_and_bench_from_the_command_line(pki, tmp_path):
    """The real CLI: an agent process, then `vproxy bench --json` against it."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    agent = subprocess.Popen(
        [sys.executable, "-m", "vproxy", "serve", "--listen", "127.0.0.1:0",
         "--cert", pki.server.cert, "--key", pki.server.key, "--ca", pki.ca, "--crl", pki.crl],
        stderr=subprocess.PIPE, env=env, text=True)
    try:
        line = agent.stderr.readline()
        assert "listening on 127.0.0.1:" in line, line
        address = line.split("listening on ")[1].strip()
        out = subprocess.run(
            [sys.executable, "-m", "vproxy", "bench", address, "--cert", pki.alice.cert,
             "--key", pki.alice.key, "--ca", pki.ca, "--seconds", "0.5", "--streams", "50",
             "--json"],
            capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["streams_ok"] == 50
        assert result["upload_mbps"] > 0 and result["download_mbps"] > 0
        assert 0 < result["rtt_p50_us"] <= result["rtt_p99_us"]
        refused = subprocess.run(
            [sys.executable, "-m", "vproxy", "bench", address, "--cert", pki.revoked.cert,
             "--key", pki.revoked.key, "--ca", pki.ca, "--json"],
            capture_output=True, text=True, env=env, timeout=60)
        assert refused.returncode == 2
        assert refused.stderr.startswith("vproxy: error: ") and "Traceback" not in refused.stderr
    finally:
        agent.terminate()
        agent.wait(10)
    assert agent.returncode == 0  # SIGTERM drains and exits cleanly
