"""The acceptance test of issue 12: `vproxy serve --vm-dir DIR --qmp shared` on a
Proxmox-shaped host, used as a user would, without changing the VM.

DIR is shaped like /var/run/qemu-server, and the VM (VMID 100, the boot-sector echo
guest) is started with Proxmox's own command-line shapes for the parts that matter:

    -name web1,debug-threads=on -no-shutdown
    -chardev socket,id=qmp,path=DIR/100.qmp,server=on,wait=off -mon chardev=qmp,mode=control
    -pidfile DIR/100.pid -vnc unix:DIR/100.vnc,password=on
    -chardev socket,id=serial0,path=DIR/100.serial0,server=on,wait=off -device isa-serial,chardev=serial0

and -S, as Proxmox does with ``freeze: 1`` (`qm start` then `qm resume`): the qm-like
client resumes it once the agent holds the console, so the guest's banner is read from
its first byte and nothing is typed before it (the guest's UART set-up clears its
receive FIFO). The agent is `python -m vproxy serve --vm-dir DIR --qmp shared` with
certificates; the client is vproxy.api and the `vproxy` command. Throughout, a second
QMP client, as Proxmox's qm and pvedaemon are, connects to DIR/100.qmp, asks
query-status and disconnects every 100 ms: none of its operations may take 1 s.

Also here: the naming race (an open for "web1" while the agent has not yet been able to
ask QEMU its -name waits for it, up to 2 s, rather than answering NO_SUCH_VM). Per-VM
QMP modes (one VM shared, another exclusive, in one agent) are in test_qemu_shared_qmp.
"""

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

import vproxy.api
from support.agenttools import ENV, AgentProcess
from support.vmtools import BOOT_SECTOR_BANNER, QemuVM, accel_args, qemu_available
from vproxy.guests import build_boot_disk
from vproxy.errors import ChannelRefused
from vproxy.mux import RefuseCode

pytestmark = [pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 not installed"),
              pytest.mark.qemu, pytest.mark.slow]

BANNER = BOOT_SECTOR_BANNER.decode().strip()


class ProxmoxVM(QemuVM):
    """VMID *vmid* named *name*, started with Proxmox's command-line shapes (the module
    docstring), its sockets and pidfile in *pve*."""

    def __init__(self, workdir: Path, pve: Path, vmid: str = "100", name: str = "web1"):
        Path(workdir).mkdir(parents=True, exist_ok=True)
        disk = build_boot_disk(Path(workdir) / (vmid + ".img"))
        super().__init__(accel_args(False) + ["-machine", "pc", "-m", "32",
                                              "-drive", "file=%s,format=raw,if=ide" % disk],
                         workdir=workdir, name=name, qmp_path=pve / (vmid + ".qmp"), paused=True)
        self.pve, self.vmid = pve, vmid
        self.pidfile = pve / (vmid + ".pid")

    @property
    def command(self):
        p = str(self.pve / self.vmid)
        return [self.binary, "-name", "%s,debug-threads=on" % self.name, "-no-shutdown",
                "-chardev", "socket,id=qmp,path=%s.qmp,server=on,wait=off" % p,
                "-mon", "chardev=qmp,mode=control",
                "-pidfile", str(self.pidfile),
                "-nodefaults", "-no-user-config", "-display", "none",
                "-vga", "std", "-vnc", "unix:%s.vnc,password=on" % p,
                "-chardev", "socket,id=serial0,path=%s.serial0,server=on,wait=off" % p,
                "-device", "isa-serial,chardev=serial0",
                "-S"] + self.extra_args


async def qm_once(path: str, cmd: str = "query-status"):
    """What `qm` does for one command: connect, execute, disconnect."""
    client = QMPClient("qm")
    await asyncio.wait_for(client.connect(path), 30)
    try:
        return await client.execute(cmd)
    finally:
        await client.disconnect()


def qm(path, cmd="query-status"):
    """One qm command from this (test) thread; returns (seconds, reply)."""
    t0 = time.monotonic()
    reply = asyncio.run(qm_once(str(path), cmd))
    return time.monotonic() - t0, reply


