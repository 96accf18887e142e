"""Guest channels on socket server chardevs someone else made, adopted without
chardev-change: a virtio-serial port on a listening unix socket (the guest agent's shape
in libvirt and Proxmox, ``-chardev socket,id=qga0,path=PATH,server=on,wait=off -device
virtserialport,chardev=qga0,name=...``) and one on a TCP server, against a real QEMU
running the Linux guest (tests/support/guests/linux_guest.py), which echoes on ports
named org.vproxy.echo*.

Like tests/test_qemu_channel.py, a VMRegistry and a QemuProvider (the agent's QEMU side)
serve in-memory streams.
"""

import asyncio
import contextlib
import os
import socket
import time

import pytest

from support.memstream import open_channel, read_exactly
from support.vmtools import qemu_available, short_socket_path
from test_qemu_adopt import free_port, wait_held
from test_qemu_channel import boot_linux, end, kill_and_check_reset, linux
from vproxy.agent.qemu.provider import QemuProvider
from vproxy.agent.qemu.vms import VMRegistry
from vproxy.cli.ls import format_listing
from vproxy.errors import ChannelRefused
from vproxy.mux import RefuseCode

pytestmark = [pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 not installed"),
              pytest.mark.qemu, pytest.mark.slow, linux]

PORT = "org.vproxy.echo.qga"  # the guest echoes on org.vproxy.echo* only
TCP_PORT = "org.vproxy.echo.tcp"


class Booted:
    """The module's Linux guest: a port on a unix socket server (with an id, as libvirt
    gives it, so that VSERPORT_CHANGE is sent) and one on a TCP server."""

    def __init__(self, workdir):
        self.path = short_socket_path(workdir, "web1.qga")
        self.tcp = free_port()
        self.vm = boot_linux(workdir, name="web1", echo_ports=(), extra=[
            "-chardev", "socket,id=qga0,path=%s,server=on,wait=off" % self.path,
            "-device", "virtserialport,chardev=qga0,name=%s,id=qgaport" % PORT,
            "-chardev", "socket,id=tcp0,host=127.0.0.1,port=%d,server=on,wait=off" % self.tcp,
            "-device", "virtserialport,chardev=tcp0,name=%s" % TCP_PORT])


@pytest.fixture(scope="module")
def _booted(tmp_path_factory):
    booted = []
    yield booted, tmp_path_factory
    for b in booted:
        b.vm.terminate()


@pytest.fixture
def web1(_booted):
    """The booted guest (booted again if a test killed it)."""
    booted, factory = _booted
    if not booted or not booted[-1].vm.running():
        booted.append(Booted(factory.mktemp("adoptchannel")))
    return booted[-1]


@contextlib.asynccontextmanager
async def agent(vm, **registry_options):
    registry = VMRegistry([(vm.name, str(vm.qmp_path))], **registry_options)
    await registry.start()
    try:
        assert await registry.get(vm.name).monitor.wait_ready(10)
        yield QemuProvider(registry), registry
    finally:
        await registry.stop()


async def echo(s, data, timeout=60):
    await s.write(data)
    assert await read_exactly(s, len(data), timeout=timeout) == data


async def channels(provider):
    return {c["name"]: c for c in (await provider.describe())[0]["channels"]}


