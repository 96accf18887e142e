"""`vproxy forward` and `vproxy vnc`: local listeners whose connections are streams.

Proves, with real QEMU guests, the real agent process and the real CLI:
- a console forwarded to a local TCP port and to a unix socket: what we type comes
  back uppercased from the boot-sector guest; half-close passes through (we shut our
  write side, still read the echo, then the end);
- a guest channel of the Linux guest forwarded to a unix socket, as a guest-agent
  client would use it;
- a real VNC client (vncdotool) saves a screenshot through `vproxy vnc --no-viewer`;
- `vproxy vnc` starts the first viewer on PATH with that viewer's address syntax and
  ends when it does (stub viewers that record their arguments: our own stand-ins for
  an external program);
- clear refusals: a VM without VNC, no viewer, listening beyond loopback, a channel the
  agent refuses; and the bridging itself: half-close both ways, reset on errors.
"""

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from support.vmtools import boot_sector_vm, linux_vm
from support.vmtools import read_until as sock_read_until
from vproxy.agent.acl import Acl
from vproxy.agent.server import Agent, AgentConfig
from vproxy.errors import UserError
from vproxy.client.forward import Forwarder
from vproxy.net.address import ListenAddress, check_listen_safety, parse_listen
from vproxy.client.local import connect_local
from vproxy.client.vncviewer import find_viewer, viewer_argument

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def clean_env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT, **extra)
    for name in ("VPROXY_IDENTITY", "VPROXY_CERT", "VPROXY_KEY", "VPROXY_CA", "VPROXY_CRL",
                 "VPROXY_CLIENT_CONFIG"):
        env.pop(name, None)
    return env


class Agent_:
    """`vproxy serve` in a child process: TLS on 127.0.0.1 (with a PKI) and/or a local socket."""

    def __init__(self, tmp_path, vms, allow, pki=None, local_socket=None):
        self.audit = tmp_path / "audit.log"
        lines = ['audit_log = "%s"' % self.audit]
        if pki is not None:
            lines += ['listen = "127.0.0.1:0"', 'cert = "%s"' % pki.server.cert,
                      'key = "%s"' % pki.server.key, 'ca = "%s"' % pki.ca]
        if local_socket:
            lines.append('local_socket = "%s"' % local_socket)
        for name, qmp in vms:
            lines += ["[[vm]]", 'name = "%s"' % name, 'qmp = "%s"' % qmp]
        for rule in allow:
            lines += ["[[allow]]"] + ["%s = %s" % (k, json.dumps(v)) for k, v in rule.items()]
        config = tmp_path / "agent.toml"
        config.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([sys.executable, "-m", "vproxy", "serve", "--config", str(config)],
                                     stderr=subprocess.PIPE, env=clean_env(), text=True)
        line = self.proc.stderr.readline()
        assert "listening on" in line, line + self.proc.stderr.read()
        self.address = line.split("listening on ")[1].strip()

    def audit_lines(self):
        return self.audit.read_text().splitlines() if self.audit.exists() else []

    def stop(self):
        self.proc.terminate()
        self.proc.wait(15)


class Cli:
    """A long-running vproxy command; `address` is the first line it prints on stdout."""

    def __init__(self, args, env=None, expect_address=True):
        self.proc = subprocess.Popen([sys.executable, "-m", "vproxy"] + list(args), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env or clean_env(), text=True)
        self.address = None
        if expect_address:
            line = self.proc.stdout.readline().strip()
            if not line:
                self.proc.wait(30)
                raise AssertionError("no address printed; stderr: %s" % self.proc.stderr.read())
            self.address = line

    def tcp(self):
        host, _, port = self.address.rpartition(":")
        return socket.create_connection((host, int(port)), timeout=30)

    def unix(self):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(self.address[len("unix:"):])
        return sock

    def stop(self, sig=signal.SIGINT):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode, self.proc.stderr.read()


def tls_args(pki):
    return ["--cert", pki.alice.cert, "--key", pki.alice.key, "--ca", pki.ca]


def read_to_eof(sock, timeout=30.0):
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


@pytest.fixture
def bootvm(tmp_path):
    vm = boot_sector_vm(tmp_path / "vm", name="web1")
    vm.start()
    yield vm
    vm.terminate()


