"""Consoles on chardevs someone else made, adopted without chardev-change: a pty (the
libvirt shape), a unix socket server (the Proxmox shape) and a TCP socket server (the CI
script shape), against a real QEMU running the boot-sector echo guest.

Like tests/test_qemu_console.py, a VMRegistry and a QemuProvider (the agent's QEMU side)
serve in-memory streams. VMs start with -S and the test resumes them with ``cont`` once
the agent is attached, as libvirt does.
"""

import asyncio
import contextlib
import socket
import time

import pytest

from support.memstream import open_channel, read_exactly, read_until
from support.vmtools import BOOT_SECTOR_BANNER, QemuVM, expected_echo, qemu_available, qmp_session
from vproxy.agent.qemu.provider import QemuProvider
from vproxy.agent.qemu.vms import VMRegistry
from vproxy.cli.ls import format_listing
from vproxy.errors import ChannelRefused, StreamResetError
from vproxy.guests.bootsector import build_boot_disk
from vproxy.mux import RefuseCode, ResetCode

pytestmark = [pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 not installed"),
              pytest.mark.qemu, pytest.mark.slow]

BANNER = BOOT_SECTOR_BANNER
PTY_SHAPE = ["-chardev", "pty,id=charserial0", "-device", "isa-serial,chardev=charserial0"]  # libvirt


