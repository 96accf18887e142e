"""Faults (issue 5, point 3) against the real agent process, real TLS and a real QEMU
(the boot-sector guest under TCG): what the user sees, and proof that nothing
acknowledged is lost.

- the agent SIGKILLed and restarted on the same port: the console is taken over again,
  the console client reconnects, the persistent console log holds every byte the
  client saw, and new output is appended to it;
- a client SIGKILLed while writing a big stream into the console: the agent stays up,
  no stale viewer or writer is left, a new client becomes the writer, an audit line;
- QEMU paused (QMP ``stop`` on a second monitor, or SIGSTOP) mid-transfer: output
  stops, and once resumed every byte arrives, counted on both ends;
- the network between client and agent cut (the agent in a network namespace the test
  makes, behind a veth pair) for less, then more, than the keepalive timeout;
- the console log's disk full (a 64 KiB tmpfs): one clear error, the ring and live
  viewers keep working.

Root is needed for the namespace and tmpfs tests (they fail, not skip, without it).
"""

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional, Sequence

import pytest

from support.agenttools import read_until, write_agent_config
from support.vmtools import BOOT_SECTOR_BANNER, boot_sector_vm, expected_echo, qmp_connect
from vproxy.client import terminal
from vproxy.client.connection import connect
from vproxy.client.console import ConsoleClient, ConsoleSettings

pytestmark = pytest.mark.slow  # QEMU boots, agents killed, networks cut

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)
ALLOW_ALICE = [{"identities": ["alice"], "vms": ["*"], "modes": ["force", "hotplug"]}]


# --------------------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Agent:
    """`vproxy serve --config FILE` as a child process on a chosen address (so that a
    restart reuses the port), optionally inside a network namespace."""

    def __init__(self, pki, workdir: Path, listen: str, vms, allow=ALLOW_ALICE,
                 extra: Sequence[str] = (), netns: Optional[str] = None):
        workdir.mkdir(parents=True, exist_ok=True)
        self.audit = workdir / "audit.log"
        self.config = workdir / "agent.toml"
        write_agent_config(self.config, pki, vms, allow,
                           ['audit_log = "%s"' % self.audit] + list(extra), listen=listen)
        self.netns = netns
        self.stderr_path = workdir / "agent.stderr"
        self.proc: Optional[subprocess.Popen] = None
        self.stderr_lines: List[str] = []
        self.address = ""

    def start(self) -> "Agent":
        cmd = [sys.executable, "-m", "vproxy", "serve", "--config", str(self.config)]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns] + cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=ENV, text=True)
        line = self.proc.stderr.readline()
        if "listening on" not in line:
            self.proc.kill()
            raise AssertionError("the agent did not start: " + line + self.proc.stderr.read())
        self.address = line.split("listening on ")[1].strip()
        self.stderr_lines = [line.rstrip("\n")]
        threading.Thread(target=self._drain, args=(self.proc,), daemon=True).start()
        return self

    def _drain(self, proc) -> None:
        with open(self.stderr_path, "a") as copy:
            for line in proc.stderr:
                self.stderr_lines.append(line.rstrip("\n"))
                copy.write(line)
                copy.flush()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def audit_lines(self) -> List[str]:
        return self.audit.read_text().splitlines() if self.audit.exists() else []


def no_banner(data: bytes) -> bytes:
    """Console output minus the banner, if the guest printed it after the takeover
    (normally it boots before the agent starts and the banner is not captured)."""
    data = bytes(data)
    return data[len(BOOT_SECTOR_BANNER):] if data.startswith(BOOT_SECTOR_BANNER) else data


def connect_as(pki, address, pair=None):
    pair = pair or pki.alice
    return connect(address, pair.cert, pair.key, pki.ca, server_name="localhost")