# --------------------------------------------------------------------------- units

def test_listen_addresses():
    assert parse_listen("127.0.0.1:5901") == ListenAddress("tcp", "127.0.0.1", 5901)
    assert parse_listen("5901") == ListenAddress("tcp", "127.0.0.1", 5901)
    assert parse_listen(":0") == ListenAddress("tcp", "127.0.0.1", 0)
    assert parse_listen("[::1]:7000") == ListenAddress("tcp", "::1", 7000)
    assert parse_listen("unix:/run/x.sock") == ListenAddress("unix", path="/run/x.sock")
    assert parse_listen("./x.sock").path == os.path.abspath("x.sock")
    assert str(parse_listen("[::1]:7000")) == "[::1]:7000"
    for bad in ("", "host:port", "1:2:3", "[::1]", "unix:", "127.0.0.1:70000"):
        with pytest.raises(UserError):
            parse_listen(bad)
    for safe in ("127.0.0.1:0", "127.8.9.10:1", "[::1]:0", "localhost:0", "unix:/x"):
        check_listen_safety(parse_listen(safe), unsafe=False)
    for unsafe in ("0.0.0.0:5900", "[::]:1", "192.0.2.1:1", "example.org:1"):
        with pytest.raises(UserError) as info:
            check_listen_safety(parse_listen(unsafe), unsafe=False)
        assert "--unsafe-listen" in info.value.hint
        check_listen_safety(parse_listen(unsafe), unsafe=True)


def test_viewer_address_syntax():
    tcp = ListenAddress("tcp", "127.0.0.1", 41234)
    assert viewer_argument("vncviewer", tcp) == "127.0.0.1::41234"
    assert viewer_argument("remote-viewer", tcp) == "vnc://127.0.0.1:41234"
    assert viewer_argument("gvncviewer", tcp) == "127.0.0.1:35334"  # a display number
    v6 = ListenAddress("tcp", "::1", 6000)
    assert viewer_argument("vncviewer", v6) == "[::1]::6000"
    assert viewer_argument("remote-viewer", v6) == "vnc://[::1]:6000"
    with pytest.raises(UserError):
        viewer_argument("gvncviewer", v6)
    with pytest.raises(UserError) as info:
        viewer_argument("gvncviewer", ListenAddress("tcp", "127.0.0.1", 5000))
    assert "5900" in info.value.message
    wildcard = ListenAddress("tcp", "0.0.0.0", 5999)
    assert viewer_argument("gvncviewer", wildcard) == "127.0.0.1:99"
    unix = ListenAddress("unix", path="/tmp/v.sock")
    assert viewer_argument("remote-viewer", unix) == "vnc+unix:///tmp/v.sock"
    assert viewer_argument("vncviewer", unix) == "/tmp/v.sock"
    assert viewer_argument("gvncviewer", unix) == "/tmp/v.sock"


def stub_viewers(directory, names, exit_code=0):
    """Stand-ins for the external viewers: each records its arguments; the vncviewer one
    also connects like a viewer and records the RFB greeting it gets."""
    directory.mkdir(exist_ok=True)
    for name in names:
        path = directory / name
        path.write_text("""#!%s
import json, socket, sys
record = {"name": %r, "args": sys.argv[1:]}
if %r == "vncviewer":
    host, _, port = sys.argv[1].rpartition("::")
    s = socket.create_connection((host, int(port)), timeout=30)
    record["greeting"] = s.recv(12).decode()
open(%r, "a").write(json.dumps(record) + "\\n")
sys.exit(%d)
""" % (sys.executable, name, name, str(directory / "calls.jsonl"), exit_code))
        path.chmod(0o755)
    return directory


def test_viewer_search_order(tmp_path):
    stub_viewers(tmp_path / "a", ["gvncviewer", "remote-viewer"])
    assert find_viewer(str(tmp_path / "a"))[0] == "remote-viewer"
    stub_viewers(tmp_path / "b", ["gvncviewer", "remote-viewer", "vncviewer"])
    assert find_viewer(str(tmp_path / "b")) == ("vncviewer", str(tmp_path / "b" / "vncviewer"))
    assert find_viewer(str(tmp_path / "empty")) is None


