"""Local mode: the agent on a unix socket, no certificates, clients known by their uid.

Proves: the kernel's SO_PEERCRED uid becomes an identity named uid:N and user:NAME;
the same ACL allows and denies it (root included: nothing implicit); audit lines name
it; a stale socket file is replaced and a live one is not; the client connects with
HOST given as unix:/path.
"""

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from support.aio import run
from support.vmtools import BOOT_SECTOR_BANNER, boot_sector_vm
from vproxy.agent.acl import Acl, Rule
from vproxy.agent.server import Agent, AgentConfig
from vproxy.client.connection import AgentClient
from vproxy.errors import ChannelRefused, UserError
from vproxy.net.peercred import LocalIdentity, identity_for_uid
from vproxy.client.local import connect_local
from vproxy.mux import OpenRequest, RefuseCode
from vproxy.net.session import Session

NOBODY = 65534
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def sockdir():
    """A directory other users can reach (pytest's tmp dirs are 0700)."""
    path = tempfile.mkdtemp(prefix="vpl")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_identity_names_and_text():
    alice = LocalIdentity(1000, 1000, 42, "alice")
    assert alice.names() == ("uid:1000", "user:alice")
    assert str(alice) == "uid:1000(alice)"
    anonymous = identity_for_uid(54321)  # no passwd entry
    assert anonymous.names() == ("uid:54321",) and str(anonymous) == "uid:54321"
    assert identity_for_uid(0).names() == ("uid:0", "user:root")


def test_the_acl_matches_uid_and_user_names_and_root_gets_nothing_implicit():
    acl = Acl([Rule(("user:alice",), ("web*",), ("console",), ("rw",)),
               Rule(("uid:2000",), ("*",), ("vnc",), ("rw",))])
    console = OpenRequest("web1", "console", "rw", {})
    assert acl.allows(LocalIdentity(1000, user="alice"), console)
    assert not acl.allows(LocalIdentity(1001, user="bob"), console)
    assert acl.allows(LocalIdentity(2000), OpenRequest("db", "vnc", "rw", {}))
    root = identity_for_uid(0)
    with pytest.raises(ChannelRefused) as info:
        acl.check(root, console)
    assert "uid:0(root) may not open console of VM web1" in info.value.message
    # "alice" alone (a certificate CN rule) does not match the local user alice
    assert not Acl([Rule(("alice",))]).allows(LocalIdentity(1000, user="alice"), console)


def test_a_local_session_needs_no_certificate(sockdir):
    path = os.path.join(sockdir, "agent.sock")

    async def main():
        agent = Agent(AgentConfig(local_socket=path), acl=Acl())
        await agent.start()
        assert agent.addresses == ["unix:%s" % path]  # no TLS listener without a certificate
        assert os.stat(path).st_mode & 0o777 == 0o666
        client = await connect_local(path)
        echo = await client.open("", "echo")
        await echo.write(b"over the local socket")
        await echo.close()
        assert await echo.read() == b"over the local socket" and await echo.read() == b""
        assert await client.list_vms() == []
        (session,) = agent.sessions
        assert session.peer_identity == identity_for_uid(os.getuid(), os.getgid(), os.getpid())
        await client.close()
        await agent.shutdown()
        assert not os.path.exists(path)  # the agent removes its socket

    run(main())


