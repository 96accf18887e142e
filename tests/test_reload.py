"""Reloading a live agent (SIGHUP): new certificates, CRL, CA and ACL without dropping
the sessions and streams that are still allowed.

In-process tests drive Agent.reload() over real mutual TLS with a stand-in VM provider
(an echo "console"), so each rule of vproxy.reload is pinned down quickly; the last test
does the same through `vproxy serve --config` and SIGHUP against a real QEMU.
"""

import asyncio
import os
import queue
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from support.aio import run
from support.agenttools import read_until, write_agent_config

from vproxy.security import crl as crlmod
from vproxy.security import pki as vpki
from vproxy.security import tls
from vproxy.agent.acl import Acl, Rule
from vproxy.agent.server import Agent, AgentConfig
from vproxy.client.connection import connect
from vproxy.errors import ChannelRefused, SessionClosed, StreamResetError, UserError
from vproxy.mux import RefuseCode
from vproxy.agent.reload import ACL_REVOKED, Settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)


# --------------------------------------------------------------------------- a PKI to change

class Pair(NamedTuple):
    cert: str
    key: str


class Pki(NamedTuple):
    dir: Path
    ca: str
    crl: str
    server: Pair
    alice: Pair
    bob: Pair


def make_pki(where: Path, cn: str = "reload test CA") -> Pki:
    """A CA of its own (tests revoke its certificates), a server and two clients."""
    vpki.init_ca(where, common_name=cn)
    server = Pair(*map(str, vpki.issue(where, "localhost", "server", dns_names=["localhost"],
                                       ip_addresses=["127.0.0.1"])))
    alice = Pair(*map(str, vpki.issue(where, "alice", "client")))
    bob = Pair(*map(str, vpki.issue(where, "bob", "client")))
    return Pki(where, str(where / "ca.pem"), str(where / "crl.pem"), server, alice, bob)


@pytest.fixture
def own_pki(tmp_path):
    return make_pki(tmp_path / "ca")


# --------------------------------------------------------------------------- a stand-in VM

class EchoConsole:
    """A VM channel that echoes: enough to see a stream live or die."""

    info = {"kind": "echo-console"}

    async def run(self, stream):
        while True:
            data = await stream.read()
            if not data:
                await stream.close()
                return
            await stream.write(data)


class EchoVMs:
    """A provider for "vm" opens: every VM exists and every channel echoes."""

    async def open(self, request, identity):
        return EchoConsole()

    async def describe(self):
        return [{"vm": "web1", "state": "running"}]


def rules(*names, **kw):
    return Acl([Rule((name,), **kw) for name in names])


async def start_agent(p: Pki, acl, **kw) -> Agent:
    agent = Agent(AgentConfig(listen_port=0, cert=p.server.cert, key=p.server.key, ca=p.ca,
                              crl=p.crl, **kw), providers={"vm": EchoVMs()}, acl=acl)
    await agent.start()
    return agent


def settings_of(p: Pki, acl, ca=None, crl=None) -> Settings:
    return Settings(cert=p.server.cert, key=p.server.key, ca=ca or p.ca, crl=crl or p.crl, acl=acl)


async def client_of(agent, pair, ca):
    return await connect(agent.addresses[0], pair.cert, pair.key, ca, server_name="localhost",
                         timeout=5)


async def echoes(stream, data=b"ping") -> bool:
    await stream.write(data)
    got = b""
    while len(got) < len(data):
        chunk = await asyncio.wait_for(stream.read(), 5)
        assert chunk, "EOF"
        got += chunk
    return got == data


async def reset_reason(stream) -> Exception:
    """Read until the stream fails; return the exception."""
    try:
        while True:
            chunk = await asyncio.wait_for(stream.read(), 5)
            assert chunk, "the stream ended cleanly instead of failing"
    except (StreamResetError, SessionClosed) as e:
        return e


# --------------------------------------------------------------------------- ACL

def test_a_reload_that_adds_a_rule_lets_a_refused_open_through(own_pki):
    async def main():
        agent = await start_agent(own_pki, rules("alice"))
        bob = await client_of(agent, own_pki.bob, own_pki.ca)
        with pytest.raises(ChannelRefused) as info:
            await bob.open("web1", "console")
        assert info.value.code == RefuseCode.FORBIDDEN
        outcome = await agent.reload(settings_of(own_pki, rules("alice", "bob")))
        assert outcome.sessions_ended == outcome.streams_reset == 0
        stream = await bob.open("web1", "console")  # same session, new rule
        assert await echoes(stream)
        await bob.close()
        await agent.shutdown(drain_timeout=1)
    run(main())


