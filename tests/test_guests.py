"""The project's real test guests, checked end to end over QMP exactly as the agent
will drive them (socketpair + send_fd_scm + getfd + chardev-change / chardev-add)."""

import asyncio
import os
import time

import pytest

from support import vmtools
from support.vmtools import (
    BOOT_SECTOR_BANNER,
    boot_sector_vm,
    exchange,
    hotplug_port,
    expected_echo,
    qmp_connect,
    read_until,
    take_over_chardev,
)
from vproxy.guests import bootsector

needs_qemu = pytest.mark.skipif(not vmtools.qemu_available(), reason="qemu-system-x86_64 not installed")


# --------------------------------------------------------------------- boot sector, offline


def test_boot_sector_layout():
    sector = bootsector.build_boot_sector()
    assert len(sector) == 512
    assert sector[510:] == b"\x55\xaa"
    assert BOOT_SECTOR_BANNER + b"\x00" in sector
    assert sector[0] == 0xFA  # cli


def test_boot_sector_custom_banner_and_limits(tmp_path):
    sector = bootsector.build_boot_sector(b"vm-7 up\r\n")
    assert b"vm-7 up\r\n\x00" in sector
    with pytest.raises(ValueError):
        bootsector.build_boot_sector(b"x" * 400)
    with pytest.raises(ValueError):
        bootsector.build_boot_sector(b"a\x00b")
    disk = bootsector.build_boot_disk(tmp_path / "d.img")
    data = disk.read_bytes()
    assert len(data) == bootsector.DISK_SIZE
    assert data[:512] == bootsector.build_boot_sector()
    assert not any(data[512:])


def test_expected_echo():
    assert expected_echo(b"hello\r") == b"HELLO\r\n"
    assert expected_echo(b"aZz{`\n\x00\xff") == b"AZZ{`\n\x00\xff"


# --------------------------------------------------------------------- boot sector, in QEMU


async def _paused_takeover_session(vm):
    """Start paused, take over serial0, cont: the banner is caught; then echo."""
    qmp = await qmp_connect(vm)
    try:
        sock = await take_over_chardev(qmp, "serial0")
        with sock:
            await qmp.execute("cont")
            t0 = time.monotonic()
            assert read_until(sock, BOOT_SECTOR_BANNER, timeout=30) == BOOT_SECTOR_BANNER
            boot = time.monotonic() - t0
            sock.sendall(b"hello\r")
            assert read_until(sock, b"\r\n", timeout=10) == b"HELLO\r\n"
            return boot
    finally:
        await qmp.disconnect()


@needs_qemu
@pytest.mark.qemu
@pytest.mark.slow
def test_boot_sector_banner_and_echo_tcg(tmp_path):
    vm = boot_sector_vm(tmp_path, vnc=True, paused=True, prefer_kvm=False)
    with vm:
        async def go():
            qmp = await qmp_connect(vm)
            try:
                sock = await take_over_chardev(qmp, "serial0")
                with sock:
                    await qmp.execute("cont")
                    assert read_until(sock, BOOT_SECTOR_BANNER, timeout=30) == BOOT_SECTOR_BANNER
                    sock.sendall(b"hello\r")
                    assert read_until(sock, b"\r\n", timeout=10) == b"HELLO\r\n"
                    # 4 KiB of every byte value, sent at once: nothing lost, all transformed
                    data = bytes(range(256)) * 16
                    want = expected_echo(data)
                    got = exchange(sock, data, len(want), timeout=60)
                    assert got == want
                    # keys typed on the PS/2 keyboard (as a VNC viewer would) echo too
                    await qmp.execute("send-key", {"keys": [
                        {"type": "qcode", "data": k} for k in ("k", "b", "d")]})
                    assert read_until(sock, b"KBD", timeout=10) == b"KBD"
                    # and nothing else arrives afterwards (no heartbeat, no stray output)
                    sock.settimeout(0.3)
                    with pytest.raises(OSError):  # socket.timeout
                        sock.recv(1)
            finally:
                await qmp.disconnect()

        asyncio.run(go())


async def _wait_in_echo_loop(qmp, timeout=30.0):
    """Sample the vCPU until it is in the guest's main poll loop (CS=0, IP between
    `poll` and `putc`), which it reaches only after printing the banner."""
    import re

    sym = bootsector.symbols()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = await qmp.execute("human-monitor-command", {"command-line": "info registers"})
        cs = re.search(r"CS =([0-9a-f]+)", r)
        ip = re.search(r"EIP=([0-9a-f]+)", r)
        if cs and ip and int(cs.group(1), 16) == 0 and sym["poll"] <= int(ip.group(1), 16) < sym["putc"]:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the guest never reached its echo loop")


