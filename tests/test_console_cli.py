"""`vproxy console` as a person and a script use it: the real CLI in a pseudo-terminal
(pexpect) or a pipe, the real agent process over mutual TLS, the real boot-sector VM
(which echoes what it receives uppercased, "\\r" as "\\r\\n").

What these tests prove:
- attach shows a status line and the history (the guest's banner), typing reaches the
  guest and its echo comes back; ^]? shows the help, ^]^] sends one ^], ^]. quits
  with status 0 and the terminal's settings are exactly what they were before;
- SIGTERM and SIGHUP also leave the terminal as it was;
- a --read-only viewer is told when its typing is dropped; --force takes the writer
  role and the former writer is told; ^]f takes it back;
- `echo hello | vproxy console` prints exactly the guest's answer and exits 0;
- a refused open exits 2 with the agent's reason on one line;
- a killed and restarted agent: the client says so, reconnects by itself, and typing
  works again; ^]. quits while it is still reconnecting;
- a restarted VM: output printed while the client was away (stopped) is shown once,
  resumed from the offset it had reached, with nothing repeated.
"""

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pexpect
import pytest

from support.aio import run
from support.vmtools import (BOOT_SECTOR_BANNER, boot_sector_vm, build_boot_disk, qmp_connect,
                             short_socket_path)
from vproxy.client import terminal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, XDG_CONFIG_HOME=tempfile.mkdtemp(prefix="vproxy-cfg"))
for _name in ("VPROXY_IDENTITY", "VPROXY_CLIENT_CONFIG", "VPROXY_CERT", "VPROXY_KEY", "VPROXY_CA"):
    ENV.pop(_name, None)  # only the options the tests give
ESC = "\x1d"  # ^]

ACL = [
    {"identities": ["alice"], "vms": ["*"], "channels": ["console"], "modes": ["force"]},
    {"identities": ["bob"], "vms": ["*"], "channels": ["console"], "modes": ["ro"]},
]


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    """`vproxy serve` in a child process on a fixed port (so that it can be restarted)."""

    def __init__(self, pki, tmp_path, vms, port=None, ring=None):
        self.port = port or free_port()
        self.address = "127.0.0.1:%d" % self.port
        self.config = tmp_path / "agent.toml"
        lines = ['listen = "%s"' % self.address, 'cert = "%s"' % pki.server.cert,
                 'key = "%s"' % pki.server.key, 'ca = "%s"' % pki.ca, 'crl = "%s"' % pki.crl,
                 'audit_log = "%s"' % (tmp_path / "audit.log")]
        if ring:
            lines.append("console_ring = %d" % ring)
        for name, qmp in vms:
            lines += ["[[vm]]", 'name = "%s"' % name, 'qmp = "%s"' % qmp]
        for rule in ACL:
            lines.append("[[allow]]")
            for key, value in rule.items():
                lines.append("%s = [%s]" % (key, ", ".join('"%s"' % v for v in value)))
        self.config.write_text("\n".join(lines) + "\n")
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "vproxy", "serve", "--config", str(self.config)],
                                     stderr=subprocess.PIPE, env=ENV, text=True)
        line = self.proc.stderr.readline()
        assert "listening on" in line, line + self.proc.stderr.read()

    def kill(self, sig=signal.SIGKILL):
        self.proc.send_signal(sig)
        self.proc.wait(15)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)


def tls_args(pki, pair):
    return ["--cert", pair.cert, "--key", pair.key, "--ca", pki.ca]


def console_args(pki, agent, pair=None, *extra):
    return ["-m", "vproxy", "console", agent.address, "web1"] + tls_args(pki, pair or pki.alice) + list(extra)


def spawn(pki, agent, *extra, pair=None):
    child = pexpect.spawn(sys.executable, console_args(pki, agent, pair, *extra), env=ENV,
                          timeout=20, dimensions=(24, 80))
    child.expect("connected to console serial0 of web1")
    return child