async def wait_console_attached(pki, address, vm="web1", timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            client = await connect_as(pki, address)
            try:
                vms = await client.list_vms()
            finally:
                await client.close()
            cons = [c for v in vms if v["vm"] == vm for c in v.get("consoles", [])]
            if cons and cons[0]["status"] == "attached":
                return cons[0]
        except Exception as e:  # the agent may still be starting
            last = e
        else:
            last = cons
        assert time.monotonic() < deadline, "console of %s not attached: %r" % (vm, last)
        await asyncio.sleep(0.2)


class Capture(terminal.Output):
    """What a ConsoleClient prints: console bytes and status lines, kept in memory."""

    def __init__(self):
        self._null = os.open(os.devnull, os.O_WRONLY)
        super().__init__(out_fd=self._null, err_fd=self._null)
        self.data = bytearray()
        self.statuses: List[str] = []

    async def write(self, data: bytes) -> None:
        self.data += data

    def status(self, message: str) -> None:
        self.statuses.append(message)

    async def wait_for(self, needle: bytes, timeout=30.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.data:
            assert time.monotonic() < deadline, "console client never printed %r; got %r; status %r" % (
                needle, bytes(self.data[-300:]), self.statuses)
            await asyncio.sleep(0.05)

    async def wait_status(self, pattern: str, timeout=30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for s in self.statuses:
                if re.search(pattern, s):
                    return s
            assert time.monotonic() < deadline, "no status %r; got %r" % (pattern, self.statuses)
            await asyncio.sleep(0.05)


class PipedConsole:
    """A ConsoleClient (the API behind `vproxy console`) in pipe mode, fed by a pipe."""

    def __init__(self, pki, address, vm="web1", replay="all"):
        self.rfd, self.wfd = os.pipe()
        self.out = Capture()
        settings = ConsoleSettings(address=address, vm=vm, mode="rw", replay=replay,
                                   interactive=False, server_name="localhost",
                                   tls={"cert": pki.alice.cert, "key": pki.alice.key,
                                        "ca": pki.ca, "crl": None})
        self.client = ConsoleClient(settings, stdin_fd=self.rfd, output=self.out)
        self.task = asyncio.ensure_future(self.client.run())

    def type(self, data: bytes) -> None:
        os.write(self.wfd, data)

    async def finish(self, timeout=30.0) -> int:
        if self.wfd >= 0:
            os.close(self.wfd)
            self.wfd = -1
        try:
            return await asyncio.wait_for(self.task, timeout)
        finally:
            os.close(self.rfd)
            os.close(self.out._null)

    async def abort(self) -> None:
        if not self.task.done():
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
        for fd in (self.wfd, self.rfd, self.out._null):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.wfd = self.rfd = -1


@pytest.fixture
def vmdir(tmp_path):
    return tmp_path / "vm"


def start_vm(vmdir, extra=()):
    vm = boot_sector_vm(vmdir, name="web1", extra=list(extra))
    vm.start()
    return vm


# --------------------------------------------------------------------------- agent restart


@pytest.mark.qemu
def test_agent_sigkilled_and_restarted_console_taken_over_log_intact(pki, tmp_path, vmdir):
    vm = start_vm(vmdir)
    logs = tmp_path / "logs"
    logs.mkdir()
    port = free_port()
    agent = Agent(pki, tmp_path / "agent", "127.0.0.1:%d" % port, [("web1", vm.qmp_path)],
                  extra=['console_log_dir = "%s"' % logs])
    second = None
    try:
        agent.start()

        async def main():
            nonlocal second
            await wait_console_attached(pki, agent.address)
            console = PipedConsole(pki, agent.address)
            try:
                console.type(b"before the kill\r")
                await console.out.wait_for(b"BEFORE THE KILL\r\n")
                seen_before = bytes(console.out.data)

                agent.kill()  # SIGKILL: no goodbye, no flush
                second = Agent(pki, tmp_path / "agent", "127.0.0.1:%d" % port,
                               [("web1", vm.qmp_path)], extra=['console_log_dir = "%s"' % logs])
                second.start()
                assert second.address == agent.address
                await console.out.wait_status(r"^reconnected after", timeout=30)
                console.type(b"after the restart\r")
                await console.out.wait_for(b"AFTER THE RESTART\r\n")
                # the new agent took the console over again: ls says so, the same QEMU
                cons = await wait_console_attached(pki, second.address)
                assert cons["log"] == str(logs / "web1.serial0.log")
                assert vm.running()
                code = await console.finish()
            except BaseException:
                await console.abort()
                raise
            assert code == 0, console.out.statuses
            return seen_before, bytes(console.out.data), console.out.statuses

        seen_before, seen_all, statuses = asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        agent.kill()
        if second is not None:
            second.stop()
        vm.terminate()
    assert any("connection lost" in s for s in statuses), statuses
    assert any("began anew" in s for s in statuses), statuses  # new agent: new epoch
    log = (logs / "web1.serial0.log").read_bytes()
    # everything printed before the kill is in the log, byte for byte what the client saw
    assert log.startswith(seen_before), (log[:300], seen_before[:300])
    # and what came after the restart was appended to the same file
    assert log == seen_all, (log, seen_all)
    assert no_banner(log) == expected_echo(b"before the kill\r" + b"after the restart\r")


# --------------------------------------------------------------------------- client killed


WRITER_SCRIPT = r"""
import asyncio, sys
from vproxy.client import connect

async def main():
    address, cert, key, ca = sys.argv[1:5]
    client = await connect(address, cert, key, ca, server_name="localhost")
    stream = await client.open("web1", "console", "rw")
    print("mode", stream.info.get("mode"), flush=True)
    block = (b"abcdefghijklmnopqrstuvwxyz0123456789" * 28 + b"\r")[:1024]
    for i in range(64 * 1024):  # at most 64 MiB: far more than the guest takes in the test
        await stream.write(block)
        if i % 16 == 0:
            print("wrote", (i + 1) * len(block), flush=True)

asyncio.run(main())
"""


@pytest.mark.qemu
def test_client_sigkilled_mid_write_leaves_no_stale_writer(pki, tmp_path, vmdir):
    vm = start_vm(vmdir)
    agent = Agent(pki, tmp_path / "agent", "127.0.0.1:0", [("web1", vm.qmp_path)])
    writer = None
    try:
        agent.start()
        asyncio.run(wait_console_attached(pki, agent.address))
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER_SCRIPT, agent.address, pki.alice.cert, pki.alice.key, pki.ca],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, text=True)
        assert writer.stdout.readline().split() == ["mode", "rw"]
        written = 0
        deadline = time.monotonic() + 30
        while written < 64 * 1024:  # mid-write: the guest is still echoing it
            line = writer.stdout.readline()
            assert line, writer.stderr.read()
            written = int(line.split()[1])
            assert time.monotonic() < deadline
        writer.kill()
        writer.wait(10)

        async def after():
            # the agent notices the dead TCP peer (RST) and drops its viewer and writer
            deadline = time.monotonic() + 15
            while True:
                client = await connect_as(pki, agent.address)
                vms = await client.list_vms()
                await client.close()
                cons = vms[0]["consoles"][0]
                if not cons["viewers"] and cons["writer"] == "":
                    break
                assert time.monotonic() < deadline, "stale viewer/writer: %r" % cons
                await asyncio.sleep(0.2)
            client = await connect_as(pki, agent.address, pki.bob)  # another identity
            await client.close()
            client = await connect_as(pki, agent.address)
            stream = await client.open("web1", "console", "rw")
            assert stream.info["mode"] == "rw" and stream.info["writer"] == "alice"
            await stream.write(b"\rstill here\r")
            await read_until(stream, b"STILL HERE\r\n", timeout=60)
            await client.close()

        asyncio.run(asyncio.wait_for(after(), 90))
        # `vproxy ls` from the command line agrees: nobody attached
        out = subprocess.run([sys.executable, "-m", "vproxy", "ls", agent.address, "--cert", pki.alice.cert,
                              "--key", pki.alice.key, "--ca", pki.ca, "--json"],
                             capture_output=True, text=True, env=ENV, timeout=60)
        assert out.returncode == 0, out.stderr
        cons = json.loads(out.stdout)[0]["vms"][0]["consoles"][0]
        assert cons["viewers"] == [] and cons["writer"] == "", cons
        assert agent.alive()
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait()
        agent.stop()
        vm.terminate()
    audit = agent.audit_lines()
    killed = [line for line in audit if "identity=alice vm=web1 channel=console mode=rw result='ended" in line]
    assert killed, audit
    m = re.search(r" in=(\d+) ", killed[0])
    assert m and int(m.group(1)) >= 64 * 1024, killed[0]


# --------------------------------------------------------------------------- QEMU paused


@pytest.mark.parametrize("how", ["qmp-stop", "sigstop"])
@pytest.mark.qemu
def test_qemu_paused_mid_transfer_nothing_lost(pki, tmp_path, vmdir, how):
    second_qmp = Path("/tmp") / ("vpf-%s.qmp" % secrets.token_hex(4))
    vm = start_vm(vmdir, ["-qmp", "unix:%s,server=on,wait=off" % second_qmp])
    agent = Agent(pki, tmp_path / "agent", "127.0.0.1:0", [("web1", vm.qmp_path)])
    line = b"the quick brown fox jumps over the lazy dog 0123456789\r"
    payload = line * 600  # 33 KB in, 34 KB back
    want = expected_echo(payload)
    try:
        agent.start()

        async def main():
            await wait_console_attached(pki, agent.address)
            qmp = await qmp_connect(second_qmp) if how == "qmp-stop" else None
            client = await connect_as(pki, agent.address)
            stream = await client.open("web1", "console", "rw")
            got = bytearray()
            sender = asyncio.ensure_future(stream.write(payload))

            async def read_some(until_len=None, seconds=None):
                deadline = time.monotonic() + (seconds if seconds is not None else 60)
                while until_len is None or len(got) < until_len:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        if seconds is not None:
                            return
                        raise AssertionError("got %d of %d bytes" % (len(got), until_len))
                    try:
                        chunk = await asyncio.wait_for(stream.read(), left)
                    except asyncio.TimeoutError:
                        continue
                    assert chunk, "EOF after %d bytes" % len(got)
                    got.extend(chunk)

            await read_some(until_len=4000)
            if qmp is not None:
                await qmp.execute("stop")
                assert (await qmp.execute("query-status"))["status"] == "paused"
            else:
                os.kill(vm.pid, signal.SIGSTOP)
            try:
                await read_some(seconds=0.5)  # what was already on its way
                at_pause = len(got)
                await read_some(seconds=2.0)
                stalled = len(got) - at_pause
                assert len(got) < len(want), "finished while paused?"
            finally:
                if qmp is not None:
                    await qmp.execute("cont")
                else:
                    os.kill(vm.pid, signal.SIGCONT)
            assert stalled == 0, "%d bytes came while QEMU was paused" % stalled
            await read_some(until_len=len(want))
            await asyncio.wait_for(sender, 30)
            await read_some(seconds=0.5)  # nothing more than the echo
            assert bytes(got) == want
            assert stream.bytes_out == len(payload)
            if qmp is not None:
                await qmp.disconnect()
            await client.close()
            return at_pause

        at_pause = asyncio.run(asyncio.wait_for(main(), 120))
        assert 4000 <= at_pause < len(want)
        time.sleep(0.5)
        assert agent.alive()
    finally:
        agent.stop()
        vm.terminate()
        with contextlib.suppress(FileNotFoundError):
            second_qmp.unlink()
    # counted on the agent's side too: every byte in, every echoed byte out
    lines = [line for line in agent.audit_lines() if "channel=console mode=rw" in line]
    assert lines, agent.audit_lines()
    assert " in=%d out=%d " % (len(payload), len(want)) in lines[-1], lines[-1]


# --------------------------------------------------------------------------- network cut


class Netns:
    """A network namespace joined to the root one by a veth pair: 10.X.Y.1 here,
    10.X.Y.2 there. Removed (with the veth pair) by close()."""

    def __init__(self):
        tag = secrets.token_hex(3)
        self.name = "vpf-%s" % tag
        self.host_dev, self.ns_dev = "vpfh%s" % tag, "vpfn%s" % tag
        a, b = int(tag[:2], 16), int(tag[2:4], 16) & 0xFC
        self.host_ip, self.ns_ip = "10.%d.%d.1" % (a, b), "10.%d.%d.2" % (a, b)
        self.created = False

    def _ip(self, *args, ns=False):
        cmd = (["ip", "netns", "exec", self.name, "ip"] if ns else ["ip"]) + list(args)
        subprocess.run(cmd, check=True, capture_output=True, timeout=10)

    def create(self) -> "Netns":
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True, timeout=10)
        self.created = True
        self._ip("link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev)
        self._ip("link", "set", self.ns_dev, "netns", self.name)
        self._ip("addr", "add", self.host_ip + "/30", "dev", self.host_dev)
        self._ip("link", "set", self.host_dev, "up")
        self._ip("addr", "add", self.ns_ip + "/30", "dev", self.ns_dev, ns=True)
        self._ip("link", "set", self.ns_dev, "up", ns=True)
        self._ip("link", "set", "lo", "up", ns=True)
        return self

    def cut(self):
        self._ip("link", "set", self.host_dev, "down")

    def restore(self):
        self._ip("link", "set", self.host_dev, "up")

    def close(self):
        if self.created:
            subprocess.run(["ip", "link", "del", self.host_dev], capture_output=True, timeout=10)
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)
            self.created = False


