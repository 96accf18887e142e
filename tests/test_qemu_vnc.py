"""VNC through the agent: one QEMU VNC connection per stream (add_client on a passed fd).

The client side speaks raw RFB 3.8 (what any viewer does first), against the real QEMU
running the boot-sector guest, whose text screen is painted white on blue.
"""

import asyncio
import contextlib
import struct
import time

import pytest

from support.memstream import open_channel, read_exactly
from support.vmtools import boot_sector_vm, qemu_available
from vproxy.errors import ChannelRefused, StreamResetError
from vproxy.mux import RefuseCode, ResetCode
from vproxy.agent.qemu.provider import QemuProvider
from vproxy.agent.qemu.vms import VMRegistry
from vproxy.agent.qemu.vnc import SharedFlagFilter

pytestmark = pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 not installed")


@contextlib.asynccontextmanager
async def agent(*vms):
    registry = VMRegistry([(v.name, str(v.qmp_path)) for v in vms])
    await registry.start()
    try:
        for v in vms:
            assert await registry.get(v.name).monitor.wait_ready(10)
            if v.paused:
                await registry.get(v.name).monitor.execute("cont")
        yield QemuProvider(registry), registry
    finally:
        await registry.stop()


async def rfb_handshake(s, shared: bool = False):
    """RFB 3.8 up to ServerInit; returns (width, height, desktop name, pixel format)."""
    assert await read_exactly(s, 12) == b"RFB 003.008\n"
    await s.write(b"RFB 003.008\n")
    (n,) = await read_exactly(s, 1)
    types = await read_exactly(s, n)
    assert 1 in types, types  # None: skipauth
    await s.write(b"\x01")
    assert await read_exactly(s, 4) == b"\0\0\0\0"  # SecurityResult OK
    await s.write(b"\x01" if shared else b"\x00")  # ClientInit
    width, height = struct.unpack("!HH", await read_exactly(s, 4))
    pixel_format = struct.unpack("!BBBBHHHBBBxxx", await read_exactly(s, 16))
    (name_len,) = struct.unpack("!I", await read_exactly(s, 4))
    name = (await read_exactly(s, name_len)).decode()
    return width, height, name, pixel_format


async def screenshot(s, width, height, pixel_format):
    """Ask for the whole screen (raw encoding, the default); returns {(r, g, b): count}."""
    bpp, _depth, big_endian, _true, rmax, gmax, bmax, rsh, gsh, bsh = pixel_format
    assert bpp == 32
    await s.write(struct.pack("!BBHHHH", 3, 0, 0, 0, width, height))
    (msg_type,) = await read_exactly(s, 1)
    assert msg_type == 0, msg_type  # FramebufferUpdate
    _pad, nrects = struct.unpack("!BH", await read_exactly(s, 3))
    colours = {}
    for _ in range(nrects):
        x, y, w, h, enc = struct.unpack("!HHHHi", await read_exactly(s, 12))
        assert enc == 0
        pixels = await read_exactly(s, w * h * 4)
        fmt = ">I" if big_endian else "<I"
        for i in range(0, len(pixels), 97 * 4):  # a sample of the pixels
            (v,) = struct.unpack_from(fmt, pixels, i)
            rgb = ((v >> rsh) & rmax, (v >> gsh) & gmax, (v >> bsh) & bmax)
            colours[rgb] = colours.get(rgb, 0) + 1
    return colours


async def guest_up(registry, name):
    """The guest printed its banner (and so painted its screen)."""
    console = registry.get(name).consoles.consoles["serial0"]
    deadline = time.monotonic() + 20
    while console.offset == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def end(s):
    s.reset(ResetCode.CANCEL, "test done")
    await asyncio.wait_for(s.task, 10)


def test_shared_flag_filter():
    f = SharedFlagFilter()
    flow = b"RFB 003.008\n" + b"\x01" + b"\x00" + b"\x03\x00"
    out = b"".join(f.feed(flow[i:i + 1]) for i in range(len(flow)))
    assert out == b"RFB 003.008\n\x01\x01\x03\x00"
    f = SharedFlagFilter()  # RFB 3.3: no security-type byte from the client
    assert f.feed(b"RFB 003.003\n\x00\x03") == b"RFB 003.003\n\x01\x03"
    f = SharedFlagFilter()
    assert f.feed(b"GET / HTTP/1.1\r\n\x00") == b"GET / HTTP/1.1\r\n\x00"