def wait_console_attached(pki, agent, min_offset=0, timeout=20):
    """Until the agent lists web1's console attached with at least min_offset bytes."""
    from vproxy.client.connection import connect

    async def poll():
        deadline = time.monotonic() + timeout
        client = None
        try:
            while True:
                try:
                    client = client or await connect(agent.address, pki.alice.cert, pki.alice.key, pki.ca)
                    vms = await client.list_vms()
                except Exception as e:  # the agent may be starting
                    vms, client = repr(e), None
                cons = vms[0].get("consoles", []) if isinstance(vms, list) and vms else []
                if cons and cons[0]["status"] == "attached" and cons[0]["offset"] >= min_offset:
                    return cons[0]
                assert time.monotonic() < deadline, vms
                await asyncio.sleep(0.05)
        finally:
            if client is not None:
                await client.close()

    return run(poll())


def restart_paused(vm, banner):
    """Kill the VM's QEMU and start a new one, paused like the first, on the same QMP
    path, booting a disk whose guest prints *banner*."""
    vm.kill()
    vm.wait(10)
    vm._log.close()
    vm.proc = None
    build_boot_disk(vm.workdir / (vm.name + ".img"), banner=banner)
    vm.start()


async def resume(vm):
    qmp = await qmp_connect(vm.control_qmp)
    try:
        await qmp.execute("cont")
    finally:
        await qmp.disconnect()


def tty_attrs(path):
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    try:
        return subprocess.run(["stty", "-g"], stdin=fd, capture_output=True, text=True).stdout.strip()
    finally:
        os.close(fd)


@pytest.fixture
def vm(tmp_path):
    """web1, started paused: the agent resumes nothing, the test does (control QMP)."""
    machine = boot_sector_vm(tmp_path / "vm", name="web1", paused=True)
    machine.control_qmp = short_socket_path(machine.workdir, "control.qmp")
    machine.extra_args += ["-qmp", "unix:%s,server=on,wait=off" % machine.control_qmp]
    machine.start()
    yield machine
    machine.terminate()


@pytest.fixture
def agent(request, pki, tmp_path, vm):
    """The agent serving web1, once it has taken the console over and the guest booted
    (with a test parameter "ring": that many bytes of console history)."""
    ring = request.node.callspec.params.get("ring") if hasattr(request.node, "callspec") else None
    a = Agent(pki, tmp_path, [("web1", vm.qmp_path)], ring=ring)
    try:
        wait_console_attached(pki, a)
        run(resume(vm))  # boot output from the very first byte goes into the ring
        wait_console_attached(pki, a, len(BOOT_SECTOR_BANNER))
        yield a
    finally:
        a.stop()


# ---------------------------------------------------------------- terminal.py, no VM


def test_escape_parser_and_escape_characters():
    p = terminal.EscapeParser(0x1D)
    assert p.feed(b"ab\x1d.cd") == [b"ab", terminal.QUIT, b"cd"]
    assert p.feed(b"\x1d") == [] and p.feed(b"?") == [terminal.HELP]  # split across reads
    assert p.feed(b"\x1d\x1d") == [b"\x1d"]  # twice: one literal escape character
    assert p.feed(b"\x1dx") == [b"\x1dx"]  # anything else: both bytes go through
    assert p.feed(b"\x1df") == [terminal.FORCE]
    assert terminal.EscapeParser(None).feed(b"\x1d.") == [b"\x1d."]
    assert terminal.parse_escape("^]") == 0x1D and terminal.parse_escape("^a") == 1
    assert terminal.parse_escape("~") == ord("~") and terminal.parse_escape("none") is None
    assert terminal.parse_escape("^?") == 0x7F and terminal.describe_escape(0x1D) == "^]"
    for bad in ("ab", "^1", ".", "\u00e9", ""):
        with pytest.raises(ValueError):
            terminal.parse_escape(bad)