class Manager(threading.Thread):
    """Proxmox's side: query-status on the shared QMP socket every 100 ms, each a
    connection of its own, timed. While QEMU is down the connect fails at once; those
    failures are counted (and timed) too."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path = str(path)
        self.times = []        # seconds of every operation, answered or not
        self.statuses = []     # what the answered ones said
        self.failures = 0
        self.stopping = threading.Event()

    def run(self):
        asyncio.run(self._main())

    async def _main(self):
        while not self.stopping.is_set():
            t0 = time.monotonic()
            try:
                reply = await asyncio.wait_for(qm_once(self.path), 5)
            except Exception:  # QEMU killed or not there yet
                self.failures += 1
            else:
                self.statuses.append(reply["status"])
            self.times.append(time.monotonic() - t0)
            await asyncio.sleep(0.1)

    def stop(self):
        self.stopping.set()
        self.join(15)


@pytest.fixture
def pve():
    """A short directory (unix socket paths are limited to 107 bytes) like /var/run/qemu-server."""
    d = Path(tempfile.mkdtemp(prefix="pve"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.1)


def ls_json(agent, pki):
    out = subprocess.run([sys.executable, "-m", "vproxy", "ls", agent.address, "--json", "--cert", pki.alice.cert,
                          "--key", pki.alice.key, "--ca", pki.ca], capture_output=True, text=True, env=ENV,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    (host,) = json.loads(out.stdout)
    return host


def adopted(agent, pki):
    """web1's serial0 as `vproxy ls --json` shows it, once adopted from its socket."""
    vms = ls_json(agent, pki)["vms"]
    consoles = [c for vm in vms if vm["vm"] == "web1" for c in vm["consoles"]]
    return consoles[0] if consoles and consoles[0]["held"] == "adopted socket" else None


def console_pipe(agent, pki, text):
    """`vproxy console HOST web1` in a pipe: *text* on stdin, the echo on stdout."""
    return subprocess.run([sys.executable, "-m", "vproxy", "console", agent.address, "web1",
                           "--cert", pki.alice.cert, "--key", pki.alice.key, "--ca", pki.ca],
                          input=text, capture_output=True, text=True, env=ENV, timeout=60)


def test_proxmox_host_end_to_end(pki, tmp_path, pve):
    vm = ProxmoxVM(tmp_path / "vm", pve)
    vm.start()
    manager = Manager(pve / "100.qmp")
    agent = None
    try:
        # QEMU 7.2 takes Proxmox's -chardev/-mon form of -qmp: a QMP client gets through
        assert qm(pve / "100.qmp")[1]["status"] == "prelaunch"
        manager.start()
        agent = AgentProcess(pki, tmp_path, [], [{"identities": ["alice"], "vms": ["*"]}],
                             args=["--vm-dir", pve, "--qmp", "shared"])
        with vproxy.api.connect(agent.address, cert=pki.alice.cert, key=pki.alice.key, ca=pki.ca) as client:
            # right after the agent starts, web1 opens by its -name (no retry: wait=0)
            console = client.console("web1", replay="all", wait=0)

            # vproxy ls: web1 (alias 100), shared QMP, its console adopted from the socket
            con = wait_until(lambda: adopted(agent, pki), 20, "serial0 adopted")
            assert con["id"] == "serial0" and con["held_where"] == str(pve / "100.serial0")
            text = subprocess.run([sys.executable, "-m", "vproxy", "ls", agent.address, "--cert",
                                   pki.alice.cert, "--key", pki.alice.key, "--ca", pki.ca],
                                  capture_output=True, text=True, env=ENV, timeout=60).stdout
            assert "%s/web1 (alias 100)" % agent.address in text and "(shared QMP, polled)" in text
            assert "adopted socket %s" % (pve / "100.serial0") in text, text
            (desc,) = ls_json(agent, pki)["vms"]
            assert desc["vnc"]["available"] and desc["vnc"]["auth"] == "vnc"  # password=on

            # qm resume: the banner arrives from the first byte; then type and get the echo
            seconds, _ = qm(pve / "100.qmp", "cont")
            assert seconds < 1.0
            console.expect(BANNER, timeout=20)
            console.sendline("hello proxmox")
            console.expect("HELLO PROXMOX", timeout=10)

            # the console streams both ways for 4 s under qm's polling
            lines, t0 = 0, time.monotonic()
            while time.monotonic() - t0 < 4.0:
                console.sendline("line %d" % lines)
                console.expect("LINE %d" % lines, timeout=10)
                lines += 1
            assert lines >= 20
            console.close()

            # the CLI in a pipe, as a script would use it (the writer role is free again)
            out = console_pipe(agent, pki, "piped\r")
            assert out.returncode == 0, out.stderr
            assert "PIPED" in out.stdout, (out.stdout, out.stderr)

            # a VNC screenshot through the agent: no VNC password asked
            shot = client.screenshot("web1", tmp_path / "web1.png")
            assert (shot.width, shot.height) == (720, 400) and shot.colours() >= 2

            # QEMU killed and started again the same way (qm start; qm resume)
            vm.kill()
            vm.wait(10)
            vm.proc = None
            time.sleep(1.0)  # the agent sees it gone; qm's connects fail meanwhile
            vm.start()
            wait_until(lambda: adopted(agent, pki) and qm(pve / "100.qmp")[1]["status"] == "prelaunch",
                       20, "serial0 adopted again")
            again = client.console("web1", replay=0, wait=5)
            qm(pve / "100.qmp", "cont")
            again.expect(BANNER, timeout=20)
            again.sendline("back again")
            again.expect("BACK AGAIN", timeout=10)
            again.close()
            out = console_pipe(agent, pki, "piped twice\r")
            assert "PIPED TWICE" in out.stdout, (out.stdout, out.stderr)
            shot = client.screenshot("web1")
            assert (shot.width, shot.height) == (720, 400) and shot.colours() >= 2
        manager.stop()
        print("qm: %d operations (%d failed while QEMU was down), max %.3f s"
              % (len(manager.times), manager.failures, max(manager.times)))
        assert len(manager.statuses) >= 50 and manager.failures >= 1  # it went on across the restart
        assert set(manager.statuses) == {"prelaunch", "running"}
        assert max(manager.times) < 1.0, sorted(manager.times)[-5:]
        assert not any("Traceback" in line for line in agent.stderr_lines)
    finally:
        manager.stopping.set()
        if agent is not None:
            agent.stop()
        vm.terminate()


