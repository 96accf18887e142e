"""VMs on a host laid out like Proxmox VE: a vm_dir shaped like /var/run/qemu-server.

Proxmox keeps, per running VM, ``VMID.qmp`` (QMP), ``VMID.serial0`` (a socket serial
with ``serial0: socket``), ``VMID.vnc`` (QEMU runs ``-vnc unix:...VMID.vnc,password=on``),
``VMID.qga`` (the guest agent's socket) and ``VMID.pid``, and starts QEMU with ``-name``.
Proved here against real QEMU (the boot-sector echo guest) started that way:
- only ``VMID.qmp`` is a VM; the other files, and a stale socket, make no noise;
- the VM is known by its -name (web1) with the VMID (100) as an alias: either opens it,
  an ACL rule for web1 grants 100 and one for 100 grants web1, a rule for another VM
  grants neither; `vproxy ls` shows both names;
- two sockets whose QEMUs report the same -name both keep their socket's name (and the
  agent says why, once); the name comes back when the clash is gone;
- VNC on a server that asks for a password (``password=on``, on a unix socket and on
  ``-vnc none``) is served without one (add_client skipauth: security type None), and a
  VM without VNC is still told apart.
"""

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from support.agenttools import AgentProcess, read_until as read_stream_until
from support.memstream import open_channel, read_exactly, read_until
from support.vmtools import BOOT_SECTOR_BANNER, boot_sector_vm, qemu_available
from vproxy.agent.qemu.provider import QemuProvider
from vproxy.agent.qemu.vms import VMRegistry, _scan, usable_name
from vproxy.client.connection import connect
from vproxy.errors import ChannelRefused
from vproxy.mux import RefuseCode, ResetCode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)


# --------------------------------------------------------------------------- helpers


def stale_socket(path: Path) -> None:
    """A socket file nobody listens on (what a QEMU that was killed leaves behind)."""
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


def proxmox_vm(workdir: Path, pve: Path, vmid: str, name: str, *, vnc: str = "unix"):
    """The boot-sector guest started the way Proxmox starts a VM (paused, -S): QMP on
    pve/VMID.qmp, its pid in pve/VMID.pid, a socket-server serial on pve/VMID.serial0
    (here the second port, COM2: the guest echoes on COM1, whose null chardev the agent
    takes over), the guest agent's socket pve/VMID.qga, and VNC with a password on
    pve/VMID.vnc."""
    extra = ["-vga", "std",
             "-vnc", ("unix:%s,password=on" % (pve / (vmid + ".vnc"))) if vnc == "unix" else vnc,
             "-chardev", "socket,id=serial1,path=%s,server=on,wait=off" % (pve / (vmid + ".serial0")),
             "-serial", "chardev:serial1",
             "-chardev", "socket,id=qga0,path=%s,server=on,wait=off" % (pve / (vmid + ".qga"))]
    vm = boot_sector_vm(workdir, vnc=False, name=name, paused=True, extra=extra)
    vm.qmp_path = pve / (vmid + ".qmp")
    vm.pidfile = pve / (vmid + ".pid")
    return vm


@pytest.fixture
def pve(tmp_path):
    """A short directory (unix socket paths are limited to 107 bytes) shaped like
    /var/run/qemu-server, with a stale QMP socket and pidfile of a VM that died."""
    d = Path(tempfile.mkdtemp(prefix="pve"))
    stale_socket(d / "101.qmp")
    (d / "101.pid").write_text("99999\n")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@contextlib.asynccontextmanager
async def registry_on(directory, **options):
    registry = VMRegistry([], socket_dir=str(directory), scan_interval=0.1, **options)
    await registry.start()
    try:
        yield QemuProvider(registry), registry
    finally:
        await registry.stop()