def test_a_reload_that_removes_a_rule_resets_only_that_identitys_streams(own_pki, caplog):
    async def main():
        agent = await start_agent(own_pki, rules("alice", "bob"))
        alice = await client_of(agent, own_pki.alice, own_pki.ca)
        bob = await client_of(agent, own_pki.bob, own_pki.ca)
        a_console = await alice.open("web1", "console")
        a_echo = await alice.open("", "echo")  # a built-in channel: no ACL involved
        b_console = await bob.open("web1", "console")
        assert await echoes(a_console) and await echoes(b_console)

        outcome = await agent.reload(settings_of(own_pki, rules("bob")))
        assert outcome.streams_reset == 1 and outcome.sessions_ended == 0
        error = await reset_reason(a_console)
        assert isinstance(error, StreamResetError) and error.message == ACL_REVOKED
        assert await echoes(b_console, b"bob goes on")
        assert await echoes(a_echo, b"alice's session lives")
        with pytest.raises(ChannelRefused) as info:
            await alice.open("web1", "console")
        assert info.value.code == RefuseCode.FORBIDDEN
        await alice.close()
        await bob.close()
        await agent.shutdown(drain_timeout=1)

    with caplog.at_level("INFO", logger="vproxy.audit"):
        run(main())
    audit = [r.getMessage() for r in caplog.records if r.name == "vproxy.audit"]
    assert any("identity=alice" in line and ACL_REVOKED in line for line in audit), audit


def test_a_reload_that_takes_bench_away_resets_the_built_in_streams_of_that_identity(own_pki):
    """builtin_channels = acl: a `source` stream must not outlive the rule that let it
    open (it can burn the agent's CPU)."""
    async def main():
        bench = dict(vms=("web*",), channels=("bench",))
        agent = await start_agent(own_pki, rules("alice", "bob", **bench), builtin_channels="acl")
        alice = await client_of(agent, own_pki.alice, own_pki.ca)
        bob = await client_of(agent, own_pki.bob, own_pki.ca)
        a_echo = await alice.open("", "echo")
        b_echo = await bob.open("", "echo")
        assert await echoes(a_echo) and await echoes(b_echo)
        outcome = await agent.reload(settings_of(own_pki, rules("bob", **bench)))
        assert outcome.streams_reset == 1
        error = await reset_reason(a_echo)
        assert isinstance(error, StreamResetError) and error.message == ACL_REVOKED
        assert await echoes(b_echo, b"bob goes on")
        await alice.close()
        await bob.close()
        await agent.shutdown(drain_timeout=1)
    run(main())


def test_a_mode_taken_away_resets_the_stream_that_used_it(own_pki):
    async def main():
        agent = await start_agent(own_pki, rules("alice"))
        alice = await client_of(agent, own_pki.alice, own_pki.ca)
        rw = await alice.open("web1", "console", "rw")
        ro = await alice.open("web1", "console", "ro")
        outcome = await agent.reload(settings_of(own_pki, rules("alice", modes=("ro",))))
        assert outcome.streams_reset == 1
        assert isinstance(await reset_reason(rw), StreamResetError)
        assert await echoes(ro)
        await alice.close()
        await agent.shutdown(drain_timeout=1)
    run(main())


# --------------------------------------------------------------------------- CRL and CA

def test_a_revoked_client_loses_its_session_and_the_others_keep_theirs(own_pki):
    async def main():
        agent = await start_agent(own_pki, rules("alice", "bob"))
        alice = await client_of(agent, own_pki.alice, own_pki.ca)
        bob = await client_of(agent, own_pki.bob, own_pki.ca)
        a_console = await alice.open("web1", "console")
        b_console = await bob.open("web1", "console")

        vpki.revoke(own_pki.dir, "alice")  # rewrites crl.pem in place
        outcome = await agent.reload(settings_of(own_pki, rules("alice", "bob")))
        assert outcome.sessions_ended == 1

        error = await reset_reason(a_console)
        assert isinstance(error, SessionClosed)
        reason = await alice.session.wait_closed()
        assert "alice" in reason and "revoked" in reason and "SHUTDOWN" in reason, reason
        assert await echoes(b_console, b"bob goes on")
        assert len(agent.sessions) == 1
        # and alice cannot come back: the new context has the new CRL
        with pytest.raises(UserError) as info:
            await client_of(agent, own_pki.alice, own_pki.ca)
        assert "revoked" in info.value.message
        await bob.close()
        await agent.shutdown(drain_timeout=1)
    run(main())