class Holder(threading.Thread):
    """Another QMP client holding DIR/100.qmp (as a long `qm monitor` would) until released."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.connected, self.release = str(path), threading.Event(), threading.Event()

    def run(self):
        async def hold():
            client = QMPClient("holder")
            await client.connect(self.path)
            self.connected.set()
            while not self.release.is_set():
                await asyncio.sleep(0.02)
            await client.disconnect()

        asyncio.run(hold())


def test_open_by_name_waits_for_the_first_query_name(pki, tmp_path, pve):
    """The naming race: a vm_dir VM is known by its -name only once the agent has asked
    QEMU. Here another client holds the shared QMP socket when the agent starts, so it
    cannot ask: an open for an unknown name waits, at most 2 s, then NO_SUCH_VM; an open
    for "web1" waits until the socket is free and the name known, and then opens it."""
    vm = ProxmoxVM(tmp_path / "vm", pve)
    vm.start()
    holder = Holder(pve / "100.qmp")
    holder.start()
    agent = None
    try:
        assert holder.connected.wait(10)
        agent = AgentProcess(pki, tmp_path, [], [{"identities": ["alice"], "vms": ["*"]}],
                             args=["--vm-dir", pve, "--qmp", "shared"])
        with vproxy.api.connect(agent.address, cert=pki.alice.cert, key=pki.alice.key, ca=pki.ca) as client:
            t0 = time.monotonic()
            with pytest.raises(ChannelRefused) as info:
                client.console("web9", wait=0)
            assert info.value.code == RefuseCode.NO_SUCH_VM
            assert 1.8 < time.monotonic() - t0 < 3.5  # bounded: NAMING_WAIT
            assert "known: 100" in info.value.message  # still only its socket's name
            threading.Timer(0.5, holder.release.set).start()
            t0 = time.monotonic()
            console = client.console("web1", wait=0)  # no retry: the agent itself waited
            assert 0.4 < time.monotonic() - t0 < 2.5
            assert console.info["console"] == "serial0"
            console.close()
            t0 = time.monotonic()
            with pytest.raises(ChannelRefused) as info:  # named now: no wait
                client.console("web9", wait=0)
            assert time.monotonic() - t0 < 1.0 and "known: web1" in info.value.message
    finally:
        holder.release.set()
        holder.join(10)
        if agent is not None:
            agent.stop()
        vm.terminate()
