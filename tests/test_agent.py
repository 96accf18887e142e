"""The agent over real mutual TLS: who gets in, who is refused, and bench end to end."""

import asyncio
import functools
import json
import logging
import os
import ssl
import subprocess
import sys

import pytest

from support.aio import run
from vproxy.security import tls
from vproxy.agent.server import Agent, AgentConfig
from vproxy.client.connection import connect
from vproxy.errors import ChannelRefused, UserError
from vproxy.mux import RefuseCode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_resume_prelaunch_config_key_is_a_bool(tmp_path):
    from vproxy.agent.config import load_agent_config, parse_agent_config

    assert "resume_prelaunch" not in parse_agent_config({}).settings  # default: off (unset)
    for value in (True, False):
        assert parse_agent_config({"resume_prelaunch": value}).settings["resume_prelaunch"] is value
    path = tmp_path / "agent.toml"
    path.write_text("resume_prelaunch = true\n")
    assert load_agent_config(str(path)).settings["resume_prelaunch"] is True
    # every other key still refuses a bool (the bool exception is for this key only)
    with pytest.raises(UserError) as info:
        parse_agent_config({"console_ring": True}, "agent.toml")
    assert "console_ring has the wrong type (bool)" in info.value.message
    for bad in ("true", "yes", 1, 0, 1.0, ["x"]):
        with pytest.raises(UserError) as info:
            parse_agent_config({"resume_prelaunch": bad}, "agent.toml")
        message = info.value.message
        assert message.startswith("agent.toml: resume_prelaunch must be true or false"), message
        assert repr(bad) in message
    path.write_text('resume_prelaunch = "true"\n')
    with pytest.raises(UserError) as info:
        load_agent_config(str(path))
    assert "resume_prelaunch must be true or false, not 'true' (str)" in info.value.message


def test_adopt_config_key_and_option():
    """adopt = [...] lists "pty" and/or "socket"; --adopt takes pty,socket / pty / socket / none."""
    from vproxy.agent.config import parse_agent_config
    from vproxy.cli.serve import parse_adopt

    assert "adopt" not in parse_agent_config({}).settings  # default: both (unset)
    for value in ([], ["pty"], ["socket"], ["pty", "socket"]):
        assert parse_agent_config({"adopt": value}).settings["adopt"] == value
    for bad in (["file"], ["pty", 1], "pty"):
        with pytest.raises(UserError) as info:
            parse_agent_config({"adopt": bad}, "agent.toml")
        assert info.value.message.startswith("agent.toml: adopt "), info.value.message
    assert parse_adopt("pty,socket") == ("pty", "socket")
    assert parse_adopt("socket") == ("socket",)
    assert parse_adopt("none") == ()
    with pytest.raises(UserError) as info:
        parse_adopt("tty")
    assert info.value.message == "--adopt 'tty': expected pty, socket, pty,socket or none"


def test_resume_prelaunch_reaches_every_vm_monitor(pki, tmp_path):
    """AgentConfig.resume_prelaunch -> VMRegistry -> VM -> VMMonitor, also for VMs found in
    vm_dir and VMs a reload adds; default off."""
    from vproxy.agent.reload import Settings

    import socket

    (tmp_path / "q").mkdir()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "q" / "fromdir.qmp"))  # a socket nobody answers on

    async def main():
        for on in (False, True):
            kw = {} if not on else {"resume_prelaunch": True}
            agent = await started_agent(pki, vms=[("web1", str(tmp_path / "none.qmp"))],
                                        vm_dir=str(tmp_path / "q"), **kw)
            try:
                await agent.reload(lambda agent=agent: Settings(
                    cert=pki.server.cert, key=pki.server.key, ca=pki.ca, crl=pki.crl,
                    acl=agent.acl, vms=[("web1", str(tmp_path / "none.qmp")),
                                        ("web2", str(tmp_path / "none2.qmp"))]))
                monitors = {vm.name: vm.monitor.resume_prelaunch for vm in agent.registry}
                assert monitors == {"web1": on, "web2": on, "fromdir": on}
            finally:
                await agent.shutdown()
            # an agent started without VMs makes its registry on the reload that adds one
            agent = await started_agent(pki, **kw)
            try:
                assert agent.registry is None
                await agent.reload(lambda agent=agent: Settings(
                    cert=pki.server.cert, key=pki.server.key, ca=pki.ca, crl=pki.crl,
                    acl=agent.acl, vms=[("web3", str(tmp_path / "none3.qmp"))]))
                assert [vm.monitor.resume_prelaunch for vm in agent.registry] == [on]
            finally:
                await agent.shutdown()

    try:
        run(main())
    finally:
        listener.close()