def test_raw_mode_is_restored_after_an_exception():
    import pty
    import termios

    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        with pytest.raises(RuntimeError):
            with terminal.RawMode(slave):
                assert not termios.tcgetattr(slave)[3] & termios.ICANON
                raise RuntimeError("boom")
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_bad_options_are_one_line_errors(pki):
    base = [sys.executable, "-m", "vproxy", "console", "127.0.0.1:1", "web1"] + tls_args(pki, pki.alice)
    out = subprocess.run(base + ["--escape", "xy"], capture_output=True, text=True, env=ENV)
    assert out.returncode == 2 and "not an escape character" in out.stderr
    out = subprocess.run(base + ["--replay", "lots"], capture_output=True, text=True, env=ENV)
    assert out.returncode == 2 and out.stderr.startswith("vproxy: error: --replay 'lots'")
    out = subprocess.run(base + ["--read-only", "--force"], capture_output=True, text=True, env=ENV)
    assert out.returncode == 2 and "exclude each other" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------- with the agent and the VM


@pytest.mark.qemu
@pytest.mark.slow
def test_attach_type_help_escape_quit_and_the_terminal_is_restored(pki, agent, tmp_path):
    cmd = " ".join([sys.executable] + console_args(pki, agent))
    child = pexpect.spawn("sh", ["-c", "stty -g; %s; echo rc=$?; stty -g" % cmd], env=ENV,
                          timeout=20, dimensions=(24, 80))
    child.expect(r"([0-9a-f]+(:[0-9a-f]+)+)\r\n")
    before = child.match.group(1)
    child.expect(r"connected to console serial0 of web1 at 127\.0\.0\.1:\d+ \(the writer\); "
                 r"escape character is \^\] \(\^\]\? for help\)")
    child.expect_exact(BOOT_SECTOR_BANNER.decode())  # the history is replayed on attach
    child.send("hello vproxy\r")
    child.expect_exact("HELLO VPROXY\r\n")
    child.send(ESC + "?")
    child.expect_exact("disconnect and quit")
    child.expect_exact("send ^] itself")
    child.send(ESC + ESC + "x\r")  # one literal ^] reaches the guest, which echoes it
    child.expect_exact("\x1dX\r\n")
    child.send(ESC + ".")
    child.expect(r"disconnected from console serial0 of web1")
    child.expect(r"rc=(\d+)")
    assert child.match.group(1) == b"0"
    child.expect(r"([0-9a-f]+(:[0-9a-f]+)+)\r\n")
    assert child.match.group(1) == before
    child.expect(pexpect.EOF)


@pytest.mark.qemu
@pytest.mark.slow
def test_another_escape_character(pki, agent):
    child = spawn(pki, agent, "--escape", "^A")
    child.expect_exact("escape character is ^A (^A? for help)")
    child.send("\x01?")
    child.expect_exact("send ^A itself")
    child.send(ESC + "\x01\x01z\r")  # ^] is an ordinary byte now; ^A^A sends one ^A
    child.expect_exact("\x1d\x01Z\r\n")
    child.send("\x01.")
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
@pytest.mark.qemu
@pytest.mark.slow
def test_signals_restore_the_terminal(pki, agent, sig):
    child = spawn(pki, agent)
    tty = os.readlink("/proc/%d/fd/0" % child.pid)
    keep = os.open(tty, os.O_RDWR | os.O_NOCTTY)  # keeps the pty alive after the child
    try:
        raw = tty_attrs(tty)
        during = subprocess.run(["stty", "-a"], stdin=keep, capture_output=True, text=True).stdout
        assert re.search(r"-icanon\b", during) and re.search(r"-echo\b", during)
        child.kill(sig)
        child.expect("%s received; disconnected" % signal.Signals(sig).name)
        deadline = time.monotonic() + 10
        while child.isalive():  # (no EOF on the pty while `keep` holds it open)
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert child.exitstatus == 128 + sig
        after = subprocess.run(["stty", "-a"], stdin=keep, capture_output=True, text=True).stdout
        assert tty_attrs(tty) != raw
        assert re.search(r"(?<!-)icanon\b", after) and re.search(r"(?<!-)echo\b", after)
        assert re.search(r"(?<!-)isig\b", after) and re.search(r"(?<!-)opost\b", after)
    finally:
        os.close(keep)