def proxmox_shape(path):
    return ["-chardev", "socket,id=serial0,path=%s,server=on,wait=off" % path, "-serial", "chardev:serial0"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def echo_vm(workdir, serial_args, name="web1"):
    """The boot-sector guest with *serial_args* as its serial port, started paused (-S)."""
    workdir.mkdir(parents=True, exist_ok=True)
    disk = build_boot_disk(workdir / (name + ".img"))
    args = ["-machine", "pc", "-m", "32", "-drive", "file=%s,format=raw,if=ide" % disk] + serial_args
    return QemuVM(args, workdir=workdir, name=name, paused=True, prefer_kvm=False)


@contextlib.asynccontextmanager
async def agent(vm, cont=True, **registry_options):
    registry = VMRegistry([(vm.name, str(vm.qmp_path))], **registry_options)
    await registry.start()
    try:
        assert await registry.get(vm.name).monitor.wait_ready(10)
        if cont:
            await registry.get(vm.name).monitor.execute("cont")
        yield QemuProvider(registry), registry
    finally:
        await registry.stop()


async def wait_offset(registry, vm, console, at_least, timeout=20.0):
    deadline = time.monotonic() + timeout
    c = registry.get(vm).consoles.consoles[console]
    while c.offset < at_least:
        assert time.monotonic() < deadline, "console offset stuck at %d (%s)" % (c.offset, c.reason)
        await asyncio.sleep(0.01)
    return c


async def end(stream):
    stream.reset(ResetCode.CANCEL, "test done")
    await asyncio.wait_for(stream.task, 10)


async def restart(vm, registry):
    """Start the killed QEMU again (paused), wait for the agent to be back, resume the guest."""
    vm.wait()
    vm.proc = None
    vm.start()
    assert await registry.get(vm.name).monitor.wait_ready(10)
    await registry.get(vm.name).monitor.execute("cont")


async def check_console(provider, registry, console_id, held, where):
    """Banner captured, history replays, input echoes, resume by offset is exact."""
    c = await wait_offset(registry, "web1", console_id, len(BANNER))
    desc = registry.get("web1").consoles.describe()[0]
    assert (desc["status"], desc["held"], desc["held_where"]) == ("attached", held, where), desc
    s = await open_channel(provider, "web1", "console", "rw", {"replay": "all"}, "alice")
    assert s.info["console"] == console_id and s.info["mode"] == "rw"
    assert await read_exactly(s, len(BANNER)) == BANNER
    mark = c.offset
    await s.write(b"hello, pty\r")
    assert await read_until(s, b"\r\n") == expected_echo(b"hello, pty\r")
    await s.write(b"second\r")
    assert await read_until(s, b"\r\n") == expected_echo(b"second\r")
    await end(s)
    # resume by offset: exactly the bytes from the mark on, no gap, no repeat
    again = await open_channel(provider, "web1", "console", "ro", {"offset": str(mark)})
    assert again.info["start"] == str(mark)
    want = expected_echo(b"hello, pty\r") + expected_echo(b"second\r")
    assert await read_exactly(again, len(want)) == want
    await end(again)


async def check_reset_on_kill(vm, provider, registry):
    s = await open_channel(provider, "web1", "console", "rw")
    vm.kill()
    with pytest.raises(StreamResetError) as e:
        await asyncio.wait_for(s.read(), 10)
    assert e.value.code == ResetCode.CHANNEL_GONE
    assert e.value.message == "VM web1 went away (QEMU exited)"
    await asyncio.wait_for(s.task, 5)


async def check_comes_back(vm, provider, registry, console_id):
    """QEMU killed: the viewer is reset; started again the same way: the console is
    adopted again (the returned ManagedConsole), its history goes on, input echoes."""
    await check_reset_on_kill(vm, provider, registry)
    before = registry.get("web1").consoles.consoles[console_id].offset
    await restart(vm, registry)
    c = await wait_offset(registry, "web1", console_id, before + len(BANNER))
    back = await open_channel(provider, "web1", "console", "rw", {"replay": str(len(BANNER))})
    assert await read_exactly(back, len(BANNER)) == BANNER
    await back.write(b"back\r")
    assert await read_until(back, b"\r\n") == b"BACK\r\n"
    await end(back)
    return c


def test_pty_libvirt_shape(tmp_path):
    """-chardev pty (libvirt's default serial), started with -S and resumed by the test:
    the agent opens the pty QEMU reports, raw; everything a taken-over console does works,
    also after QEMU is killed and started again (on a new pty)."""
    vm = echo_vm(tmp_path, PTY_SHAPE).start()
    try:
        async def main():
            async with agent(vm) as (provider, registry):
                pty = registry.get("web1").consoles.describe()[0]["held_where"]
                assert pty.startswith("/dev/pts/")
                await check_console(provider, registry, "charserial0", "adopted pty", pty)
                listing = format_listing({"host": "h", "error": "", "vms": await provider.describe()})
                assert "console:charserial0" in listing and "attached (adopted pty %s)" % pty in listing
                c = await check_comes_back(vm, provider, registry, "charserial0")
                assert c.describe()["held"] == "adopted pty"

        asyncio.run(main())
    finally:
        vm.terminate()


def test_unix_socket_proxmox_shape(tmp_path):
    """A listening unix socket chardev (Proxmox's serial0: socket): the agent connects as
    its client; QEMU killed and restarted: the console comes back."""
    path = tmp_path / "100.serial0"
    if len(str(path)) > 100:
        pytest.skip("tmp path too long for a unix socket")
    vm = echo_vm(tmp_path, proxmox_shape(path)).start()
    try:
        async def main():
            async with agent(vm) as (provider, registry):
                await check_console(provider, registry, "serial0", "adopted socket", str(path))
                listing = format_listing({"host": "h", "error": "", "vms": await provider.describe()})
                assert "attached (adopted socket %s)" % path in listing
                await check_comes_back(vm, provider, registry, "serial0")

        asyncio.run(main())
    finally:
        vm.terminate()


def test_tcp_socket_server(tmp_path):
    """-serial tcp:127.0.0.1:PORT,server=on,wait=off (the CI script shape); QEMU killed
    and restarted on the same port: the console comes back."""
    port = free_port()
    vm = echo_vm(tmp_path, ["-serial", "tcp:127.0.0.1:%d,server=on,wait=off" % port]).start()
    try:
        async def main():
            async with agent(vm) as (provider, registry):
                await check_console(provider, registry, "serial0", "adopted socket", "127.0.0.1:%d" % port)
                await check_comes_back(vm, provider, registry, "serial0")

        asyncio.run(main())
    finally:
        vm.terminate()


async def wait_held(vm, label):
    """Wait until QEMU has accepted another client on socket server chardev *label*."""
    async with qmp_session(vm) as qmp:
        deadline = time.monotonic() + 10
        while True:
            filenames = {c["label"]: c["filename"] for c in await qmp.execute("query-chardev")}
            if not filenames[label].startswith("disconnected:"):
                return
            assert time.monotonic() < deadline, filenames
            await asyncio.sleep(0.05)


def test_socket_in_use_by_another_client(tmp_path):
    """Another client already holds the socket server: refused "in use" (a second
    connect() would succeed and hang); once it has left, the next open adopts it."""
    path = tmp_path / "100.serial0"
    vm = echo_vm(tmp_path, proxmox_shape(path)).start()
    other = socket.socket(socket.AF_UNIX)
    try:
        other.connect(str(path))

        async def main():
            await wait_held(vm, "serial0")
            async with agent(vm) as (provider, registry):
                with pytest.raises(ChannelRefused) as e:
                    await open_channel(provider, "web1", "console", "rw")
                assert e.value.code == RefuseCode.UNAVAILABLE
                assert e.value.message == "console serial0 of VM web1 is in use by another client of %s" % path
                desc = registry.get("web1").consoles.describe()[0]
                assert desc["status"] == "unavailable" and desc["held"] == ""
                other.close()
                deadline = time.monotonic() + 10
                while True:  # QEMU notices the other client left, then the open adopts
                    try:
                        s = await open_channel(provider, "web1", "console", "rw", {"replay": "all"})
                        break
                    except ChannelRefused:
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.1)
                assert registry.get("web1").consoles.describe()[0]["held"] == "adopted socket"
                # QEMU may only now send the banner it could not write while the other
                # client held the socket: the guest reads no input while it prints, so wait
                # for the console to be quiet before typing
                c = registry.get("web1").consoles.consoles["serial0"]
                last, quiet = c.offset, time.monotonic()
                while time.monotonic() - quiet < 0.5:
                    await asyncio.sleep(0.05)
                    if c.offset != last:
                        last, quiet = c.offset, time.monotonic()
                await s.write(b"mine\r")
                assert (await read_until(s, b"MINE\r\n")).endswith(b"MINE\r\n")
                await end(s)

        asyncio.run(main())
    finally:
        other.close()
        vm.terminate()