def test_per_vm_qmp_mode_and_adopt_from_file_to_monitor_and_reload(pki, tmp_path):
    """A [[vm]]'s own qmp_mode and adopt reach its VM over the global qmp and adopt (file
    -> make_reloader/serve -> AgentConfig.vm_options -> VMRegistry -> VMMonitor and
    ConsoleSet); a --vm NAME=QMP replacing it drops them; a reload that changes them
    restarts that VM in the registry (counted as added) and leaves the others alone."""
    from vproxy.agent.qemu.monitor import SharedVMMonitor
    from vproxy.cli.serve import make_reloader, vm_options_after

    config = tmp_path / "agent.toml"

    def write(web1_mode, web1_adopt):
        config.write_text(
            'qmp = "exclusive"\nadopt = ["pty", "socket"]\n'
            '[[vm]]\nname = "web1"\nqmp = "%s"\nqmp_mode = "%s"\nadopt = %s\n'
            '[[vm]]\nname = "db1"\nqmp = "%s"\n'
            % (tmp_path / "web1.qmp", web1_mode, json.dumps(web1_adopt), tmp_path / "db1.qmp"))

    write("shared", ["socket"])
    load = make_reloader(str(config), {}, (), (), None, False, started={})
    assert vm_options_after({"web1": {"qmp_mode": "shared"}}, ["web1=/x.qmp"]) == {}

    def settings():
        s = load()
        s.cert, s.key, s.ca, s.crl = pki.server.cert, pki.server.key, pki.ca, pki.crl
        return s

    async def main():
        first = settings()
        agent = await started_agent(pki, vms=first.vms, vm_options=first.vm_options)
        try:
            web1, db1 = agent.registry.get("web1"), agent.registry.get("db1")
            assert isinstance(web1.monitor, SharedVMMonitor) and web1.monitor.mode == "shared"
            assert web1.consoles.adopt == ("socket",)
            assert db1.monitor.mode == "exclusive" and db1.consoles.adopt == ("pty", "socket")
            # unchanged: nothing restarted
            outcome = await agent.reload(settings)
            assert outcome.vms_added == [] and agent.registry.get("web1") is web1
            # web1 back to exclusive with no adoption: web1 restarted, db1 untouched
            write("exclusive", [])
            outcome = await agent.reload(settings)
            assert outcome.vms_added == ["web1"] and outcome.vms_removed == []
            new = agent.registry.get("web1")
            assert new is not web1 and new.monitor.mode == "exclusive" and new.consoles.adopt == ()
            assert agent.registry.get("db1") is db1
            assert agent.config.vm_options == {"web1": {"qmp_mode": "exclusive", "adopt": ()}}
        finally:
            await agent.shutdown()

    run(main())


def test_a_reload_says_resume_prelaunch_needs_a_restart(tmp_path):
    """Read at start only: a reload that finds it changed in the file says so, unless
    the command line set it (then the file's value does not count)."""
    from vproxy.cli.serve import make_reloader

    config = tmp_path / "agent.toml"
    config.write_text("resume_prelaunch = true\n")
    load = make_reloader(str(config), {}, (), (), None, False, started={})
    assert "resume_prelaunch" in load().needs_restart
    load = make_reloader(str(config), {}, (), (), None, False, started={"resume_prelaunch": True})
    assert "resume_prelaunch" not in load().needs_restart
    load = make_reloader(str(config), {}, (), (), None, False, started={},
                         overridden=["resume_prelaunch"])
    assert "resume_prelaunch" not in load().needs_restart


# --------------------------------------------------------------------------- certificate expiry