@pytest.mark.qemu
@pytest.mark.slow
def test_read_only_notice_force_takeover_and_back(pki, agent):
    first = spawn(pki, agent)  # alice, the writer
    watcher = spawn(pki, agent, "--read-only", pair=pki.bob)
    watcher.expect_exact("(read-only: alice is writing)")
    watcher.send("x")
    watcher.expect_exact("read-only (--read-only): your input was dropped")

    second = spawn(pki, agent, "--force")
    second.expect_exact("(the writer, by force)")
    first.expect_exact("alice took over the console; you are read-only now; ^]f takes it back")
    watcher.expect_exact("alice is now the writer")
    first.send("y")
    first.expect_exact("read-only: your input was dropped (alice is writing; ^]f takes over)")
    second.send("forced\r")
    second.expect_exact("FORCED\r\n")
    first.expect_exact("FORCED\r\n")  # everyone sees the output

    first.send(ESC + "f")
    first.expect_exact("you are now the writer (alice is read-only now)")
    second.expect_exact("took over the console; you are read-only now")
    first.send("back\r")
    first.expect_exact("BACK\r\n")
    for child in (first, second, watcher):
        child.send(ESC + ".")
        child.expect(pexpect.EOF)
        child.wait()
        assert child.exitstatus == 0


@pytest.mark.qemu
@pytest.mark.slow
def test_pipe_mode_prints_the_answer_and_exits(pki, agent):
    start = time.monotonic()
    out = subprocess.run([sys.executable] + console_args(pki, agent), input=b"hello\n",
                         capture_output=True, env=ENV, timeout=30)
    took = time.monotonic() - start
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"HELLO\n"  # no history in a pipe unless asked, no status lines
    assert out.stderr == b""
    print("echo hello | vproxy console: %.2f s" % took)
    # with history, from /dev/null (which cannot be polled)
    with open(os.devnull, "rb") as null:
        out = subprocess.run([sys.executable] + console_args(pki, agent, None, "--replay", "all"),
                             stdin=null, capture_output=True, env=ENV, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(BOOT_SECTOR_BANNER) and out.stdout.endswith(b"HELLO\n")
    # a number of bytes of history starts at a line start: "dy\r\n" is cut
    with open(os.devnull, "rb") as null:
        out = subprocess.run([sys.executable] + console_args(pki, agent, None, "--replay", "10"),
                             stdin=null, capture_output=True, env=ENV, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"HELLO\n"


@pytest.mark.qemu
@pytest.mark.slow
def test_refused_exits_2_with_the_agents_reason(pki, agent):
    out = subprocess.run([sys.executable] + console_args(pki, agent, pki.bob), input="",
                         capture_output=True, text=True, env=ENV, timeout=30)
    assert out.returncode == 2
    first = out.stderr.splitlines()[0]
    assert first.startswith("vproxy: error: bob may not open console of VM web1: mode rw is not granted")
    assert "hint: if you may only watch, try --read-only" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable] + console_args(pki, agent, pki.alice, "nosuch"), input="",
                         capture_output=True, text=True, env=ENV, timeout=30)
    assert out.returncode == 2 and "VM web1 has no console 'nosuch'" in out.stderr