@pytest.fixture
def netns():
    ns = Netns()
    try:
        yield ns.create()
    finally:
        ns.close()


def test_network_cut_shorter_than_keepalive_session_survives(pki, tmp_path, netns):
    agent = Agent(pki, tmp_path / "agent", "%s:%d" % (netns.ns_ip, 7443), [], netns=netns.name)
    try:
        agent.start()

        async def main():
            client = await connect_as(pki, agent.address)
            echo = await client.open("", "echo", "rw")
            await echo.write(b"hello")
            assert await read_until(echo, b"hello", 10) == b"hello"
            netns.cut()
            cut_at = time.monotonic()
            try:
                await echo.write(b"sent during the cut")
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(echo.read(), 1.5)  # nothing gets through
            finally:
                await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - cut_at)))
                netns.restore()
            got = await read_until(echo, b"sent during the cut", timeout=9)
            assert got == b"sent during the cut"
            assert not client.session.closed.done(), client.session.close_reason
            await echo.write(b"after")
            assert await read_until(echo, b"after", 5) == b"after"
            rtt = await client.ping()
            await client.close()
            return rtt

        asyncio.run(asyncio.wait_for(main(), 60))
        assert agent.alive()
    finally:
        agent.stop()
    assert not any("no answer from the peer" in line for line in agent.stderr_lines), agent.stderr_lines