@pytest.mark.qemu
@pytest.mark.slow
def test_rfb_handshake_and_two_viewers(tmp_path):
    """RFB through the channel with -vnc none (no listener at all); a second viewer
    asking for exclusive access does not kick the first."""
    vm = boot_sector_vm(tmp_path, vnc=True, name="bs", paused=True).start()
    try:
        async def main():
            async with agent(vm) as (provider, registry):
                await guest_up(registry, "bs")
                t0 = time.monotonic()
                a = await open_channel(provider, "bs", "vnc", identity="alice")
                w, h, name, pf = await rfb_handshake(a, shared=False)
                print("RFB handshake through the channel: %.1f ms" % ((time.monotonic() - t0) * 1000))
                assert name == "QEMU (bs)" and w > 0 and h > 0
                assert a.info == {"vnc": "shared"}
                b = await open_channel(provider, "bs", "vnc", identity="bob")
                assert await rfb_handshake(b, shared=False) == (w, h, name, pf)
                # both still served (exclusive requests were made shared); the guest
                # paints its text screen blue (VGA blue: 0x0000aa)
                for s in (a, b):
                    colours = await asyncio.wait_for(screenshot(s, w, h, pf), 10)
                    blue = max(colours, key=colours.get)
                    assert blue[2] > 100 and blue[0] < 50 and blue[1] < 50, colours
                vnc = (await provider.describe())[0]["vnc"]
                assert vnc["available"] and vnc["viewers"] == 2
                assert vnc["clients"] == ["alice", "bob"]
                # client half-close: QEMU ends that VNC connection, the stream closes
                await a.close()
                assert await asyncio.wait_for(_drain(a), 10) == b""
                await asyncio.wait_for(a.task, 10)
                await asyncio.wait_for(screenshot(b, w, h, pf), 10)
                await end(b)
                assert (await provider.describe())[0]["vnc"]["viewers"] == 0

        asyncio.run(main())
    finally:
        vm.terminate()


async def _drain(s):
    while True:
        chunk = await s.read()
        if not chunk:
            return b""


@pytest.mark.qemu
@pytest.mark.slow
def test_no_vnc_refused(tmp_path):
    """Without -vnc QEMU would swallow the fd silently: refused before, saying what to do."""
    vm = boot_sector_vm(tmp_path, vnc=False, name="web1").start()
    try:
        async def main():
            async with agent(vm) as (provider, registry):
                with pytest.raises(ChannelRefused) as e:
                    await open_channel(provider, "web1", "vnc")
                assert e.value.code == RefuseCode.UNAVAILABLE
                assert e.value.message.startswith(
                    "VM web1 has no VNC display: start QEMU with -vnc none")
                assert (await provider.describe())[0]["vnc"]["available"] is False
                # and no fd was left behind in QEMU: nothing named is pending
                with pytest.raises(ChannelRefused) as e:
                    await open_channel(provider, "web1", "vnc", "ro")
                assert e.value.code == RefuseCode.BAD_REQUEST

        asyncio.run(main())
    finally:
        vm.terminate()


@pytest.mark.qemu
@pytest.mark.slow
def test_vnc_with_listener(tmp_path):
    """-vnc with a listening socket of its own works the same way."""
    vm = boot_sector_vm(tmp_path, vnc=False, name="lis",
                        extra=["-vga", "std", "-vnc", "unix:%s" % (tmp_path / "vnc.sock")]).start()
    try:
        async def main():
            async with agent(vm) as (provider, registry):
                s = await open_channel(provider, "lis", "vnc")
                w, h, name, pf = await rfb_handshake(s, shared=True)
                assert name == "QEMU (lis)"
                await end(s)

        asyncio.run(main())
    finally:
        vm.terminate()


@pytest.mark.qemu
@pytest.mark.slow
def test_vnc_qemu_killed(tmp_path):
    vm = boot_sector_vm(tmp_path, vnc=True, name="web1").start()
    try:
        async def main():
            async with agent(vm) as (provider, registry):
                s = await open_channel(provider, "web1", "vnc")
                await rfb_handshake(s)
                vm.kill()
                with pytest.raises(StreamResetError) as e:
                    await asyncio.wait_for(_drain(s), 10)
                assert e.value.code == ResetCode.CHANNEL_GONE
                assert e.value.message == "VM web1 went away (QEMU exited)"
                await asyncio.wait_for(s.task, 10)

        asyncio.run(main())
    finally:
        vm.terminate()