@pytest.mark.qemu
@pytest.mark.slow
def test_reconnects_after_the_agent_is_killed_and_restarted(pki, agent):
    child = spawn(pki, agent)
    quitter = spawn(pki, agent, "--read-only")
    child.send("before\r")
    child.expect_exact("BEFORE\r\n")
    agent.kill(signal.SIGKILL)
    child.expect(r"connection lost: .*; reconnecting \(\^\]\. quits\)")
    quitter.expect("reconnecting")
    quitter.expect("still away: cannot connect")
    quitter.send(ESC + ".")  # quits while reconnecting
    quitter.expect(pexpect.EOF)
    quitter.wait()
    assert quitter.exitstatus == 0
    child.send("lost\r")
    child.expect_exact("not connected: input dropped")
    time.sleep(0.5)
    started = time.monotonic()
    agent.start()
    child.expect(r"reconnected after [\d.]+ s \(the writer\); the console's history began anew")
    print("reconnected %.2f s after the agent restarted" % (time.monotonic() - started))
    child.send("after\r")
    child.expect_exact("AFTER\r\n")
    child.send(ESC + ".")
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0


@pytest.mark.qemu
@pytest.mark.slow
def test_resumes_from_its_offset_after_the_vm_restarts(pki, agent, vm, tmp_path):
    """Output printed while the client was away is shown exactly once."""
    child = spawn(pki, agent)
    child.expect_exact(BOOT_SECTOR_BANNER.decode())
    child.send("one\r")
    child.expect_exact("ONE\r\n")
    second = b"second boot of web1\r\n"
    os.kill(child.pid, signal.SIGSTOP)  # away: it reads nothing until SIGCONT
    try:
        restart_paused(vm, banner=second)  # the agent takes the console over again...
        history = len(BOOT_SECTOR_BANNER) + len(b"ONE\r\n")
        wait_console_attached(pki, agent, min_offset=history)
        run(resume(vm))  # ...then the guest boots and prints its banner into the ring
        wait_console_attached(pki, agent, min_offset=history + len(second))
    finally:
        os.kill(child.pid, signal.SIGCONT)
    child.expect(r"connection lost: [^\r]*; reconnecting")
    child.expect(r"reconnected after [\d.]+ s \(the writer\); %d bytes printed while away follow"
                 % len(second))
    child.expect_exact(second.decode())
    child.send("two\r")
    child.expect_exact("TWO\r\n")
    seen = child.before
    assert second not in seen and BOOT_SECTOR_BANNER not in seen  # nothing repeated
    child.send(ESC + ".")
    child.expect(pexpect.EOF)


@pytest.mark.parametrize("ring", [4096])
@pytest.mark.qemu
@pytest.mark.slow
def test_output_beyond_the_agents_history_is_reported_lost(pki, agent, vm, ring):
    """Away while more than the ring's size was printed: the client says how much was lost,
    then shows what the agent still holds and goes on."""
    child = spawn(pki, agent)
    child.expect_exact(BOOT_SECTOR_BANNER.decode())
    seen = len(BOOT_SECTOR_BANNER)
    os.kill(child.pid, signal.SIGSTOP)
    try:
        second = b"second boot\r\n"
        restart_paused(vm, banner=second)
        wait_console_attached(pki, agent, min_offset=seen)
        run(resume(vm))
        chatter = b"x" * 5999 + b"\r"  # echoed as 6001 bytes: more than the 4096 kept
        out = subprocess.run([sys.executable] + console_args(pki, agent), input=chatter,
                             capture_output=True, env=ENV, timeout=60)
        assert out.returncode == 0 and out.stdout == b"X" * 5999 + b"\r\n", out.stderr
        console = wait_console_attached(pki, agent, min_offset=seen + len(second) + 6001)
    finally:
        os.kill(child.pid, signal.SIGCONT)
    lost = console["offset"] - console["buffered"] - seen
    assert lost > 0 and console["buffered"] == ring
    child.expect(r"connection lost: [^\r]*; reconnecting")
    child.expect(r"reconnected after [\d.]+ s \(the writer\); %d bytes printed while away were "
                 r"lost \(more than the agent keeps\); the 4096 bytes it kept follow" % lost)
    child.expect_exact("X" * 100 + "\r\n")
    child.send("three\r")
    child.expect_exact("THREE\r\n")
    child.send(ESC + ".")
    child.expect(pexpect.EOF)