def test_a_ca_taken_out_of_the_ca_file_ends_the_sessions_it_signed(tmp_path):
    one = make_pki(tmp_path / "one", "first CA")
    two = make_pki(tmp_path / "two", "second CA")
    both_ca = tmp_path / "both-ca.pem"
    both_crl = tmp_path / "both-crl.pem"
    both_ca.write_bytes(Path(one.ca).read_bytes() + Path(two.ca).read_bytes())
    both_crl.write_bytes(Path(one.crl).read_bytes() + Path(two.crl).read_bytes())

    async def main():
        agent = Agent(AgentConfig(listen_port=0, cert=one.server.cert, key=one.server.key,
                                  ca=str(both_ca), crl=str(both_crl)),
                      providers={"vm": EchoVMs()}, acl=rules("alice", "bob"))
        await agent.start()
        # the server's certificate is from the first CA: every client checks it with that
        alice = await client_of(agent, one.alice, one.ca)  # issued by the first CA
        bob = await client_of(agent, two.bob, one.ca)      # issued by the second CA
        a = await alice.open("web1", "console")
        b = await bob.open("web1", "console")
        outcome = await agent.reload(Settings(cert=one.server.cert, key=one.server.key,
                                              ca=two.ca, crl=two.crl, acl=rules("alice", "bob")))
        assert outcome.sessions_ended == 1
        assert isinstance(await reset_reason(a), SessionClosed)
        assert "no longer signed by a CA the agent trusts" in await alice.session.wait_closed()
        assert await echoes(b)
        await bob.close()
        await agent.shutdown(drain_timeout=1)
    run(main())


def test_a_handshake_under_way_during_the_reload_is_judged_by_the_new_crl(own_pki):
    """The TCP connection is accepted (and wrapped with the old context) before the
    reload; the client's handshake comes after it. The new CRL still keeps it out."""
    result = {}
    go = threading.Event()

    def slow_client(address):
        host, port = address.rsplit(":", 1)
        raw = socket.create_connection((host, int(port)), timeout=10)
        go.wait(10)
        ctx = tls.client_context(own_pki.alice.cert, own_pki.alice.key, own_pki.ca)
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                result["data"] = s.recv(100)  # the agent hangs up
        except (ssl.SSLError, OSError) as e:
            result["error"] = e

    async def main():
        agent = await start_agent(own_pki, rules("alice", "bob"))
        thread = threading.Thread(target=slow_client, args=(agent.addresses[0],), daemon=True)
        thread.start()
        await asyncio.sleep(0.3)  # accepted: its SSLSocket has the old context
        vpki.revoke(own_pki.dir, "alice")
        await agent.reload(settings_of(own_pki, rules("alice", "bob")))
        go.set()
        await asyncio.get_event_loop().run_in_executor(None, thread.join, 10)
        assert not agent.sessions
        assert agent.metrics.handshake_failures == 1
        await agent.shutdown(drain_timeout=1)
    run(main())
    assert result.get("data", b"") == b"" or "error" in result


# --------------------------------------------------------------------------- bad reloads

def test_a_reload_with_a_bad_file_keeps_everything_as_it_was(own_pki, tmp_path):
    bad_crl = tmp_path / "bad-crl.pem"
    bad_crl.write_text("-----BEGIN X509 CRL-----\nnot base64 at all\n-----END X509 CRL-----\n")

    async def main():
        agent = await start_agent(own_pki, rules("alice"))
        alice = await client_of(agent, own_pki.alice, own_pki.ca)
        stream = await alice.open("web1", "console")
        context = agent._ssl
        for bad in (settings_of(own_pki, Acl(), crl=str(bad_crl)),
                    Settings(cert=str(tmp_path / "missing.pem"), key=own_pki.server.key,
                             ca=own_pki.ca, crl=own_pki.crl, acl=Acl())):
            with pytest.raises(UserError) as info:
                await agent.reload(bad)
            assert str(tmp_path) in info.value.message  # names the file
        def broken_loader():
            raise UserError("config file /x: not valid TOML")
        with pytest.raises(UserError):
            await agent.reload(broken_loader)
        assert agent._ssl is context and agent.acl.rules == [Rule(("alice",))]
        assert await echoes(stream)  # the empty ACL of the bad settings was not applied
        assert agent.metrics.reloads == {"ok": 0, "failed": 3}
        again = await client_of(agent, own_pki.bob, own_pki.ca)  # new handshakes work
        await again.close()
        await alice.close()
        await agent.shutdown(drain_timeout=1)
    run(main())


# --------------------------------------------------------------------------- vproxy.crl