def _not_after(cert_path) -> float:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(open(cert_path, "rb").read())
    value = getattr(cert, "not_valid_after_utc", None)
    if value is None:  # cryptography < 42: naive UTC
        import datetime as dt

        value = cert.not_valid_after.replace(tzinfo=dt.timezone.utc)
    return value.timestamp()


def _own_ca(tmp_path, client):
    """A CA of the test's own (the session-wide one is not to be changed): its
    directory, ca.pem, a server certificate for localhost and a client's (cert, key)."""
    from vproxy.security import pki as vpki

    ca_dir = tmp_path / "ca"
    vpki.init_ca(ca_dir, common_name="expiry test CA")
    server = vpki.issue(ca_dir, "localhost", "server", dns_names=["localhost"],
                        ip_addresses=["127.0.0.1"])
    client_pair = tuple(map(str, vpki.issue(ca_dir, client, "client")))
    return ca_dir, str(ca_dir / "ca.pem"), server, client_pair


def test_a_session_ends_when_its_client_certificate_expires(tmp_path, caplog):
    """A certificate valid at the handshake does not keep its session past notAfter:
    the agent ends it (GOAWAY SHUTDOWN naming the certificate and the time, one log
    line); a session with a certificate still valid, on the same agent, lives on."""
    import time

    from support.pkitools import issue_expiring
    from vproxy.errors import SessionClosed

    ca_dir, ca, server, (bob_cert, bob_key) = _own_ca(tmp_path, "bob")

    async def main():
        agent = Agent(AgentConfig(listen_port=0, cert=str(server[0]), key=str(server[1]), ca=ca))
        await agent.start()
        address = agent.addresses[0]
        bob = await connect(address, bob_cert, bob_key, ca, server_name="localhost")
        alice_pair = issue_expiring(ca_dir, "alice", 4)
        not_after = _not_after(alice_pair.cert)
        alice = await connect(address, alice_pair.cert, alice_pair.key, ca,
                              server_name="localhost", timeout=3)
        a_echo = await alice.open("", "echo")
        b_echo = await bob.open("", "echo")
        await a_echo.write(b"before")
        assert await a_echo.read() == b"before"

        # a long-lived certificate is looked at again within a day, not at its far notAfter
        loop = asyncio.get_event_loop()
        (b_side,) = [s for s in agent.sessions if str(s.peer_identity) == "bob"]
        assert b_side._expiry_timer.when() - loop.time() <= tls.EXPIRY_RECHECK + 1

        with pytest.raises(SessionClosed) as info:
            while True:  # the stream lives until the certificate's end, then the session ends
                await asyncio.wait_for(a_echo.read(), not_after - time.time() + 5)
        ended = time.time()
        expected = "your certificate (CN alice) expired at %s" % time.strftime(
            "%Y-%m-%d %H:%M:%S UTC", time.gmtime(not_after))
        assert expected in str(info.value), info.value
        assert "SHUTDOWN" in str(info.value)
        assert not_after < ended < not_after + 3, (not_after, ended)
        assert expected in await alice.session.wait_closed()

        # bob, on the same agent, goes on
        await b_echo.write(b"bob goes on")
        assert await b_echo.read() == b"bob goes on"
        assert [str(s.peer_identity) for s in agent.sessions] == ["bob"]
        await bob.close()
        await alice.close()
        await b_side.wait_closed()
        assert b_side._expiry_timer is None  # cancelled with its session: nothing holds it
        await agent.shutdown(drain_timeout=1)

    with caplog.at_level(logging.INFO, logger="vproxy.agent"):
        run(main())
    lines = [r.getMessage() for r in caplog.records if r.name == "vproxy.agent"
             and r.levelno >= logging.WARNING and "expired at" in r.getMessage()]
    assert len(lines) == 1, lines  # one line says why (then the usual "closed: ..." at INFO)
    assert "ending the session: your certificate (CN alice) expired at" in lines[0]


