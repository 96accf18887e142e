"""The project's real test guests, checked end to end over QMP exactly as the agent
will drive them (socketpair + send_fd_scm + getfd + chardev-change / chardev-add)."""

import asyncio
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vmtools  # noqa: E402
from vmtools import (  # noqa: E402
    BOOT_SECTOR_BANNER,
    boot_sector_vm,
    exchange,
    expected_echo,
    qmp_connect,
    read_until,
    take_over_chardev,
)
from vproxy.guests import bootsector  # noqa: E402

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


@needs_qemu
def test_boot_sector_banner_lost_before_takeover(tmp_path):
    """Without -S the banner goes to the null chardev before anyone takes over: the
    first bytes we see are our own echo. (This is why the agent must attach early.)"""
    vm = boot_sector_vm(tmp_path, vnc=False, paused=False, prefer_kvm=False)
    with vm:
        async def go():
            qmp = await qmp_connect(vm)
            try:
                await asyncio.sleep(2.0)  # boots in ~0.2 s under TCG
                sock = await take_over_chardev(qmp, "serial0")
                with sock:
                    sock.sendall(b"abc\r")
                    assert read_until(sock, b"\r\n", timeout=10) == b"ABC\r\n"
            finally:
                await qmp.disconnect()

        asyncio.run(go())


@needs_qemu
def test_boot_sector_under_kvm(tmp_path):
    if not vmtools.kvm_usable():
        pytest.skip("KVM not usable here")
    vm = boot_sector_vm(tmp_path, vnc=False, paused=True, prefer_kvm=True)
    assert vm.accel == "kvm"
    with vm:
        asyncio.run(_paused_takeover_session(vm))


@needs_qemu
def test_qemu_start_failure_reports_stderr(tmp_path):
    vm = vmtools.QemuVM(["-no-such-option"], workdir=tmp_path, prefer_kvm=False)
    with pytest.raises(vmtools.QemuError) as ei:
        vm.start()
    assert "no-such-option" in str(ei.value)
    vm.terminate()