@needs_qemu
@pytest.mark.qemu
@pytest.mark.slow
def test_boot_sector_banner_lost_before_takeover(tmp_path):
    """Without -S the banner goes to the null chardev before anyone takes over: the
    first bytes we see are our own echo. (This is why the agent must attach early.)"""
    vm = boot_sector_vm(tmp_path, vnc=False, paused=False, prefer_kvm=False)
    with vm:
        async def go():
            qmp = await qmp_connect(vm)
            try:
                await _wait_in_echo_loop(qmp)  # so the banner has surely gone to null
                sock = await take_over_chardev(qmp, "serial0")
                with sock:
                    sock.sendall(b"abc\r")
                    assert read_until(sock, b"\r\n", timeout=10) == b"ABC\r\n"
            finally:
                await qmp.disconnect()

        asyncio.run(go())


@needs_qemu
@pytest.mark.qemu
@pytest.mark.kvm
@pytest.mark.slow
def test_boot_sector_under_kvm(tmp_path):
    if not vmtools.kvm_usable():
        pytest.skip("KVM not usable here")
    vm = boot_sector_vm(tmp_path, vnc=False, paused=True, prefer_kvm=True)
    assert vm.accel == "kvm"
    with vm:
        asyncio.run(_paused_takeover_session(vm))


@needs_qemu
@pytest.mark.qemu
@pytest.mark.slow
def test_qemu_start_failure_reports_stderr(tmp_path):
    vm = vmtools.QemuVM(["-no-such-option"], workdir=tmp_path, prefer_kvm=False)
    with pytest.raises(vmtools.QemuError) as ei:
        vm.start()
    assert "no-such-option" in str(ei.value)
    vm.terminate()


# --------------------------------------------------------------------- Linux guest


def _linux_guest_or_skip():
    import shutil

    from support.guests import linux_guest

    if not vmtools.qemu_available():
        pytest.skip("qemu-system-x86_64 not installed")
    for tool in ("apt-get", "apt-cache", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.skip("%s not available: cannot fetch Debian's kernel" % tool)
    return linux_guest


def test_cpio_newc_layout():
    from support.guests.linux_guest import _cpio_newc

    data = _cpio_newc([("init", 0o100755, b"#!/bin/sh\n", 0, 0), ("dev", 0o40755, b"", 0, 0)])
    assert data.startswith(b"070701")
    assert len(data) % 4 == 0
    assert b"init\x00" in data and b"TRAILER!!!\x00" in data


@pytest.mark.qemu
@pytest.mark.slow
def test_linux_guest_login_command_and_hotplugged_echo(tmp_path):
    linux_guest = _linux_guest_or_skip()
    import hashlib

    vm = vmtools.linux_vm(tmp_path, paused=True, name="lin")
    assert vm.accel == "tcg"
    with vm:
        async def go():
            qmp = await qmp_connect(vm)
            try:
                con = await take_over_chardev(qmp, "serial0")
                await qmp.execute("cont")
                t0 = time.monotonic()
                buf = bytearray()
                read_until(con, linux_guest.READY_MARKER, timeout=180, buf=buf)
                read_until(con, linux_guest.LOGIN_PROMPT, timeout=30, buf=buf)
                print("Linux guest: login prompt %.1f s after cont" % (time.monotonic() - t0))
                con.sendall(b"root\r")
                read_until(con, linux_guest.SHELL_PROMPT, timeout=30, buf=buf)
                con.sendall(b"echo $((6*7))\r")
                out = read_until(con, linux_guest.SHELL_PROMPT, timeout=30, buf=buf)
                assert b"\r\n42\r\n" in out

                # a port hotplugged the way the agent does it echoes, and the guest opens it
                port = await hotplug_port(qmp, "org.vproxy.echo.hot", "hot1")
                ev = await vmtools.wait_event(qmp, "VSERPORT_CHANGE", timeout=30, id="hot1")
                assert ev["data"]["open"] is True
                data = os.urandom(1 << 20)
                t1 = time.monotonic()
                got = exchange(port, data, len(data), timeout=120)
                print("1 MiB echoed in %.2f s" % (time.monotonic() - t1))
                assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()

                # unplug, then plug a port again (the guest may reuse the vportNpM name)
                port.close()
                await qmp.execute("device_del", {"id": "hot1"})
                await vmtools.wait_event(qmp, "DEVICE_DELETED", timeout=30, device="hot1")
                await qmp.execute("chardev-remove", {"id": "ch_hot1"})
                port = await hotplug_port(qmp, "org.vproxy.echo.hot", "hot2")
                with port:
                    await vmtools.wait_event(qmp, "VSERPORT_CHANGE", timeout=30, id="hot2", open=True)
                    port.sendall(b"again\n")
                    assert read_until(port, b"again\n", timeout=30) == b"again\n"

                # the boot-time port org.vproxy.echo0 (null chardev) taken over while running
                echo0 = await take_over_chardev(qmp, "ch-echo0")
                with echo0:
                    echo0.sendall(b"ping\n")
                    assert read_until(echo0, b"ping\n", timeout=30) == b"ping\n"

                # logging out gives the login prompt again
                con.sendall(b"exit\r")
                read_until(con, linux_guest.LOGIN_PROMPT, timeout=30, buf=buf)
                con.close()
            finally:
                await qmp.disconnect()

        asyncio.run(go())