def test_local_sessions_have_no_certificate_to_expire(pki):
    """Local mode (SO_PEERCRED, no TLS): neither end schedules an expiry, the session
    is untouched."""
    import shutil
    import tempfile

    from vproxy.client.local import connect_local

    where = tempfile.mkdtemp(prefix="vpx")
    path = os.path.join(where, "agent.sock")

    async def main():
        agent = Agent(AgentConfig(local_socket=path))
        await agent.start()
        client = await connect_local(path)
        (session,) = agent.sessions
        assert session._expiry_timer is None and session._not_after is None
        assert client._expiry is None
        stream = await client.open("", "echo")
        await stream.write(b"local")
        assert await stream.read() == b"local"
        await client.close()
        await agent.shutdown(drain_timeout=1)

    try:
        run(main())
    finally:
        shutil.rmtree(where, ignore_errors=True)


# --------------------------------------------------------------------------- sessions per identity

async def _wait_for(predicate, seconds=5.0):
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    assert predicate()


def _connect_as(agent, pki, pair):
    return connect(agent.addresses[0], pair.cert, pair.key, pki.ca, server_name="localhost",
                   timeout=5)


async def _refused_overloaded(connecting) -> str:
    """The agent's refusal of a session (GOAWAY OVERLOADED), as the client tells it."""
    with pytest.raises(UserError) as info:
        await connecting
    message = info.value.message
    assert "refused the session" in message and "OVERLOADED" in message, message
    return message


def test_sessions_of_one_identity_beyond_its_limit_are_refused_with_a_reason(pki):
    async def main():
        agent = await started_agent(pki, max_sessions_per_identity=2)
        as_ = functools.partial(_connect_as, agent, pki)

        first = await as_(pki.alice)
        second = await as_(pki.alice)
        message = await _refused_overloaded(as_(pki.alice))
        assert "too many sessions for alice: this agent serves at most 2 at once per identity" \
            in message, message
        bob = await as_(pki.bob)  # another identity still gets in
        stream = await bob.open("", "echo")
        await stream.write(b"bob")
        assert await stream.read() == b"bob"
        assert len(agent.sessions) == 3
        # closing one of alice's lets her in again
        await first.close()
        await _wait_for(lambda: len(agent.sessions) == 2)
        third = await as_(pki.alice)
        with pytest.raises(UserError):
            await as_(pki.alice)
        for client in (second, third, bob):
            await client.close()
        await _wait_for(lambda: not agent.sessions)
        assert agent.sessions_per_identity == {}
        await agent.shutdown(drain_timeout=1)
    run(main())


@pytest.mark.parametrize("key, second, refusal", [
    ("max_sessions_per_identity", "alice", "at most 1 at once per identity"),
    ("max_sessions_per_address", "bob",
     "too many sessions from 127.0.0.1: this agent serves at most 1 at once per source address"),
])
def test_a_per_identity_or_per_address_limit_key_and_flag(pki, tmp_path, key, second, refusal):
    """The key must be a positive int; the flag reaches the agent and beats the file."""
    from vproxy.agent.config import parse_agent_config

    assert key not in parse_agent_config({}).settings  # no limit
    assert parse_agent_config({key: 3}).settings == {key: 3}
    for bad, why in ((0, "must be positive"), (-1, "must be positive"),
                     (True, "wrong type"), ("2", "wrong type"), (2.0, "wrong type")):
        with pytest.raises(UserError) as info:
            parse_agent_config({key: bad}, "agent.toml")
        assert key in info.value.message and why in info.value.message

    config = tmp_path / "agent.toml"
    config.write_text("%s = 5\n" % key)
    env = dict(os.environ, PYTHONPATH=ROOT)
    agent = subprocess.Popen(
        [sys.executable, "-m", "vproxy", "serve", "--listen", "127.0.0.1:0", "--config", str(config),
         "--cert", pki.server.cert, "--key", pki.server.key, "--ca", pki.ca, "--crl", pki.crl,
         "--" + key.replace("_", "-"), "1"],
        stderr=subprocess.PIPE, env=env, text=True)
    try:
        line = agent.stderr.readline()
        assert "listening on 127.0.0.1:" in line, line
        address = line.split("listening on ")[1].strip()
        other = getattr(pki, second)

        async def main():
            held = await connect(address, pki.alice.cert, pki.alice.key, pki.ca,
                                 server_name="localhost", timeout=10)
            with pytest.raises(UserError) as info:
                await connect(address, other.cert, other.key, pki.ca,
                              server_name="localhost", timeout=10)
            assert refusal in info.value.message
            await held.close()
        run(main())
    finally:
        agent.terminate()
        agent.wait(10)
    assert agent.returncode == 0


