"""VMMonitor: QMP errors, run state, events that never pile up, fd passing under load,
and a QMP socket that accepts but never answers (a scripted peer: real QEMU serves a
second client by not greeting it, which is what this stands for)."""

import asyncio
import os
import socket
import tempfile
import time

import pytest

from support.memstream import open_channel, read_exactly
from support.vmtools import boot_sector_vm, qemu_available
from vproxy.agent.qemu.errors import QMPCommandError, VMGone
from vproxy.agent.qemu.monitor import MonitorOwner, VMMonitor
from vproxy.agent.qemu.provider import QemuProvider
from vproxy.agent.qemu.vms import VMRegistry

pytestmark = pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 not installed")


class Recorder(MonitorOwner):
    def __init__(self):
        self.events = []
        self.log = []

    async def on_connected(self, monitor):
        self.log.append("connected")

    def on_event(self, event):
        self.events.append(event["event"])

    def on_lost(self, reason):
        self.log.append(reason)


@pytest.mark.qemu
@pytest.mark.slow
def test_commands_state_events(tmp_path):
    vm = boot_sector_vm(tmp_path, vnc=False, name="m1", paused=True).start()
    try:
        async def main():
            mon = VMMonitor("m1", str(vm.qmp_path))
            rec = Recorder()
            mon.add_owner(rec)
            mon.start()
            try:
                assert await mon.wait_ready(10)
                assert mon.state == "prelaunch" and rec.log == ["connected"]
                with pytest.raises(QMPCommandError) as e:
                    await mon.execute("no-such-command")
                assert e.value.command_not_found
                assert str(e.value).startswith("VM m1: QEMU refused no-such-command: ")
                await mon.execute("cont")
                for _ in range(100):
                    await mon.execute("stop")
                    await mon.execute("cont")
                await asyncio.sleep(0.2)
                assert rec.events.count("STOP") == 100 and rec.events.count("RESUME") == 101
                assert mon.state == "running"
                # nothing kept inside qemu.qmp: its default listener takes no event
                client = mon._client
                assert client.events.empty() and client.events.history == ()
                await mon.execute("stop")
                await asyncio.sleep(0.2)
                assert mon.state == "paused"
                vm.kill()
                deadline = time.monotonic() + 10
                while len(rec.log) < 2:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                assert rec.log[1] == "VM m1 went away (QEMU exited)"
                assert mon.state == "absent"
                with pytest.raises(VMGone) as e:
                    await mon.execute("query-status")
                assert str(e.value).startswith("VM m1 is not running (no QEMU answers on %s)" % vm.qmp_path)
            finally:
                await mon.stop()

        asyncio.run(main())
    finally:
        vm.terminate()


@pytest.mark.qemu
@pytest.mark.slow
def test_shutdown_reason(tmp_path):
    vm = boot_sector_vm(tmp_path, vnc=False, name="m2").start()
    try:
        async def main():
            mon = VMMonitor("m2", str(vm.qmp_path))
            rec = Recorder()
            mon.add_owner(rec)
            mon.start()
            try:
                assert await mon.wait_ready(10)
                await mon.execute("quit")
                deadline = time.monotonic() + 10
                while len(rec.log) < 2:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                assert rec.log[1] == "VM m2 went away (QEMU shut down: host-qmp-quit)"
            finally:
                await mon.stop()

        asyncio.run(main())
    finally:
        vm.terminate()


def test_busy_socket_reported():
    """A socket that accepts but never sends the QMP greeting (what a QEMU whose QMP is
    held by another client does) is reported, and retried, not waited on forever."""
    d = tempfile.mkdtemp(prefix="vpm")
    path = os.path.join(d, "busy.qmp")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(16)
    try:
        async def main():
            mon = VMMonitor("busy", path, connect_timeout=0.3)
            mon.start()
            try:
                assert not await mon.wait_ready(1.0)
                assert mon.state == "absent"
                assert "accepts but does not answer" in mon.last_error
                assert "one at a time" in mon.not_running_message()
            finally:
                await mon.stop()

        asyncio.run(main())
    finally:
        srv.close()
        os.unlink(path)
        os.rmdir(d)


@pytest.mark.qemu
@pytest.mark.slow
def test_concurrent_fd_passing(tmp_path):
    """16 VNC connections opened at once: fds go to QEMU one at a time (fd_lock), so
    none is lost and every one speaks RFB."""
    vm = boot_sector_vm(tmp_path, vnc=True, name="m3").start()
    try:
        async def main():
            registry = VMRegistry([("m3", str(vm.qmp_path))])
            await registry.start()
            try:
                assert await registry.get("m3").monitor.wait_ready(10)
                provider = QemuProvider(registry)
                t0 = time.monotonic()
                streams = await asyncio.gather(*(open_channel(provider, "m3", "vnc") for _ in range(16)))
                hellos = await asyncio.gather(*(read_exactly(s, 12) for s in streams))
                print("16 concurrent VNC opens: %.0f ms" % ((time.monotonic() - t0) * 1000))
                assert hellos == [b"RFB 003.008\n"] * 16
                assert (await provider.describe())[0]["vnc"]["viewers"] == 16
                for s in streams:
                    s.reset(0, "done")
                await asyncio.wait_for(asyncio.gather(*(s.task for s in streams)), 10)
            finally:
                await registry.stop()

        asyncio.run(main())
    finally:
        vm.terminate()


@pytest.mark.qemu
@pytest.mark.slow
def test_reconfigure(tmp_path):
    """Configured VMs can change at run time (reload): a removed VM's streams are reset
    with the reason, an added one is served."""
    from vproxy.errors import ChannelRefused, StreamResetError
    from vproxy.mux import RefuseCode, ResetCode

    vm = boot_sector_vm(tmp_path, vnc=True, name="r1").start()
    try:
        async def main():
            registry = VMRegistry([("r1", str(vm.qmp_path))])
            await registry.start()
            try:
                provider = QemuProvider(registry)
                assert await registry.get("r1").monitor.wait_ready(10)
                s = await open_channel(provider, "r1", "vnc")
                assert await read_exactly(s, 12) == b"RFB 003.008\n"
                assert await registry.reconfigure([]) == ([], ["r1"])
                with pytest.raises(StreamResetError) as e:
                    while await asyncio.wait_for(s.read(), 10):
                        pass
                assert e.value.code == ResetCode.CHANNEL_GONE
                assert e.value.message == "VM r1 was removed from the agent's configuration"
                with pytest.raises(ChannelRefused) as e:
                    await open_channel(provider, "r1", "vnc")
                assert e.value.code == RefuseCode.NO_SUCH_VM
                assert await registry.reconfigure([("r2", str(vm.qmp_path))]) == (["r2"], [])
                assert await registry.get("r2").monitor.wait_ready(10)
                s = await open_channel(provider, "r2", "vnc")
                assert await read_exactly(s, 12) == b"RFB 003.008\n"
                s.reset(0, "done")
                await asyncio.wait_for(s.task, 10)
            finally:
                await registry.stop()

        asyncio.run(main())
    finally:
        vm.terminate()
