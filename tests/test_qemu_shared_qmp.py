"""QMP mode "shared": the agent on a QMP socket that something else also uses.

A Proxmox-shaped directory (DIR/100.qmp, QEMU started with ``-qmp
unix:DIR/100.qmp,server=on,wait=off``) served with qmp "shared", and a second QMP client
(qemu.qmp's QMPClient, as Proxmox's qm would be) that connects, asks query-status and
disconnects every 100 ms while a console streams both ways. QEMU serves one QMP client at
a time, so each of its commands measures how long the agent kept the socket.

Exclusive mode (the default) is covered, unchanged, by tests/test_qemu_monitor.py
(test_commands_state_events: events, state, VM gone) and tests/test_qemu_console.py
(test_qemu_killed_and_restarted: reattach after a restart).
"""

import asyncio
import logging
import time

import pytest
from qemu.qmp import QMPClient

from support.memstream import open_channel, read_until
from support.vmtools import BOOT_SECTOR_BANNER, boot_sector_vm, qemu_available
from vproxy.agent.qemu.monitor import SHARED_POLL_INTERVAL, SharedVMMonitor
from vproxy.agent.qemu.provider import QemuProvider
from vproxy.agent.qemu.vms import VMRegistry
from vproxy.cli.ls import format_listing
from vproxy.errors import StreamResetError
from vproxy.mux import ResetCode

pytestmark = [pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 not installed"),
              pytest.mark.qemu, pytest.mark.slow]

BANNER = BOOT_SECTOR_BANNER


async def qm(path, cmd="query-status", args=None):
    """What `qm` does for one command: connect, execute, disconnect. Returns (seconds, reply)."""
    t0 = time.monotonic()
    client = QMPClient("qm")
    await asyncio.wait_for(client.connect(path), 30)
    try:
        reply = await client.execute(cmd, args)
    finally:
        await client.disconnect()
    return time.monotonic() - t0, reply


async def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        await asyncio.sleep(0.05)


async def end(stream):
    stream.reset(ResetCode.CANCEL, "test done")
    await asyncio.wait_for(stream.task, 10)