def test_stale_socket_is_replaced_and_a_live_one_refused(sockdir):
    path = os.path.join(sockdir, "agent.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays; nobody listens

    async def main():
        agent = Agent(AgentConfig(local_socket=path), acl=Acl())
        await agent.start()
        second = Agent(AgentConfig(local_socket=path), acl=Acl())
        with pytest.raises(UserError) as info:
            await second.start()
        assert "another agent listens there" in info.value.message
        await agent.shutdown()
        with pytest.raises(UserError) as info:
            await connect_local(path)
        assert "no agent socket" in info.value.message

    run(main())


def connect_as_uid(path: str, uid: int) -> socket.socket:
    """A unix socket connected to `path` by a process running as `uid`: a child process
    connects, then hands us the connected socket (SO_PEERCRED keeps the connecter's
    credentials, taken at connect())."""
    ours, theirs = socket.socketpair()
    script = ("import socket,sys\n"
              "s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
              "socket.send_fds(socket.socket(fileno=int(sys.argv[2])), [b'x'], [s.fileno()])\n")
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    subprocess.run([python, "-c", script, path, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                   user=uid, check=True, timeout=30)
    theirs.close()
    _, fds, _, _ = socket.recv_fds(ours, 16, 1)
    ours.close()
    return socket.socket(fileno=fds[0])


async def client_on(sock: socket.socket) -> AgentClient:
    loop = asyncio.get_event_loop()
    _, session = await loop.create_unix_connection(lambda: Session(client=True), sock=sock)
    await session.ping()
    return AgentClient(session, "unix")


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another uid")
@pytest.mark.qemu
@pytest.mark.slow
def test_uids_are_allowed_and_denied_by_the_acl_on_a_real_vm(sockdir, tmp_path, caplog):
    # paused until the agent holds the console (resume_prelaunch): a guest that ran first
    # would print its banner into the null chardev, and the test would wait for it forever
    vm = boot_sector_vm(tmp_path / "vm", name="web1", paused=True)
    vm.start()
    path = os.path.join(sockdir, "agent.sock")
    acl = Acl([Rule(("user:root",), ("web1",), ("console",), ("rw",)),
               Rule(("uid:%d" % NOBODY,), ("web1",), ("console",), ("ro",))])

    async def main():
        agent = Agent(AgentConfig(local_socket=path, vms=[("web1", str(vm.qmp_path))],
                                  resume_prelaunch=True), acl=acl)
        await agent.start()
        try:
            root = await connect_local(path)
            console = await root.open("web1", "console", "rw", {"replay": "all"})
            data = b""
            while BOOT_SECTOR_BANNER not in data:  # input sent before the guest runs is lost
                data += await asyncio.wait_for(console.read(), 20)
            await console.write(b"local\r")
            while b"LOCAL" not in data:
                data += await asyncio.wait_for(console.read(), 20)
            with pytest.raises(ChannelRefused) as info:
                await root.open("web1", "vnc", "rw")
            assert info.value.code == RefuseCode.FORBIDDEN
            assert "uid:0(root) may not open vnc of VM web1: no ACL rule grants it" in info.value.message

            nobody = await client_on(await asyncio.get_event_loop().run_in_executor(
                None, connect_as_uid, path, NOBODY))
            with pytest.raises(ChannelRefused) as info:
                await nobody.open("web1", "console", "rw")
            assert "uid:65534(nobody) may not open console of VM web1: mode rw is not granted" \
                in info.value.message
            viewer = await nobody.open("web1", "console", "ro")
            await console.write(b"seen\r")
            data = b""
            while b"SEEN" not in data:
                data += await asyncio.wait_for(viewer.read(), 20)
            viewers = (await nobody.list_vms())[0]["consoles"][0]["viewers"]
            assert "uid:65534(nobody)" in viewers and "uid:0(root)" in viewers
            await nobody.close()
            await root.close()
        finally:
            await agent.shutdown()

    with caplog.at_level(logging.INFO, logger="vproxy.audit"):
        try:
            run(main())
        finally:
            vm.terminate()
    audit = [r.getMessage() for r in caplog.records if r.name == "vproxy.audit"]
    assert any(line.startswith("identity=uid:0(root) vm=web1 channel=console mode=rw result=") for line in audit), audit
    assert any(line.startswith("identity=uid:65534(nobody) vm=web1 channel=console mode=rw result='refused:")
               for line in audit), audit
    assert any(line.startswith("identity=uid:0(root) vm=web1 channel=vnc mode=rw result='refused:")
               for line in audit), audit


def _open_files_limit(pid):
    with open("/proc/%d/limits" % pid) as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), hard
    raise AssertionError("no Max open files in /proc/%d/limits" % pid)


@pytest.mark.parametrize("lowered", [True, False])
def test_serve_raises_its_open_files_limit_to_the_hard_limit(sockdir, lowered):
    """1,000 VMs need ~2,000 descriptors: `vproxy serve` lifts a low soft RLIMIT_NOFILE
    (1024 on many systems) to the hard limit at start, with a line saying so."""
    import resource  # lazy: POSIX only, like the code under test

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("the hard limit on open files (%d) is too low to lower the soft one" % hard)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20

    def lower():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256 if lowered else hard, hard))

    sock = os.path.join(sockdir, "agent.sock")
    agent = subprocess.Popen([sys.executable, "-m", "vproxy", "serve", "--local-socket", sock],
                             stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lower, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        lines = []
        for line in agent.stderr:
            lines.append(line)
            if "listening on" in line:
                break
        assert any("listening on" in line for line in lines), "".join(lines)
        raised = [line for line in lines if "open files limit" in line]
        if lowered:
            assert raised == ["vproxy: open files limit raised from 256 to %d (the hard limit)\n" % want]
            assert _open_files_limit(agent.pid)[0] == want
        else:
            assert raised == []
    finally:
        agent.terminate()
        agent.communicate(timeout=20)