def test_bridge_half_close_both_ways_and_reset(tmp_path):
    """Through the agent's built-in echo over local mode: a listener on TCP and one on a
    unix socket; EOF each way; a dead session resets the local connection."""
    path = str(tmp_path / "agent.sock")

    async def main():
        agent = Agent(AgentConfig(local_socket=path), acl=Acl())
        await agent.start()
        client = await connect_local(path)
        opener = lambda: client.open("", "echo")  # noqa: E731
        for listen in (parse_listen("127.0.0.1:0"), parse_listen("unix:%s/fwd.sock" % tmp_path)):
            forwarder = Forwarder(listen, opener)
            address = await forwarder.start()
            if address.kind == "unix":
                assert stat.S_IMODE(os.stat(address.path).st_mode) == 0o600
                reader, writer = await asyncio.open_unix_connection(address.path)
            else:
                reader, writer = await asyncio.open_connection(address.host, address.port)
            writer.write(b"x" * 300000)
            writer.write_eof()  # half-close: the echo still comes back, then EOF
            assert await asyncio.wait_for(reader.read(), 20) == b"x" * 300000
            writer.close()
            await forwarder.close()
            if address.kind == "unix":
                assert not os.path.exists(address.path)

        forwarder = Forwarder(parse_listen("127.0.0.1:0"), opener)
        address = await forwarder.start()
        reader, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 20) == b"ping"
        await client.close()  # the session ends: the local connection is reset, not closed
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 20)
        writer.close()
        await forwarder.close()
        await agent.shutdown()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_refusals_before_anything_starts(tmp_path):
    env = clean_env(PATH=str(tmp_path / "empty"))
    out = subprocess.run([sys.executable, "-m", "vproxy", "vnc", "unix:/nonexistent.sock", "web1"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("vproxy: error: no VNC viewer found"), out.stderr
    out = subprocess.run([sys.executable, "-m", "vproxy", "forward", "unix:/nonexistent.sock", "web1", "console",
                          "--listen", "0.0.0.0:0"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2 and "refusing to listen on 0.0.0.0:0" in out.stderr
    assert "--unsafe-listen" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "vproxy", "forward", "unix:/nonexistent.sock", "web1", "disk"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2 and "unknown channel 'disk'" in out.stderr
    out = subprocess.run([sys.executable, "-m", "vproxy", "forward", "unix:/nonexistent.sock", "web1", "console"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2 and "no agent socket at /nonexistent.sock" in out.stderr


# --------------------------------------------------------------------------- QEMU

@pytest.mark.qemu
@pytest.mark.slow
def test_forward_a_console_to_a_tcp_port(pki, tmp_path, bootvm):
    agent = Agent_(tmp_path, [("web1", bootvm.qmp_path)],
                   [{"identities": ["alice"], "vms": ["web1"], "channels": ["console"], "modes": ["rw"]}],
                   pki=pki)
    fwd = Cli(["forward", agent.address, "web1", "console", "--listen", "127.0.0.1:0"] + tls_args(pki))
    refused = Cli(["forward", agent.address, "web1", "vnc"] + tls_args(pki))
    try:
        conn = fwd.tcp()
        buf = bytearray()
        # the guest may still be booting: retype until its echo shows
        deadline = time.monotonic() + 30
        while True:
            conn.sendall(b"through a port\r")
            try:
                sock_read_until(conn, b"THROUGH A PORT\r\n", timeout=2, buf=buf)
                break
            except TimeoutError:
                assert time.monotonic() < deadline
        conn.sendall(b"last words\r")
        conn.shutdown(socket.SHUT_WR)  # half-close: output still comes, then the end
        rest = read_to_eof(conn)
        assert b"LAST WORDS\r\n" in bytes(buf) + rest
        conn.close()
        # a channel the ACL does not grant: the connection is closed, the reason printed
        denied = refused.tcp()
        assert read_to_eof(denied) == b""
        denied.close()
    finally:
        code, err = fwd.stop()
        rcode, rerr = refused.stop()
        agent.stop()
    assert code == 0, err
    assert "forwarding 127.0.0.1:" in err and "to console of VM web1" in err
    assert "the agent refused the vnc of VM web1: alice may not open vnc of VM web1" in rerr, rerr
    assert any("identity=alice vm=web1 channel=console mode=rw" in line for line in agent.audit_lines())


@pytest.mark.qemu
@pytest.mark.slow
def test_forward_a_console_to_a_unix_socket_in_local_mode(tmp_path, bootvm):
    """No certificates anywhere: the agent's local socket, our uid in the ACL."""
    agent_sock = tmp_path / "agent.sock"
    user = "user:%s" % __import__("pwd").getpwuid(os.getuid()).pw_name
    agent = Agent_(tmp_path, [("web1", bootvm.qmp_path)], [{"identities": [user], "channels": ["console"]}],
                   local_socket=str(agent_sock))
    assert agent.address == "unix:%s" % agent_sock
    listen = tmp_path / "console.sock"
    fwd = Cli(["forward", "unix:%s" % agent_sock, "web1", "console", "--listen", str(listen)])
    try:
        assert fwd.address == "unix:%s" % listen
        assert stat.S_IMODE(os.stat(listen).st_mode) == 0o600
        conn = fwd.unix()
        buf = bytearray()
        deadline = time.monotonic() + 30
        while True:
            conn.sendall(b"local\r")
            try:
                sock_read_until(conn, b"LOCAL\r\n", timeout=2, buf=buf)
                break
            except TimeoutError:
                assert time.monotonic() < deadline
        conn.shutdown(socket.SHUT_WR)
        read_to_eof(conn)
        conn.close()
    finally:
        code, err = fwd.stop()
        agent.stop()
    assert code == 0, err
    assert not listen.exists()  # removed on exit
    audit = agent.audit_lines()
    assert any("identity=uid:%d(" % os.getuid() in line and "channel=console mode=rw" in line for line in audit), audit


@pytest.mark.qemu
@pytest.mark.slow
def test_forward_a_guest_channel_to_a_unix_socket(pki, tmp_path):
    """A guest-agent style exchange: JSON lines through the Linux guest's echo port."""
    vm = linux_vm(tmp_path / "vm", name="lin")
    vm.start()
    agent = Agent_(tmp_path, [("lin", vm.qmp_path)],
                   [{"identities": ["alice"], "channels": ["channel:org.vproxy.*"]}], pki=pki)
    listen = tmp_path / "qga.sock"
    fwd = Cli(["forward", agent.address, "lin", "channel:org.vproxy.echo0", "--listen", "unix:%s" % listen]
              + tls_args(pki))
    try:
        request = b'{"execute": "guest-ping"}\n'
        deadline = time.monotonic() + 120
        while True:  # the guest's echo loop starts once it has booted
            conn = fwd.unix()
            conn.sendall(request)
            try:
                got = sock_read_until(conn, b"\n", timeout=3)
                break
            except (TimeoutError, EOFError):
                conn.close()
                assert time.monotonic() < deadline, fwd.proc.stderr
        assert got == request
        # half-close: what we sent before it still comes back, then the end
        conn.sendall(b'{"execute": "guest-info"}\n')
        conn.shutdown(socket.SHUT_WR)
        assert read_to_eof(conn, 60) == b'{"execute": "guest-info"}\n'
        conn.close()
    finally:
        code, err = fwd.stop()
        agent.stop()
        vm.terminate()
    assert code == 0, err


@pytest.mark.qemu
@pytest.mark.slow
def test_vnc_no_viewer_and_a_real_vnc_client(pki, tmp_path, bootvm):
    agent = Agent_(tmp_path, [("web1", bootvm.qmp_path)],
                   [{"identities": ["alice"], "channels": ["vnc"]}], pki=pki)
    vnc = Cli(["vnc", agent.address, "web1", "--no-viewer"] + tls_args(pki))
    try:
        host, _, port = vnc.address.rpartition(":")
        assert host == "127.0.0.1"
        for n in range(2):  # the first uses the stream opened to check access, the second a new one
            shot = tmp_path / ("screen%d.png" % n)
            out = subprocess.run([sys.executable, "-m", "vncdotool.command", "-s", "%s::%s" % (host, port),
                                  "capture", str(shot)], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            from PIL import Image

            image = Image.open(shot)
            assert image.size[0] >= 640
            assert len(image.convert("RGB").getcolors(1 << 24)) > 1  # not a blank screen
    finally:
        code, err = vnc.stop()
        agent.stop()
    assert code == 0, err
    assert ("VNC display of VM web1 on %s at %s (e.g. vncviewer %s::%s)"
            % (agent.address, vnc.address, host, port)) in err
    assert len([line for line in agent.audit_lines() if "identity=alice vm=web1 channel=vnc" in line]) == 2


@pytest.mark.qemu
@pytest.mark.slow
def test_vnc_starts_the_viewer_and_ends_with_it(pki, tmp_path, bootvm):
    agent = Agent_(tmp_path, [("web1", bootvm.qmp_path)],
                   [{"identities": ["alice"], "channels": ["vnc"]}], pki=pki)
    try:
        bin_dir = stub_viewers(tmp_path / "bin", ["vncviewer", "remote-viewer", "gvncviewer"])
        env = clean_env(PATH="%s:%s" % (bin_dir, os.environ["PATH"]))
        out = subprocess.run([sys.executable, "-m", "vproxy", "vnc", agent.address, "web1"] + tls_args(pki),
                             capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        address = out.stdout.strip()
        (call,) = [json.loads(line) for line in (bin_dir / "calls.jsonl").read_text().splitlines()]
        host, _, port = address.rpartition(":")
        assert call == {"name": "vncviewer", "args": ["%s::%s" % (host, port)], "greeting": "RFB 003.008\n"}
        assert "started %s %s::%s" % (bin_dir / "vncviewer", host, port) in out.stderr

        # remote-viewer when there is no vncviewer, and a failing viewer is reported
        bin2 = stub_viewers(tmp_path / "bin2", ["remote-viewer", "gvncviewer"], exit_code=3)
        env = clean_env(PATH="%s:%s" % (bin2, os.environ["PATH"]))
        out = subprocess.run([sys.executable, "-m", "vproxy", "vnc", agent.address, "web1", "--listen",
                              "unix:%s/v.sock" % tmp_path] + tls_args(pki),
                             capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 1 and "the viewer exited with status 3" in out.stderr
        (call,) = [json.loads(line) for line in (bin2 / "calls.jsonl").read_text().splitlines()]
        assert call == {"name": "remote-viewer", "args": ["vnc+unix://%s/v.sock" % tmp_path]}
    finally:
        agent.stop()


@pytest.mark.qemu
@pytest.mark.slow
def test_vnc_of_a_vm_without_vnc_says_so(pki, tmp_path):
    vm = boot_sector_vm(tmp_path / "vm", name="novnc", vnc=False)
    vm.start()
    agent = Agent_(tmp_path, [("novnc", vm.qmp_path)], [{"identities": ["alice"]}], pki=pki)
    try:
        out = subprocess.run([sys.executable, "-m", "vproxy", "vnc", agent.address, "novnc", "--no-viewer"]
                             + tls_args(pki), capture_output=True, text=True, env=clean_env(), timeout=60)
    finally:
        agent.stop()
        vm.terminate()
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("vproxy: error: no VNC for VM novnc on %s: VM novnc has no VNC display"
                                 % agent.address), out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.qemu
@pytest.mark.slow
def test_forward_reconnects_after_the_agent_restarts(tmp_path, bootvm):
    """The session dies with the agent; the next local connection makes a new one."""
    agent_sock = tmp_path / "agent.sock"
    rules = [{"identities": ["uid:%d" % os.getuid()], "channels": ["console"]}]
    agent = Agent_(tmp_path, [("web1", bootvm.qmp_path)], rules, local_socket=str(agent_sock))
    fwd = Cli(["forward", "unix:%s" % agent_sock, "web1", "console"])

    def echo_through(word):
        conn = fwd.tcp()
        buf = bytearray()
        deadline = time.monotonic() + 30
        while True:
            conn.sendall(word + b"\r")
            try:
                sock_read_until(conn, word.upper() + b"\r\n", timeout=2, buf=buf)
                break
            except TimeoutError:
                assert time.monotonic() < deadline, bytes(buf)
        conn.close()

    try:
        echo_through(b"before")
        agent.stop()
        agent = Agent_(tmp_path, [("web1", bootvm.qmp_path)], rules, local_socket=str(agent_sock))
        echo_through(b"after")
    finally:
        code, err = fwd.stop()
        agent.stop()
    assert code == 0, err
    assert "the session to unix:%s ended" % agent_sock in err and "connecting again" in err, err