@pytest.mark.parametrize("key", ["max_sessions", "max_sessions_per_identity",
                                 "max_sessions_per_address", "max_streams"])
def test_a_reload_says_a_session_limit_needs_a_restart(tmp_path, key):
    from vproxy.cli.serve import make_reloader

    config = tmp_path / "agent.toml"
    config.write_text("%s = 3\n" % key)
    load = make_reloader(str(config), {}, (), (), None, False, started={})
    assert key in load().needs_restart
    load = make_reloader(str(config), {}, (), (), None, False, started={key: 3})
    assert key not in load().needs_restart
    load = make_reloader(str(config), {}, (), (), None, False, started={}, overridden=[key])
    assert key not in load().needs_restart


# --------------------------------------------------------------------------- builtin_channels

def test_builtin_channels_everyone_acl_and_off(pki, caplog):
    """everyone (the default): any client; acl: the identities a rule grants "bench";
    off: nobody. A refusal is FORBIDDEN, says who, what and why, and is audited at INFO;
    `ls` stays open whatever the setting."""
    from vproxy.agent.acl import Acl, Rule

    acl = Acl([Rule(("alice",), ("*",), ("bench",), ("rw",)),
               Rule(("bob",), ("web*",), ("*",), ("force",))])  # bob: VMs, no bench

    async def echo(client, name="echo"):
        stream = await client.open("", name, options={"bytes": "3"} if name == "source" else None)
        if name == "echo":
            await stream.write(b"hi")
            assert await stream.read() == b"hi"
        await stream.close()

    async def main():
        for policy in ("everyone", "acl", "off"):
            kw = {} if policy == "everyone" else {"builtin_channels": policy}
            agent = await started_agent(pki, **kw)
            agent.acl = acl
            address = agent.addresses[0]
            alice = await connect(address, pki.alice.cert, pki.alice.key, pki.ca,
                                  server_name="localhost")
            bob = await connect(address, pki.bob.cert, pki.bob.key, pki.ca,
                                server_name="localhost")
            for client, name in ((alice, "alice"), (bob, "bob")):
                assert await client.list_vms() == []  # ls: open, and no VMs here
                open_to = policy == "everyone" or (policy == "acl" and name == "alice")
                for channel in ("echo", "sink", "source"):
                    if open_to:
                        await echo(client, channel)
                        continue
                    with pytest.raises(ChannelRefused) as info:
                        await echo(client, channel)
                    why = ("builtin_channels = off" if policy == "off"
                           else 'builtin_channels = acl and no [[allow]] grants "bench"')
                    assert info.value.code == RefuseCode.FORBIDDEN
                    assert info.value.message == (
                        "built-in channel %s is not open to %s on this agent (%s)"
                        % (channel, name, why)), info.value.message
                with pytest.raises(ChannelRefused) as info:  # not a built-in: still says so
                    await client.open("", "nonsense")
                assert info.value.code == RefuseCode.NO_SUCH_CHANNEL
            await alice.close()
            await bob.close()
            await agent.shutdown(drain_timeout=1)

    with caplog.at_level(logging.INFO, logger="vproxy.audit"):
        run(main())
    audit = [r.getMessage() for r in caplog.records
             if r.name == "vproxy.audit" and r.levelno >= logging.INFO]
    refused = [line for line in audit if "is not open to" in line]
    # acl: bob x 3 channels; off: alice and bob x 3
    assert len(refused) == 9, audit
    assert any(line.startswith("identity=bob vm=- channel=source mode=rw result='refused: "
                               "built-in channel source is not open to bob") for line in refused), refused
    assert not any("result='ok'" in line for line in audit)  # successful bench opens: DEBUG