def test_the_der_reader_agrees_with_cryptography(own_pki):
    from cryptography import x509
    from cryptography.x509.oid import ExtensionOID

    vpki.revoke(own_pki.dir, "bob")
    for path in (own_pki.ca, own_pki.server.cert, own_pki.alice.cert, own_pki.bob.cert):
        pem = Path(path).read_bytes()
        ours = crlmod.parse_certificate(crlmod.pem_blocks(pem, "CERTIFICATE")[0])
        theirs = x509.load_pem_x509_certificate(pem)
        assert ours.serial == theirs.serial_number
        assert ours.issuer == theirs.issuer.public_bytes()
        assert ours.subject == theirs.subject.public_bytes()
        ski = theirs.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_KEY_IDENTIFIER)
        assert ours.subject_key_id == ski.value.digest
    crl_pem = Path(own_pki.crl).read_bytes()
    ours = crlmod.parse_crl(crlmod.pem_blocks(crl_pem, "X509 CRL")[0])
    theirs = x509.load_pem_x509_crl(crl_pem)
    assert ours.revoked == {r.serial_number for r in theirs}
    assert ours.issuer == theirs.issuer.public_bytes()
    trust = crlmod.Trust.load(own_pki.ca, own_pki.crl)
    bob = crlmod.parse_certificate(crlmod.pem_blocks(Path(own_pki.bob.cert).read_bytes(),
                                                     "CERTIFICATE")[0])
    alice = crlmod.parse_certificate(crlmod.pem_blocks(Path(own_pki.alice.cert).read_bytes(),
                                                       "CERTIFICATE")[0])
    assert trust.is_revoked(bob) and not trust.is_revoked(alice)


def test_the_der_reader_fails_only_with_its_own_error(own_pki):
    """Truncations, bit flips and random bytes: a CertificateFormatError or a result,
    never another exception."""
    import random

    rng = random.Random(5)
    samples = [crlmod.pem_blocks(Path(own_pki.alice.cert).read_bytes(), "CERTIFICATE")[0],
               crlmod.pem_blocks(Path(own_pki.crl).read_bytes(), "X509 CRL")[0]]
    for der in samples:
        cases = [der[:n] for n in range(len(der))]
        for _ in range(3000):
            b = bytearray(der)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            cases.append(bytes(b))
        cases += [bytes(rng.randrange(256) for _ in range(rng.randint(0, 64))) for _ in range(500)]
        for case in cases:
            for parse in (crlmod.parse_certificate, crlmod.parse_crl):
                try:
                    parse(case)
                except crlmod.CertificateFormatError:
                    pass


# --------------------------------------------------------------------------- the real thing

class ServeProcess:
    """`vproxy serve --config FILE` with its stderr lines in a queue."""

    def __init__(self, config: Path, *args, env=None):
        self.proc = subprocess.Popen([sys.executable, "-m", "vproxy", "serve", "--config", str(config)]
                                     + list(args), stderr=subprocess.PIPE, text=True,
                                     env=env or ENV)
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.seen = []
        threading.Thread(target=self._pump, daemon=True).start()
        line = self.expect("listening on")
        self.address = line.split("listening on ")[1].strip().strip('"}').split('"')[0]

    def _pump(self):
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))

    def expect(self, text: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=min(max(left, 0.01), 0.5))
            except queue.Empty:
                if left > 0 and self.proc.poll() is None:
                    continue
                raise AssertionError("no line with %r (exit status %s); saw %r"
                                     % (text, self.proc.poll(), self.seen[-20:])) from None
            self.seen.append(line)
            if text in line:
                return line

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)