def test_adopt_off_keeps_refusal(tmp_path):
    """adopt = [] (or without "pty"): a pty console is refused, naming the pty and the setting."""
    vm = echo_vm(tmp_path, PTY_SHAPE).start()
    try:
        async def main():
            async with agent(vm, adopt=()) as (provider, registry):
                with pytest.raises(ChannelRefused) as e:
                    await open_channel(provider, "web1", "console")
                assert e.value.code == RefuseCode.UNAVAILABLE
                msg = e.value.message
                assert msg.startswith("console charserial0 of VM web1 is a pty (/dev/pts/"), msg
                assert "which this agent does not adopt (its adopt setting leaves out 'pty')" in msg
                desc = registry.get("web1").consoles.describe()[0]
                assert desc["status"] == "unavailable" and desc["held"] == ""

        asyncio.run(main())
    finally:
        vm.terminate()


def test_backend_kinds_from_query_chardev_strings():
    """The filename strings QEMU 7.2's query-chardev printed for each shape (checked by
    starting them), and what the agent makes of them."""
    from vproxy.agent.qemu import chardev

    kinds = {
        "pty:/dev/pts/3": chardev.PTY,
        "disconnected:unix:/var/run/qemu-server/100.serial0,server=on": chardev.SOCKET_SERVER,
        "unix:/var/run/qemu-server/100.serial0,server=on": chardev.SOCKET_SERVER_HELD,
        "disconnected:tcp:127.0.0.1:4555,server=on": chardev.SOCKET_SERVER,
        "tcp:127.0.0.1:4555,server=on <-> 127.0.0.1:59044": chardev.SOCKET_SERVER_HELD,
        "disconnected:tcp:127.0.0.1:45553": chardev.OTHER,  # a socket client to elsewhere
        "unix:/run/other.sock": chardev.OTHER,
        "file": chardev.OTHER,
        "stdio": chardev.OTHER,
        "mux": chardev.MUX,
        "null": chardev.NULL,
        "unix:": chardev.OURS,
        "disconnected:fd:vpc_serial0": chardev.OURS_DISCONNECTED,
    }
    for filename, kind in kinds.items():
        assert chardev.backend_kind(filename) == kind, filename
    assert str(chardev.socket_server("tcp:127.0.0.1:4555,server=on <-> 127.0.0.1:1")) == "127.0.0.1:4555"
    assert str(chardev.socket_server("disconnected:tcp:[::1]:4555,server=on")) == "[::1]:4555"

    async def local():
        return [await chardev.is_local_address(h) for h in ("127.0.0.1", "localhost", "0.0.0.0", "192.0.2.1")]

    assert asyncio.run(local()) == [True, True, True, False]