def test_builtin_channels_unknown_value_is_refused_by_the_api(pki):
    with pytest.raises(ValueError) as info:
        Agent(AgentConfig(builtin_channels="ACL"))
    assert "builtin_channels must be one of everyone, acl, off, not 'ACL'" in str(info.value)


def test_builtin_channels_config_key_and_flag_and_bench(pki, tmp_path):
    """The flag beats the file; `vproxy bench` against a closed agent says why in one
    line (exit 2); a reload that finds the key changed says it needs a restart."""
    from vproxy.cli.serve import make_reloader

    config = tmp_path / "agent.toml"
    config.write_text('builtin_channels = "everyone"\n')
    env = dict(os.environ, PYTHONPATH=ROOT)
    agent = subprocess.Popen(
        [sys.executable, "-m", "vproxy", "serve", "--listen", "127.0.0.1:0", "--config", str(config),
         "--cert", pki.server.cert, "--key", pki.server.key, "--ca", pki.ca, "--crl", pki.crl,
         "--builtin-channels", "off"],
        stderr=subprocess.PIPE, env=env, text=True)
    try:
        line = agent.stderr.readline()
        assert "listening on 127.0.0.1:" in line, line
        address = line.split("listening on ")[1].strip()
        out = subprocess.run(
            [sys.executable, "-m", "vproxy", "bench", address, "--cert", pki.alice.cert,
             "--key", pki.alice.key, "--ca", pki.ca, "--seconds", "0.2", "--json"],
            capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 2, (out.returncode, out.stderr)
        assert out.stderr == ("vproxy: error: %s refused: built-in channel sink is not open to "
                              "alice on this agent (builtin_channels = off)\n" % address), out.stderr
    finally:
        agent.terminate()
        agent.wait(10)
    assert agent.returncode == 0

    config.write_text('builtin_channels = "acl"\n')
    load = make_reloader(str(config), {}, (), (), None, False, started={})
    assert "builtin_channels" in load().needs_restart
    load = make_reloader(str(config), {}, (), (), None, False,
                         started={"builtin_channels": "acl"})
    assert "builtin_channels" not in load().needs_restart


# --------------------------------------------------------------------------- the agent's certificate

def test_a_client_ends_its_session_when_the_agents_certificate_expires(tmp_path, caplog):
    """The client watches the agent's certificate as the agent watches the client's:
    at its notAfter the session ends with a reason naming it (streams see it, one log
    line); a session to another agent, from the same process, lives on."""
    import time

    from support.pkitools import issue_expiring
    from vproxy.errors import SessionClosed

    ca_dir, ca, lasting, (alice_cert, alice_key) = _own_ca(tmp_path, "alice")

    async def main():
        other = Agent(AgentConfig(listen_port=0, cert=str(lasting[0]), key=str(lasting[1]), ca=ca))
        await other.start()
        to_other = await connect(other.addresses[0], alice_cert, alice_key, ca,
                                 server_name="localhost")
        # a long-lived agent certificate is looked at again within a day
        loop = asyncio.get_event_loop()
        assert to_other._expiry.when() - loop.time() <= tls.EXPIRY_RECHECK + 1

        short = issue_expiring(ca_dir, "vmhost1", 4, kind="server", dns_names=["localhost"],
                               ip_addresses=["127.0.0.1"])
        not_after = _not_after(short.cert)
        agent = Agent(AgentConfig(listen_port=0, cert=short.cert, key=short.key, ca=ca))
        await agent.start()
        client = await connect(agent.addresses[0], alice_cert, alice_key, ca,
                               server_name="localhost", timeout=3)
        echo = await client.open("", "echo")
        other_echo = await to_other.open("", "echo")
        await echo.write(b"before")
        assert await echo.read() == b"before"

        with pytest.raises(SessionClosed) as info:
            while True:
                await asyncio.wait_for(echo.read(), not_after - time.time() + 5)
        ended = time.time()
        expected = "the agent's certificate (CN vmhost1) expired at %s" % time.strftime(
            "%Y-%m-%d %H:%M:%S UTC", time.gmtime(not_after))
        assert expected in str(info.value), info.value
        assert not_after < ended < not_after + 3, (not_after, ended)
        assert await client.session.wait_closed() == expected
        assert client._expiry is None
        with pytest.raises(SessionClosed):
            await client.open("", "echo")
        # the agent saw the session go (the client said why)
        await _wait_for(lambda: not agent.sessions)

        await other_echo.write(b"goes on")
        assert await other_echo.read() == b"goes on"
        await other_echo.close()
        await client.close()
        await agent.shutdown(drain_timeout=1)
        # a session the agent ends: the watch goes with it (nothing holds the session)
        assert to_other._expiry is not None
        await other.shutdown(drain_timeout=1)
        await to_other.session.wait_closed()
        await _wait_for(lambda: to_other._expiry is None)
        await to_other.close()

    with caplog.at_level(logging.INFO, logger="vproxy.client"):
        run(main())
    lines = [r.getMessage() for r in caplog.records if r.name == "vproxy.client"
             and r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "ending the session: the agent's certificate (CN vmhost1) " \
        "expired at" in lines[0], lines


# --------------------------------------------------------------------------- sessions per address

async def _connect_from(source_ip, address, pki, pair):
    """A vproxy session over real mutual TLS from the source address source_ip (any
    127.x.y.z on Linux): vproxy.client.connect has no source address to bind."""
    import socket

    from vproxy.net.session import Session

    host, port = address.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source_ip, 0))
    sock.setblocking(False)
    loop = asyncio.get_event_loop()
    await loop.sock_connect(sock, (host, int(port)))
    _, session = await loop.create_connection(
        lambda: Session(client=True, name="session from %s" % source_ip), sock=sock,
        ssl=pki.client_context(pair), server_hostname="localhost")
    await session.ping(5)  # served (a refusal ends the session before the answer)
    return session