@pytest.mark.qemu
@pytest.mark.slow
def test_sighup_against_a_real_vm(own_pki, tmp_path):
    """Through `vproxy serve --config` and SIGHUP, with the boot-sector guest's console:
    a rule added, a rule removed, a client revoked, a broken file: each as promised."""
    from support.vmtools import boot_sector_vm

    vm = boot_sector_vm(tmp_path / "vm", name="web1")
    vm.start()
    config = tmp_path / "agent.toml"
    vms = [("web1", str(vm.qmp_path))]
    alice_rule = {"identities": ["alice"], "channels": ["console"], "modes": ["rw"]}
    bob_ro = {"identities": ["bob"], "channels": ["console"], "modes": ["ro"]}
    bob_rw = {"identities": ["bob"], "channels": ["console"], "modes": ["rw"]}
    write_agent_config(config, own_pki, vms, [alice_rule, bob_ro])
    agent = ServeProcess(config)
    try:
        async def main():
            alice = await connect(agent.address, own_pki.alice.cert, own_pki.alice.key,
                                  own_pki.ca, server_name="localhost")
            bob = await connect(agent.address, own_pki.bob.cert, own_pki.bob.key,
                                own_pki.ca, server_name="localhost")
            a_console = await alice.open("web1", "console", "rw")
            await a_console.write(b"one\r")
            await read_until(a_console, b"ONE\r\n")
            with pytest.raises(ChannelRefused):
                await bob.open("web1", "console", "rw")

            # 1. a rule added: bob may now type (he waits for the writer role)
            write_agent_config(config, own_pki, vms, [alice_rule, bob_rw])
            agent.signal(signal.SIGHUP)
            agent.expect("reloaded")
            b_console = await bob.open("web1", "console", "rw")

            # 2. alice's rule removed: her console is reset, bob's flows and he writes
            write_agent_config(config, own_pki, vms, [bob_rw])
            agent.signal(signal.SIGHUP)
            assert "reset 1 stream(s)" in agent.expect("reloaded")
            error = await reset_reason(a_console)
            assert isinstance(error, StreamResetError) and error.message == ACL_REVOKED
            await asyncio.sleep(0.2)  # the writer role passes to bob
            await b_console.write(b"two\r")
            await read_until(b_console, b"TWO\r\n")
            a_echo = await alice.open("", "echo")  # alice's session is still there

            # 3. a broken file: nothing changes
            config.write_text("this is [not toml\n")
            agent.signal(signal.SIGHUP)
            line = agent.expect("reload failed")
            assert "keeping the previous settings" in line and str(config) in line
            await b_console.write(b"three\r")
            await read_until(b_console, b"THREE\r\n")
            with pytest.raises(ChannelRefused):
                await alice.open("web1", "console", "rw")  # still the second ACL

            # 4. alice revoked: her session ends; bob's console goes on
            write_agent_config(config, own_pki, vms, [alice_rule, bob_rw])
            vpki.revoke(own_pki.dir, "alice")
            agent.signal(signal.SIGHUP)
            assert "ended 1 session(s)" in agent.expect("reloaded")
            assert isinstance(await reset_reason(a_echo), SessionClosed)
            assert "revoked" in await alice.session.wait_closed()
            await b_console.write(b"four\r")
            await read_until(b_console, b"FOUR\r\n")
            await bob.close()

        asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        rc = agent.stop()
        vm.terminate()
    assert rc == 0


@pytest.mark.qemu
@pytest.mark.slow
def test_sighup_changes_the_vm_list(own_pki, tmp_path):
    """A VM added to the file is served after SIGHUP; a VM taken out has its streams
    reset with a reason that says so, and the other VM's streams go on."""
    from support.vmtools import boot_sector_vm

    web1 = boot_sector_vm(tmp_path / "web1", name="web1", vnc=False)
    web2 = boot_sector_vm(tmp_path / "web2", name="web2", vnc=False)
    web1.start()
    web2.start()
    config = tmp_path / "agent.toml"
    rule = {"identities": ["alice"]}
    write_agent_config(config, own_pki, [("web1", str(web1.qmp_path))], [rule])
    agent = ServeProcess(config)
    try:
        async def main():
            alice = await connect(agent.address, own_pki.alice.cert, own_pki.alice.key,
                                  own_pki.ca, server_name="localhost")
            one = await alice.open("web1", "console")
            with pytest.raises(ChannelRefused) as info:
                await alice.open("web2", "console")
            assert info.value.code == RefuseCode.NO_SUCH_VM

            write_agent_config(config, own_pki, [("web1", str(web1.qmp_path)),
                                           ("web2", str(web2.qmp_path))], [rule])
            agent.signal(signal.SIGHUP)
            assert "VMs added: web2" in agent.expect("reloaded")
            deadline = time.monotonic() + 30
            while True:  # the agent connects to web2's QMP socket in the background
                states = {vm["vm"]: vm["state"] for vm in await alice.list_vms()}
                if states.get("web2", "absent") != "absent":
                    break
                assert time.monotonic() < deadline, states
                await asyncio.sleep(0.1)
            two = await alice.open("web2", "console")
            await two.write(b"two\r")
            await read_until(two, b"TWO\r\n")

            write_agent_config(config, own_pki, [("web2", str(web2.qmp_path))], [rule])
            agent.signal(signal.SIGHUP)
            assert "VMs removed: web1" in agent.expect("reloaded")
            error = await reset_reason(one)
            assert isinstance(error, StreamResetError)
            assert error.message == "VM web1 was removed from the agent's configuration"
            await two.write(b"still\r")
            await read_until(two, b"STILL\r\n")
            assert [vm["vm"] for vm in await alice.list_vms()] == ["web2"]
            await alice.close()

        asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        rc = agent.stop()
        web1.terminate()
        web2.terminate()
    assert rc == 0