def test_shared_qmp_socket_with_a_second_client(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vproxy.qemu.monitor")
    qdir = tmp_path / "qemu-server"
    qdir.mkdir()
    vm = boot_sector_vm(tmp_path, vnc=False, name="web1", paused=True)
    vm.qmp_path = qdir / "100.qmp"  # Proxmox: /var/run/qemu-server/VMID.qmp
    vm.start()
    path = str(vm.qmp_path)
    try:
        async def main():
            registry = VMRegistry([], str(qdir), scan_interval=0.1, qmp_mode="shared")
            await registry.start()
            try:
                provider = QemuProvider(registry)
                monitor = registry.get("100").monitor
                assert isinstance(monitor, SharedVMMonitor)
                assert await monitor.wait_ready(10)
                assert monitor.state == "prelaunch"
                # The manager, not the agent, starts the guest: its command gets through.
                seconds, _ = await qm(path, "cont")
                assert seconds < 1.0
                s = await open_channel(provider, "100", "console", "rw", {"replay": "all"})
                assert await read_until(s, BANNER) == BANNER

                # qm asks query-status every 100 ms while the console streams both ways.
                times = []
                streaming = True

                async def manager():
                    while streaming:
                        seconds, reply = await qm(path)
                        assert reply["status"] == "running"
                        times.append(seconds)
                        await asyncio.sleep(0.1)

                task = asyncio.ensure_future(manager())
                lines = 0
                t0 = time.monotonic()
                while time.monotonic() - t0 < 6.0:
                    await s.write(b"line %d\r" % lines)
                    assert await asyncio.wait_for(read_until(s, b"\r\n"), 10) == b"LINE %d\r\n" % lines
                    lines += 1
                streaming = False
                await asyncio.wait_for(task, 10)
                print("qm: %d commands, max %.3f s; console: %d lines echoed"
                      % (len(times), max(times), lines))
                assert len(times) >= 20
                assert max(times) < 1.0, times
                assert lines >= 20

                # A pause made by the manager is noticed by polling: what `vproxy ls` shows.
                await qm(path, "stop")
                await wait_for(lambda: monitor.state == "paused", SHARED_POLL_INTERVAL + 3, "paused")
                desc = (await registry.describe())[0]
                # -name web1 names it, its socket's VMID stays an alias (as on a Proxmox host)
                assert (desc["vm"], desc["aliases"], desc["state"], desc["qmp_mode"]) == (
                    "web1", ["100"], "paused", "shared")
                shown = format_listing({"host": "pve1", "error": "", "vms": [desc]})
                assert shown.splitlines()[0] == "pve1/web1 (alias 100)  paused  (shared QMP, polled)"
                await qm(path, "cont")
                await wait_for(lambda: monitor.state == "running", SHARED_POLL_INTERVAL + 3, "running")

                # Another client holding the socket: the agent waits, says so, and goes on.
                holder = QMPClient("holder")
                await holder.connect(path)
                await asyncio.sleep(SHARED_POLL_INTERVAL + 1.5)
                await holder.disconnect()
                busy = ("QMP socket %s of VM web1 is busy (another client holds it): retrying" % path)
                assert busy in [r.getMessage() for r in caplog.records]
                await s.write(b"after\r")
                assert await asyncio.wait_for(read_until(s, b"\r\n"), 10) == b"AFTER\r\n"

                # QEMU killed: the stream ends saying so; restarted: the console comes back.
                vm.kill()
                with pytest.raises(StreamResetError) as e:
                    await asyncio.wait_for(s.read(), 10)
                assert e.value.code == ResetCode.CHANNEL_GONE
                assert e.value.message == "VM web1 went away (QEMU exited)"
                await asyncio.wait_for(s.task, 5)
                await wait_for(lambda: monitor.state == "absent", 10, "absent")
                vm.wait()
                vm.proc = None
                vm.start()
                assert await monitor.wait_ready(10)
                await qm(path, "cont")
                # the ring goes on across the restart: the old boot, then the new banner
                again = await open_channel(provider, "100", "console", "rw", {"replay": "all"})
                await asyncio.wait_for(read_until(again, b"AFTER\r\n"), 10)
                await asyncio.wait_for(read_until(again, BANNER), 10)
                await again.write(b"back\r")
                assert await asyncio.wait_for(read_until(again, b"\r\n"), 10) == b"BACK\r\n"
                await end(again)
            finally:
                await registry.stop()

        asyncio.run(main())
    finally:
        vm.terminate()


def test_shared_qmp_guest_channel_hotplug(tmp_path):
    """Shared mode on the Linux guest: a hotplugged port (chardev-add with an fd and
    device_add, each on a connection of its own), the guest opening it learnt by polling
    (guest-open NOTICE), an echo, and the unplug when the stream ends (DEVICE_DELETED
    learnt by polling: the port is gone within seconds)."""
    pytest.importorskip("support.guests.linux_guest")
    from test_qemu_channel import boot_linux

    vm = boot_linux(tmp_path)
    try:
        async def main():
            registry = VMRegistry([(vm.name, str(vm.qmp_path))], qmp_mode="shared")
            await registry.start()
            try:
                provider = QemuProvider(registry)
                assert await registry.get(vm.name).monitor.wait_ready(10)
                s = await open_channel(provider, vm.name, "channel:org.vproxy.echo.shared", "hotplug")
                assert await asyncio.wait_for(s.next_notice(), 30) == {"event": "guest-open"}
                await s.write(b"polled\n")
                assert await asyncio.wait_for(read_until(s, b"polled\n"), 30) == b"polled\n"
                await end(s)
                channels = registry.get(vm.name).channels
                monitor = registry.get(vm.name).monitor

                async def names():
                    return [p["name"] for p in await channels.list_ports(monitor)]

                deadline = time.monotonic() + 10
                while "org.vproxy.echo.shared" in await names():
                    assert time.monotonic() < deadline, "hotplugged port not removed"
                    await asyncio.sleep(0.2)
                assert not any(c["label"].startswith("vproxy-c-")
                               for c in await monitor.execute("query-chardev"))
            finally:
                await registry.stop()

        asyncio.run(main())
    finally:
        vm.terminate()


def test_one_vm_shared_another_exclusive_in_one_agent(tmp_path):
    """[[vm]] qmp_mode per VM: pve100 shared (a qm-like client gets through in well
    under a second while the agent serves it), lab1 exclusive under the global default
    (the agent holds its socket: another client's greeting does not come), and both
    consoles echo."""
    pve = boot_sector_vm(tmp_path / "pve", vnc=False, name="pve100", paused=True)
    lab = boot_sector_vm(tmp_path / "lab", vnc=False, name="lab1", paused=True)
    pve.start()
    lab.start()
    try:
        async def main():
            registry = VMRegistry([("pve100", str(pve.qmp_path)), ("lab1", str(lab.qmp_path))],
                                  qmp_mode="exclusive", resume_prelaunch=True,
                                  vm_options={"pve100": {"qmp_mode": "shared"}})
            await registry.start()
            try:
                provider = QemuProvider(registry)
                shared, exclusive = registry.get("pve100").monitor, registry.get("lab1").monitor
                assert isinstance(shared, SharedVMMonitor) and not isinstance(exclusive, SharedVMMonitor)
                assert await shared.wait_ready(10) and await exclusive.wait_ready(10)
                assert [(d["vm"], d["qmp_mode"]) for d in await registry.describe()] == [
                    ("lab1", "exclusive"), ("pve100", "shared")]
                a = await open_channel(provider, "pve100", "console", "rw", {"replay": "all"})
                b = await open_channel(provider, "lab1", "console", "rw", {"replay": "all"})
                for s in (a, b):  # resumed from -S once held: the banner, then type
                    assert await asyncio.wait_for(read_until(s, BANNER), 10) == BANNER
                    await s.write(b"both\r")
                    assert (await asyncio.wait_for(read_until(s, b"BOTH\r\n"), 10)).endswith(b"BOTH\r\n")
                times = [(await qm(str(pve.qmp_path)))[0] for _ in range(5)]
                assert max(times) < 1.0, times
                with pytest.raises(asyncio.TimeoutError):  # the agent holds lab1's socket
                    await asyncio.wait_for(qm(str(lab.qmp_path)), 1.5)
                await end(a)
                await end(b)
            finally:
                await registry.stop()

        asyncio.run(main())
    finally:
        pve.terminate()
        lab.terminate()