@pytest.mark.qemu
def test_network_cut_longer_than_keepalive_peer_declared_dead_and_console_reconnects(
        pki, tmp_path, vmdir, netns):
    vm = start_vm(vmdir)
    agent = Agent(pki, tmp_path / "agent", "%s:%d" % (netns.ns_ip, 7443), [("web1", vm.qmp_path)],
                  netns=netns.name)
    try:
        agent.start()

        async def main():
            await wait_console_attached(pki, agent.address)
            watcher = await connect_as(pki, agent.address)  # a plain session, to time its death
            console = PipedConsole(pki, agent.address)
            try:
                console.type(b"before the cut\r")
                await console.out.wait_for(b"BEFORE THE CUT\r\n")
                netns.cut()
                cut_at = time.monotonic()
                try:
                    reason = await asyncio.wait_for(watcher.session.wait_closed(), 20)
                    dead_after = time.monotonic() - cut_at
                    await console.out.wait_status(r"connection lost: no answer from the peer", 10)
                finally:
                    netns.restore()
                console.type(b"after the cut\r")
                await console.out.wait_status(r"^reconnected after", timeout=30)
                await console.out.wait_for(b"AFTER THE CUT\r\n")
                code = await console.finish()
            except BaseException:
                await console.abort()
                raise
            with contextlib.suppress(Exception):
                await watcher.close()
            assert code == 0
            return reason, dead_after, bytes(console.out.data), console.out.statuses

        reason, dead_after, seen, statuses = asyncio.run(asyncio.wait_for(main(), 120))
        assert agent.alive()
    finally:
        agent.stop()
        vm.terminate()
    assert "no answer from the peer" in reason, reason
    assert 9.0 <= dead_after <= 16.0, dead_after  # keepalive: 5 s ping, dead at 10 s
    # the same agent and console: resumed by offset, nothing twice, nothing missed
    assert no_banner(seen) == expected_echo(b"before the cut\r" + b"after the cut\r"), seen
    assert not any("began anew" in s for s in statuses), statuses
    assert any("no answer from the peer" in line for line in agent.stderr_lines), agent.stderr_lines