def test_unix_socket_port_adopted(web1):
    """The port on a unix socket server is adopted (connected to as its client), bytes
    echo both ways, vproxy ls says "adopted socket PATH"; released, the next client
    adopts it again. The TCP server port likewise."""

    async def main():
        async with agent(web1.vm) as (provider, registry):
            for who in ("alice", "bob"):
                s = await open_channel(provider, "web1", "channel:" + PORT, "rw", identity=who)
                assert s.info["channel"] == PORT and s.info["hotplugged"] == "no"
                desc = (await channels(provider))[PORT]
                assert (desc["holder"], desc["held"], desc["held_where"]) == (who, "adopted socket", str(web1.path))
                listing = format_listing({"host": "h", "error": "", "vms": await provider.describe()})
                assert "channel:%s" % PORT in listing
                assert "; %s (adopted socket %s)" % (who, web1.path) in listing, listing
                with pytest.raises(ChannelRefused) as e:
                    await open_channel(provider, "web1", "channel:" + PORT, "rw", identity="eve")
                assert e.value.code == RefuseCode.BUSY
                await echo(s, b"hello from %s\n" % who.encode())
                await echo(s, os.urandom(200000))
                await end(s)
                assert (await channels(provider))[PORT]["held"] == ""
            t = await open_channel(provider, "web1", "channel:" + TCP_PORT, "rw", identity="carol")
            assert (await channels(provider))[TCP_PORT]["held_where"] == "127.0.0.1:%d" % web1.tcp
            await echo(t, b"over tcp\n")
            await end(t)

    asyncio.run(main())


def test_unix_socket_in_use_by_another_client(web1):
    """Another client already holds the socket: refused "in use", naming the socket;
    once it has left, the next open adopts the port."""
    other = socket.socket(socket.AF_UNIX)
    try:
        other.connect(str(web1.path))

        async def main():
            await wait_held(web1.vm, "qga0")
            async with agent(web1.vm) as (provider, registry):
                with pytest.raises(ChannelRefused) as e:
                    await open_channel(provider, "web1", "channel:" + PORT, "rw")
                assert e.value.code == RefuseCode.UNAVAILABLE
                assert e.value.message == ("guest channel %s of VM web1 is in use by another client of %s"
                                           % (PORT, web1.path))
                desc = (await channels(provider))[PORT]
                assert (desc["holder"], desc["held"]) == ("", "")
                other.close()
                deadline = time.monotonic() + 10
                while True:  # QEMU notices the other client left, then the open adopts
                    try:
                        s = await open_channel(provider, "web1", "channel:" + PORT, "rw")
                        break
                    except ChannelRefused as e:
                        assert "in use by another client" in e.message
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.1)
                await echo(s, b"mine now\n")
                await end(s)

        asyncio.run(main())
    finally:
        other.close()


def test_adopt_setting_without_socket_keeps_refusal(web1):
    """adopt = [] (or only "pty"): the port is refused, naming the socket and the setting."""

    async def main():
        for adopt in ((), ("pty",)):
            async with agent(web1.vm, adopt=adopt) as (provider, registry):
                with pytest.raises(ChannelRefused) as e:
                    await open_channel(provider, "web1", "channel:" + PORT, "rw")
                assert e.value.code == RefuseCode.UNAVAILABLE
                assert e.value.message == (
                    "guest channel %s of VM web1 is the socket server %s, which this agent does not "
                    "adopt (its adopt setting leaves out 'socket'): add it, or give the port a null "
                    "chardev (-chardev null,id=qga0)" % (PORT, web1.path))

    asyncio.run(main())


def test_qemu_killed_and_restarted(web1):
    """QEMU killed: the holder's stream is reset (CHANNEL_GONE); QEMU started again (the
    same command line): the port is adopted again, the guest's opening it arrives as a
    guest-open NOTICE, and bytes echo."""
    vm = web1.vm

    async def main():
        async with agent(vm) as (provider, registry):
            s = await open_channel(provider, "web1", "channel:" + PORT, "rw")
            await echo(s, b"before\n")
            await kill_and_check_reset(vm, s)

            vm.wait()
            vm.proc = None
            vm.start()
            assert await registry.get("web1").monitor.wait_ready(10)
            s = await open_channel(provider, "web1", "channel:" + PORT, "rw")
            assert (await channels(provider))[PORT]["held"] == "adopted socket"
            if s.info["guest"] != "open":  # the guest is still booting
                assert await asyncio.wait_for(s.next_notice(), 180) == {"event": "guest-open"}
            await echo(s, b"after\n", timeout=120)
            await end(s)

    try:
        asyncio.run(main())
    finally:
        vm.terminate()