def test_sessions_from_one_address_beyond_its_limit_are_refused_with_a_reason(pki):
    async def main():
        agent = await started_agent(pki, max_sessions_per_address=2)
        address = agent.addresses[0]
        as_ = functools.partial(_connect_as, agent, pki)

        first = await as_(pki.alice)
        second = await as_(pki.bob)  # another identity, the same address: counted together
        message = await _refused_overloaded(as_(pki.san_client))
        assert "too many sessions from 127.0.0.1: this agent serves at most 2 at once per " \
            "source address" in message, message
        # another address still gets in, and is served
        elsewhere = await _connect_from("127.0.0.2", address, pki, pki.alice)
        assert agent.sessions_per_address == {"127.0.0.1": 2, "127.0.0.2": 1}
        assert len(agent.sessions) == 3
        # closing one from 127.0.0.1 lets it in again
        await first.close()
        await _wait_for(lambda: len(agent.sessions) == 2)
        third = await as_(pki.san_client)
        with pytest.raises(UserError):
            await as_(pki.alice)
        for client in (second, third):
            await client.close()
        elsewhere.close("done")
        await _wait_for(lambda: not agent.sessions)
        assert agent.sessions_per_address == {}
        await agent.shutdown(drain_timeout=1)
    run(main())


def test_local_sessions_are_not_counted_per_address(pki):
    """The unix socket has no source address: max_sessions_per_address leaves it alone."""
    import shutil
    import tempfile

    from vproxy.client.local import connect_local

    where = tempfile.mkdtemp(prefix="vpx")
    path = os.path.join(where, "agent.sock")

    async def main():
        agent = await started_agent(pki, local_socket=path, max_sessions_per_address=1)
        local = [await connect_local(path) for _ in range(3)]
        tls_client = await connect(agent.addresses[0], pki.alice.cert, pki.alice.key, pki.ca,
                                   server_name="localhost")
        with pytest.raises(UserError) as info:
            await connect(agent.addresses[0], pki.bob.cert, pki.bob.key, pki.ca,
                          server_name="localhost", timeout=5)
        assert "at most 1 at once per source address" in info.value.message
        assert len(agent.sessions) == 4
        assert agent.sessions_per_address == {"127.0.0.1": 1}
        for client in local + [tls_client]:
            await client.close()
        await _wait_for(lambda: not agent.sessions)
        await agent.shutdown(drain_timeout=1)

    try:
        run(main())
    finally:
        shutil.rmtree(where, ignore_errors=True)