# --------------------------------------------------------------------------- disk full


@pytest.mark.qemu
def test_console_log_disk_full_one_error_ring_and_viewers_keep_working(pki, tmp_path, vmdir):
    logs = tmp_path / "logs"
    logs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(logs)], check=True, timeout=10)
    vm = agent = None
    try:
        vm = start_vm(vmdir)
        agent = Agent(pki, tmp_path / "agent", "127.0.0.1:0", [("web1", vm.qmp_path)],
                      extra=['console_log_dir = "%s"' % logs])
        agent.start()
        line = b"0123456789 the console log's disk is full abcdefghijklmnopqrstuvwxyz\r"
        payload = line * 1500  # about 105 KB in, more out: well beyond 64 KiB
        want = expected_echo(payload)  # the banner came before the takeover

        async def main():
            await wait_console_attached(pki, agent.address)
            client = await connect_as(pki, agent.address)
            live = await client.open("web1", "console", "ro", {"replay": "all"})
            writer = await client.open("web1", "console", "rw")
            sender = asyncio.ensure_future(writer.write(payload))
            got = b""
            deadline = time.monotonic() + 90
            while len(got) < len(want):
                left = deadline - time.monotonic()
                assert left > 0, "live viewer got %d of %d bytes" % (len(got), len(want))
                chunk = await asyncio.wait_for(live.read(), left)
                assert chunk
                got += chunk
            await sender
            banner = got.startswith(BOOT_SECTOR_BANNER) and not want.startswith(BOOT_SECTOR_BANNER)
            full = (BOOT_SECTOR_BANNER if banner else b"") + want
            while len(got) < len(full):
                got += await asyncio.wait_for(live.read(), 10)
            assert got == full  # the live viewer missed nothing
            late = await client.open("web1", "console", "ro", {"replay": "all"})
            replay = b""
            while len(replay) < len(full):
                chunk = await asyncio.wait_for(late.read(), 10)
                assert chunk
                replay += chunk
            assert replay == full  # the ring (1 MiB) holds it all
            # and it still works after the disk filled up
            await writer.write(b"more\r")
            await read_until(live, b"MORE\r\n", timeout=10)
            await client.close()

        asyncio.run(asyncio.wait_for(main(), 120))
        time.sleep(0.3)
        assert agent.alive()
        log = (logs / "web1.serial0.log").read_bytes()
        assert 0 < len(log) <= 64 * 1024 and want.startswith(no_banner(log))
        errors = [line for line in agent.stderr_lines if "web1.serial0.log" in line]
        assert len(errors) == 1, agent.stderr_lines
        assert "No space left on device" in errors[0] and "logging stops" in errors[0], errors
    finally:
        if agent is not None:
            agent.stop()
        if vm is not None:
            vm.terminate()
        subprocess.run(["umount", str(logs)], timeout=10)
