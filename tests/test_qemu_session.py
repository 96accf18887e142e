"""The QEMU channels through real vproxy Sessions (over a socketpair), not MemStreams:
ACCEPT info, NOTICEs, resets with their message and data cross the real protocol."""

import asyncio
import contextlib
import socket

import pytest

from support.agenttools import read_until
from support.vmtools import BOOT_SECTOR_BANNER, boot_sector_vm, expected_echo, qemu_available
from vproxy.errors import ChannelRefused, StreamResetError
from vproxy.mux import OpenRequest, RefuseCode, ResetCode
from vproxy.agent.qemu.provider import QemuProvider
from vproxy.agent.qemu.vms import VMRegistry
from vproxy.net.session import Session

pytestmark = [pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 not installed"),
              pytest.mark.qemu, pytest.mark.slow]


@contextlib.asynccontextmanager
async def agent_session(*vms):
    """A registry + provider behind a Session; yields the client Session. The open
    handler does what the agent does: open (or refuse), accept with info, run."""
    registry = VMRegistry([(v.name, str(v.qmp_path)) for v in vms])
    await registry.start()
    provider = QemuProvider(registry)
    for v in vms:
        assert await registry.get(v.name).monitor.wait_ready(10)
        if v.paused:
            await registry.get(v.name).monitor.execute("cont")

    async def on_open(stream):
        try:
            channel = await provider.open(stream.request, "alice")
        except ChannelRefused as e:
            stream.refuse(e.code, e.message)
            return
        stream.accept(channel.info)
        await channel.run(stream)

    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    _, server = await loop.create_connection(lambda: Session(False, None, on_open), sock=b)
    _, client = await loop.create_connection(lambda: Session(True, None), sock=a)
    try:
        yield client, registry
    finally:
        client.close()
        server.close()
        await registry.stop()


def test_console_and_vnc_over_a_session(tmp_path):
    vm = boot_sector_vm(tmp_path, vnc=True, name="web1", paused=True).start()
    try:
        async def main():
            async with agent_session(vm) as (client, registry):
                with pytest.raises(ChannelRefused) as e:
                    await client.open(OpenRequest("nope", "console"))
                assert e.value.code == RefuseCode.NO_SUCH_VM

                con = await client.open(OpenRequest("web1", "console", "rw", {"replay": "all"}))
                assert con.info["writer"] == "alice" and con.info["start"] == "0"
                assert (await read_until(con, BANNER)).startswith(BANNER)
                await con.write(b"over the wire\r")
                assert (await read_until(con, b"WIRE\r\n")).endswith(expected_echo(b"over the wire\r"))

                spy = await client.open(OpenRequest("web1", "console", "force"))
                n = await asyncio.wait_for(con.next_notice(), 10)
                assert n == {"event": "writer-changed", "writer": "alice", "mode": "ro"}
                await con.write(b"x")
                assert (await asyncio.wait_for(con.next_notice(), 10))["event"] == "read-only"

                vnc = await client.open(OpenRequest("web1", "vnc"))
                assert await vnc.readexactly(12) == b"RFB 003.008\n"

                vm.kill()
                for s in (con, spy, vnc):
                    with pytest.raises(StreamResetError) as e:
                        while await asyncio.wait_for(s.read(), 10):
                            pass
                    assert e.value.code == ResetCode.CHANNEL_GONE
                    assert e.value.message == "VM web1 went away (QEMU exited)"

        asyncio.run(main())
    finally:
        vm.terminate()


BANNER = BOOT_SECTOR_BANNER