async def wait_for(predicate, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        await asyncio.sleep(0.02)


async def ready_and_running(registry, name):
    mon = registry.get(name).monitor
    assert await mon.wait_ready(10)
    if (await mon.execute("query-status"))["status"] != "running":
        await mon.execute("cont")


async def end(stream):
    stream.reset(ResetCode.CANCEL, "test done")
    await asyncio.wait_for(stream.task, 10)


async def rfb_security_types(stream) -> bytes:
    """RFB 3.8 up to the security types the server offers; then picks None (1) if
    offered, and checks SecurityResult OK and that a ServerInit follows."""
    assert await read_exactly(stream, 12) == b"RFB 003.008\n"
    await stream.write(b"RFB 003.008\n")
    (n,) = await read_exactly(stream, 1)
    types = await read_exactly(stream, n)
    if 1 in types:
        await stream.write(b"\x01")
        assert await read_exactly(stream, 4) == b"\0\0\0\0"  # SecurityResult OK
        await stream.write(b"\x01")  # ClientInit, shared
        width, height = int.from_bytes(await read_exactly(stream, 2), "big"), \
            int.from_bytes(await read_exactly(stream, 2), "big")
        assert width >= 320 and height >= 200
    return types


# --------------------------------------------------------------------------- no QEMU


def test_scan_takes_only_qmp_sockets(tmp_path):
    """In a Proxmox-shaped directory only NAME.qmp (and suffix-less sockets) are VMs:
    VMID.serial0, VMID.vnc and VMID.qga are sockets too, and 100.qga sorts before
    100.qmp, so taking every socket by its stem would talk QMP to the guest agent."""
    d = Path(tempfile.mkdtemp(prefix="pvs"))
    try:
        for f in ("100.qga", "100.qmp", "100.serial0", "100.vnc", "plain", ".hidden", "102.qmp"):
            stale_socket(d / f)
        (d / "100.pid").write_text("1\n")
        (d / "103.qmp").write_text("not a socket\n")
        assert _scan(str(d)) == {"100": str(d / "100.qmp"), "102": str(d / "102.qmp"),
                                 "plain": str(d / "plain"), ".hidden": str(d / ".hidden")}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_usable_names():
    assert usable_name("web1") and usable_name("db-2.example") and usable_name("100")
    for bad in ("", "my vm", "a/b", "-rf", ".x", "tab\there", "x" * 129, "nl\n"):
        assert not usable_name(bad), bad


# --------------------------------------------------------------------------- real QEMU


def quiet(caplog):
    """Warnings (or worse) the agent's QEMU side logged."""
    return [r for r in caplog.records
            if r.name.startswith("vproxy.qemu") and r.levelno >= logging.WARNING]


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 not installed")
def test_proxmox_directory_name_alias_and_clash(tmp_path, pve, caplog):
    caplog.set_level(logging.INFO, logger="vproxy.qemu")
    web1 = proxmox_vm(tmp_path / "100", pve, "100", "web1")
    twin = proxmox_vm(tmp_path / "102", pve, "102", "web1")  # the same -name
    web1.start()
    try:
        async def main():
            async with registry_on(pve) as (provider, registry):
                await wait_for(lambda: "web1" in registry.names(), "VM 100 to be named web1")
                assert registry.names() == ["101", "web1"]  # 101: the stale socket, absent
                vm = registry.get("web1")
                assert registry.get("100") is vm and vm.key == "100" and vm.aliases == ["100"]
                assert registry.names_of("100") == registry.names_of("web1") == ("web1", "100")
                assert registry.names_of("nope") == ("nope",)
                assert registry.get("101").state == "absent"
                with pytest.raises(ChannelRefused) as e:
                    registry.get("web2")
                assert e.value.code == RefuseCode.NO_SUCH_VM
                await ready_and_running(registry, "100")
                (described,) = [d for d in await provider.describe() if d["vm"] == "web1"]
                assert described["aliases"] == ["100"] and described["qmp"] == str(pve / "100.qmp")
                assert described["vnc"]["available"] and described["vnc"]["auth"] == "vnc"

                by_id = await open_channel(provider, "100", "console", "rw", {"replay": "all"})
                assert await read_until(by_id, BOOT_SECTOR_BANNER) == BOOT_SECTOR_BANNER
                by_name = await open_channel(provider, "web1", "console", "ro")
                await by_id.write(b"hello\r")
                assert (await read_until(by_id, b"HELLO\r\n")).endswith(b"HELLO\r\n")
                assert (await read_until(by_name, b"HELLO\r\n")).endswith(b"HELLO\r\n")
                assert by_id.info["console"] == by_name.info["console"] == "serial0"
                # VNC asks for a password (password=on), the agent's viewer gets None
                viewer = await open_channel(provider, "100", "vnc", "rw")
                assert await rfb_security_types(viewer) == b"\x01"
                await end(viewer)
                await end(by_name)

                # nothing in the directory but the QEMU side's own business was worth a word
                assert quiet(caplog) == [], [r.getMessage() for r in quiet(caplog)]

                # a second socket whose QEMU says -name web1: both go by socket name
                twin.start()
                await wait_for(lambda: "102" in registry.names() and "100" in registry.names(),
                               "the clash to rename web1 back to 100")
                assert registry.names() == ["100", "101", "102"]
                assert registry.find("web1") is None
                assert registry.get("100") is vm and vm.name == "100" and vm.aliases == []
                clash = [r.getMessage() for r in quiet(caplog)]
                assert any("VM 100: not known by its QEMU's -name 'web1'" in m and "102.qmp" in m
                           for m in clash), clash
                assert any(m.startswith("VM 102: not known by its QEMU's -name 'web1'") for m in clash), clash
                # the console open by the alias lives on, its messages name the VM anew
                await by_id.write(b"still\r")
                assert (await read_until(by_id, b"STILL\r\n")).endswith(b"STILL\r\n")

                twin.terminate()  # QEMU removes its socket: the clash is over
                await wait_for(lambda: registry.names() == ["101", "web1"], "web1 to come back")
                assert registry.get("100") is vm
                # the clash was told once per VM, not on every scan
                assert len([r for r in quiet(caplog) if "not known by" in r.getMessage()]) == 2

                # QEMU killed and started again: the name and the alias come back with it
                web1.kill()
                await wait_for(lambda: vm.state == "absent", "QEMU's death to be noticed")
                assert registry.get("web1") is vm  # its socket file stays: still listed
                web1.wait(10)
                web1.proc = None
                web1.start()
                await ready_and_running(registry, "web1")
                assert registry.names() == ["101", "web1"] and vm.aliases == ["100"]
                again = await open_channel(provider, "web1", "console", "rw", {"replay": "all"})
                await read_until(again, b"STILL\r\n")  # the history, from before the restart
                await read_until(again, BOOT_SECTOR_BANNER)  # booted again
                await again.write(b"back\r")
                assert (await read_until(again, b"BACK\r\n")).endswith(b"BACK\r\n")
                await end(again)
                await end(by_id)

        asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        web1.terminate()
        twin.terminate()


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 not installed")
def test_vnc_with_password_none_and_no_vnc(tmp_path):
    """-vnc none,password=on: a display whose server wants a password; add_client with
    skipauth serves it without one. A VM without -vnc is still refused as having no VNC."""
    pw = boot_sector_vm(tmp_path / "pw", vnc=False, name="pw", paused=False,
                        extra=["-vga", "std", "-vnc", "none,password=on"])
    novnc = boot_sector_vm(tmp_path / "novnc", vnc=False, name="novnc", paused=False)
    pw.start()
    novnc.start()
    try:
        async def main():
            registry = VMRegistry([("pw", str(pw.qmp_path)), ("novnc", str(novnc.qmp_path))])
            await registry.start()
            provider = QemuProvider(registry)
            try:
                for name in ("pw", "novnc"):
                    assert await registry.get(name).monitor.wait_ready(10)
                viewer = await open_channel(provider, "pw", "vnc", "rw")
                assert await rfb_security_types(viewer) == b"\x01"
                await end(viewer)
                assert registry.get("pw").vnc.describe()["auth"] == "vnc"
                with pytest.raises(ChannelRefused) as e:
                    await open_channel(provider, "novnc", "vnc", "rw")
                assert e.value.code == RefuseCode.UNAVAILABLE
                assert "VM novnc has no VNC display" in e.value.message
            finally:
                await registry.stop()

        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        pw.terminate()
        novnc.terminate()


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 not installed")
def test_agent_on_proxmox_directory_acl_by_name_and_alias(pki, tmp_path, pve):
    """`vproxy serve` with vm_dir = the Proxmox-shaped directory, over mutual TLS:
    alice's rule names web1, ci-runner's names 100, bob's names another VM."""
    web1 = proxmox_vm(tmp_path / "100", pve, "100", "web1")
    web1.start()
    agent = AgentProcess(pki, tmp_path, [], [
        {"identities": ["alice"], "vms": ["web1"], "channels": ["console", "vnc"], "modes": ["force"]},
        {"identities": ["ci-runner"], "vms": ["100"], "channels": ["console"], "modes": ["ro"]},
        {"identities": ["bob"], "vms": ["web2", "10[2-9]"]},
    ], ['vm_dir = "%s"' % pve, "resume_prelaunch = true"])
    try:
        async def main():
            alice = await connect(agent.address, pki.alice.cert, pki.alice.key, pki.ca,
                                  server_name="localhost")
            deadline = time.monotonic() + 20
            while True:  # the agent learns the -name on its first QMP connection
                vms = await alice.list_vms()
                if vms and vms[0]["vm"] == "web1" and vms[0]["consoles"]:
                    break
                assert time.monotonic() < deadline, vms
                await asyncio.sleep(0.1)
            assert [(vm["vm"], vm["aliases"]) for vm in vms] == [("web1", ["100"])]  # not 101

            console = await alice.open("100", "console", "rw", {"replay": "all"})
            await read_stream_until(console, BOOT_SECTOR_BANNER)
            await console.write(b"by id\r")
            await read_stream_until(console, b"BY ID\r\n")
            named = await alice.open("web1", "console", "ro")
            await console.write(b"by name\r")
            await read_stream_until(named, b"BY NAME\r\n")

            ci = await connect(agent.address, pki.san_client.cert, pki.san_client.key, pki.ca,
                               server_name="localhost")
            watcher = await ci.open("web1", "console", "ro")  # a rule for 100 grants web1
            await console.write(b"seen\r")
            await read_stream_until(watcher, b"SEEN\r\n")
            with pytest.raises(ChannelRefused) as info:
                await ci.open("web1", "console", "rw")
            assert info.value.code == RefuseCode.FORBIDDEN
            assert "mode rw is not granted" in info.value.message
            with pytest.raises(ChannelRefused) as info:
                await ci.open("100", "vnc", "rw")
            assert info.value.code == RefuseCode.FORBIDDEN
            assert [vm["vm"] for vm in await ci.list_vms()] == ["web1"]

            bob = await connect(agent.address, pki.bob.cert, pki.bob.key, pki.ca, server_name="localhost")
            for name in ("web1", "100"):
                with pytest.raises(ChannelRefused) as info:
                    await bob.open(name, "console", "ro")
                assert info.value.code == RefuseCode.FORBIDDEN, name
                assert "no ACL rule grants it" in info.value.message
            assert await bob.list_vms() == []
            for client in (alice, ci, bob):
                await client.close()

        asyncio.run(asyncio.wait_for(main(), 120))

        # VNC through the tunnel with the Python API: no password asked (password=on)
        import vproxy.api

        with vproxy.api.connect(agent.address, cert=pki.alice.cert, key=pki.alice.key, ca=pki.ca,
                                server_name="localhost") as client:
            shot = client.screenshot("100", tmp_path / "screen.png")
        assert shot.width >= 640 and (tmp_path / "screen.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        out = subprocess.run([sys.executable, "-m", "vproxy", "ls", agent.address, "--cert", pki.alice.cert,
                              "--key", pki.alice.key, "--ca", pki.ca],
                             capture_output=True, text=True, env=ENV, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "/web1 (alias 100)  running" in out.stdout, out.stdout
        assert "its VNC password is not needed" in out.stdout, out.stdout
    finally:
        agent.stop()
        web1.terminate()
    audit = agent.audit_lines()
    assert any("identity=alice vm=100 channel=console mode=rw result=" in line for line in audit)
    assert any("identity=bob vm=100 channel=console mode=ro result='refused:" in line for line in audit)
