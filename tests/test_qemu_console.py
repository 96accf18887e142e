"""Managed serial consoles against a real QEMU running the boot-sector echo guest.

Each test wires a VMRegistry and a QemuProvider (the agent's QEMU side) to in-memory
streams (tests/support/memstream.py), so what is proved is the console logic itself: takeover,
ring, offsets, writer arbitration, slow viewers, QEMU going away and coming back.
"""

import asyncio
import contextlib
import logging
import os
import time

import pytest

from support.memstream import open_channel, read_exactly, read_until
from support.vmtools import BOOT_SECTOR_BANNER, QemuVM, boot_sector_vm, expected_echo, qemu_available
from vproxy.errors import ChannelRefused, StreamResetError
from vproxy.mux import RefuseCode, ResetCode
from vproxy.agent.qemu.provider import QemuProvider
from vproxy.agent.qemu.vms import VMRegistry

pytestmark = [pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 not installed"),
              pytest.mark.qemu, pytest.mark.slow]

BANNER = BOOT_SECTOR_BANNER


@contextlib.asynccontextmanager
async def agent(vms, cont=True, **registry_options):
    """A registry serving *vms* (QemuVM objects or (name, path) pairs) and a provider.
    VMs started paused (-S, so that no output escapes the takeover) are resumed once
    the agent is attached, unless *cont* is false."""
    pairs = [(v.name, str(v.qmp_path)) if isinstance(v, QemuVM) else v for v in vms]
    registry = VMRegistry(pairs, **registry_options)
    await registry.start()
    try:
        for v in vms:
            if isinstance(v, QemuVM):
                assert await registry.get(v.name).monitor.wait_ready(10)
                if cont and v.paused:
                    await registry.get(v.name).monitor.execute("cont")
        yield QemuProvider(registry), registry
    finally:
        await registry.stop()


async def wait_offset(registry, vm, at_least, timeout=20.0, console="serial0"):
    deadline = time.monotonic() + timeout
    c = registry.get(vm).consoles.consoles[console]
    while c.offset < at_least:
        assert time.monotonic() < deadline, "console offset stuck at %d" % c.offset
        await asyncio.sleep(0.01)
    return c


async def notice(stream, timeout=10.0):
    return await asyncio.wait_for(stream.next_notice(), timeout)


async def end(stream):
    """Client side goes away: reset, then let the agent's run() finish."""
    stream.reset(ResetCode.CANCEL, "test done")
    await asyncio.wait_for(stream.task, 10)


@pytest.fixture
def vm(tmp_path):
    v = boot_sector_vm(tmp_path, vnc=False, name="bs", paused=True)
    yield v
    v.terminate()


def test_round_trip(vm):
    """Typed bytes reach the guest; its (uppercased) echo comes back on the stream."""
    vm.start()

    async def main():
        async with agent([vm]) as (provider, registry):
            await wait_offset(registry, "bs", len(BANNER))
            s = await open_channel(provider, "bs", "console", "rw", {"replay": "all"}, "alice")
            assert s.info["console"] == "serial0"
            assert s.info["writer"] == "alice" and s.info["mode"] == "rw"
            assert s.info["start"] == "0" and int(s.info["offset"]) >= len(BANNER)
            assert await read_until(s, BANNER) == BANNER
            await s.write(b"hello, world\r")
            assert await read_until(s, b"\r\n") == expected_echo(b"hello, world\r")
            # console:serial0 and console:<chardev id> name the same console
            s2 = await open_channel(provider, "bs", "console:serial0", "ro")
            assert s2.info["console"] == "serial0" and s2.info["mode"] == "ro"
            await end(s2)
            await end(s)
            vm_desc = (await provider.describe())[0]
            assert vm_desc["vm"] == "bs" and vm_desc["state"] == "running"
            assert vm_desc["consoles"][0]["viewers"] == []

    asyncio.run(main())


def test_boot_output_captured_before_attach(vm):
    """VM started paused (-S): the agent takes the console over before the guest runs,
    so the banner is in the ring although nobody was attached when it was printed."""
    vm.start()

    async def main():
        async with agent([vm], cont=False) as (provider, registry):
            mon = registry.get("bs").monitor
            assert mon.state == "prelaunch"
            assert registry.get("bs").consoles.describe()[0]["status"] == "attached"
            await mon.execute("cont")
            await wait_offset(registry, "bs", len(BANNER))
            await asyncio.sleep(0.2)
            live = await open_channel(provider, "bs", "console", "ro")
            assert live.info["start"] == live.info["offset"] == str(len(BANNER))
            s = await open_channel(provider, "bs", "console", "rw", {"replay": "1000"})
            assert s.info["start"] == "0"
            assert await read_exactly(s, len(BANNER)) == BANNER
            tail = await open_channel(provider, "bs", "console", "ro", {"replay": "7"})
            assert await read_exactly(tail, 7) == BANNER[-7:]
            for x in (live, s, tail):
                await end(x)

    asyncio.run(main())


def test_viewers_writer_and_force(vm):
    """Many viewers see the same output; one writer; ro input refused with a notice;
    force takes the writer role and tells the former writer; leaving gives it back."""
    vm.start()

    async def main():
        async with agent([vm]) as (provider, registry):
            await wait_offset(registry, "bs", len(BANNER))
            alice = await open_channel(provider, "bs", "console", "rw", identity="alice")
            bob = await open_channel(provider, "bs", "console", "ro", identity="bob")
            carol = await open_channel(provider, "bs", "console", "rw", identity="carol")
            assert alice.info["mode"] == "rw"
            assert bob.info["mode"] == "ro" and bob.info["writer"] == "alice"
            assert carol.info["mode"] == "ro" and carol.info["writer"] == "alice"
            viewers = [alice, bob, carol]

            await alice.write(b"one\r")
            for v in viewers:
                assert await read_until(v, b"\r\n") == b"ONE\r\n"

            await bob.write(b"ignored\r")
            assert await notice(bob) == {"event": "read-only", "writer": "alice"}

            dave = await open_channel(provider, "bs", "console", "force", identity="dave")
            assert dave.info["mode"] == "rw" and dave.info["writer"] == "dave"
            assert await notice(alice) == {"event": "writer-changed", "writer": "dave", "mode": "ro"}
            assert await notice(bob) == {"event": "writer-changed", "writer": "dave", "mode": "ro"}
            assert await notice(carol) == {"event": "writer-changed", "writer": "dave", "mode": "ro"}

            await alice.write(b"nope\r")
            assert (await notice(alice))["event"] == "read-only"
            await dave.write(b"two\r")
            for v in viewers + [dave]:
                assert await read_until(v, b"\r\n") == b"TWO\r\n"  # "nope" never reached the guest

            desc = registry.get("bs").consoles.describe()[0]
            assert desc["writer"] == "dave" and sorted(desc["viewers"]) == ["alice", "bob", "carol", "dave"]

            await end(dave)  # alice asked first for rw: she gets it back
            assert await notice(alice) == {"event": "writer-changed", "writer": "alice", "mode": "rw"}
            assert await notice(carol) == {"event": "writer-changed", "writer": "alice", "mode": "ro"}
            await alice.write(b"three\r")
            assert await read_until(carol, b"\r\n") == b"THREE\r\n"
            await end(alice)  # then carol, who also asked for rw
            assert await notice(carol) == {"event": "writer-changed", "writer": "carol", "mode": "rw"}
            for v in (bob, carol):
                await end(v)

    asyncio.run(main())


def test_resume_by_offset(vm):
    """A viewer that comes back with offset=N gets exactly the bytes it missed."""
    vm.start()

    async def main():
        async with agent([vm]) as (provider, registry):
            await wait_offset(registry, "bs", len(BANNER))
            a = await open_channel(provider, "bs", "console", "rw", {"replay": "all"})
            got = bytearray(await read_exactly(a, len(BANNER)))
            await a.write(b"first\r")
            got += await read_until(a, b"\r\n")
            offset = int(a.info["start"]) + len(got)
            await end(a)

            w = await open_channel(provider, "bs", "console", "rw")
            await w.write(b"while away\r")
            await read_until(w, b"\r\n")
            back = await open_channel(provider, "bs", "console", "ro", {"offset": str(offset)})
            assert back.info["start"] == str(offset)
            got += await read_until(back, b"WHILE AWAY\r\n")
            await w.write(b"live\r")
            got += await read_until(back, b"\r\n")
            assert bytes(got) == BANNER + b"FIRST\r\nWHILE AWAY\r\nLIVE\r\n"
            assert back.pending_notices() == []
            with pytest.raises(ChannelRefused) as e:
                await open_channel(provider, "bs", "console", "ro", {"offset": "999999"})
            assert e.value.code == RefuseCode.BAD_REQUEST and "beyond the end" in e.value.message
            with pytest.raises(ChannelRefused) as e:
                await open_channel(provider, "bs", "console", "ro", {"offset": "1", "replay": "2"})
            assert e.value.code == RefuseCode.BAD_REQUEST
            for s in (w, back):
                await end(s)

    asyncio.run(main())


def test_resume_lost_when_ring_too_small(vm):
    """With a 64-byte ring, resuming from an offset that fell out of it yields a "lost"
    notice saying how many bytes, then the oldest bytes still held."""
    vm.start()

    async def main():
        async with agent([vm], ring_size=64) as (provider, registry):
            await wait_offset(registry, "bs", len(BANNER))
            w = await open_channel(provider, "bs", "console", "rw")
            line = b"0123456789abcdefghij\r"
            for _ in range(5):
                await w.write(line)
                await read_until(w, b"\r\n")
            c = registry.get("bs").consoles.consoles["serial0"]
            end_offset = c.offset
            assert end_offset == len(BANNER) + 5 * len(expected_echo(line))
            r = await open_channel(provider, "bs", "console", "ro", {"offset": "0"})
            assert await notice(r) == {"event": "lost", "bytes": str(end_offset - 64),
                                       "offset": str(end_offset - 64)}
            data = await read_exactly(r, 64)
            assert data == (BANNER + 5 * expected_echo(line))[-64:]
            assert r.info["start"] == str(end_offset - 64)
            await end(r)
            await end(w)

    asyncio.run(main())


def test_slow_viewer_does_not_stall(vm):
    """A viewer that never reads (tiny window) blocks neither the guest nor another
    viewer; when it finally reads it is told what it lost and continues live."""
    vm.start()

    async def main():
        async with agent([vm], ring_size=4096) as (provider, registry):
            await wait_offset(registry, "bs", len(BANNER))
            slow = await open_channel(provider, "bs", "console", "ro", window=1024, identity="slow")
            fast = await open_channel(provider, "bs", "console", "rw", identity="fast")
            payload = b"".join(b"line %05d of the slow viewer test\r" % i for i in range(300))
            expected = expected_echo(payload)
            t0 = time.monotonic()
            sender = asyncio.ensure_future(fast.write(payload))
            got = await read_exactly(fast, len(expected), timeout=60)
            await sender
            elapsed = time.monotonic() - t0
            assert got == expected
            # slow: its window filled, then the ring wrapped past it
            start = int(slow.info["start"])
            assert start == len(BANNER)
            await fast.write(b"after\r")
            data = await read_until(slow, b"AFTER\r\n")
            assert await notice(slow) == {"event": "writer-changed", "writer": "fast", "mode": "ro"}
            n = await notice(slow)
            assert n["event"] == "lost" and int(n["bytes"]) > 0
            gap_at, resumed_at = int(n["offset"]) - int(n["bytes"]), int(n["offset"])
            before = gap_at - start  # bytes delivered before the gap: about one window
            assert 1024 <= before < 1024 + 65536
            everything = BANNER + expected + b"AFTER\r\n"
            assert data == everything[start:gap_at] + everything[resumed_at:]
            print("echoed %d bytes in %.2f s with a stuck viewer attached; it lost %s"
                  % (len(expected), elapsed, n["bytes"]))
            await end(slow)
            await end(fast)

    asyncio.run(main())


def test_log_file(vm, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    vm.start()

    async def main():
        async with agent([vm], log_dir=str(logs)) as (provider, registry):
            await wait_offset(registry, "bs", len(BANNER))
            s = await open_channel(provider, "bs", "console", "rw")
            await s.write(b"logged\r")
            await read_until(s, b"LOGGED\r\n")
            await end(s)
            assert registry.get("bs").consoles.describe()[0]["log"] == str(logs / "bs.serial0.log")

    asyncio.run(main())
    assert (logs / "bs.serial0.log").read_bytes() == BANNER + b"LOGGED\r\n"


def test_mux_console_refused(tmp_path):
    """-serial mon:stdio (what -nographic sets up) is a mux chardev: refused, saying how
    to start QEMU instead."""
    from vproxy.guests.bootsector import build_boot_disk

    disk = build_boot_disk(tmp_path / "mux.img")
    v = QemuVM(["-machine", "pc", "-m", "32", "-drive", "file=%s,format=raw,if=ide" % disk,
                "-serial", "mon:stdio"], workdir=tmp_path, name="muxvm").start()
    try:
        async def main():
            async with agent([v]) as (provider, registry):
                with pytest.raises(ChannelRefused) as e:
                    await open_channel(provider, "muxvm", "console", "rw")
                assert e.value.code == RefuseCode.UNAVAILABLE
                msg = e.value.message
                assert "console serial0 of VM muxvm is a mux chardev" in msg
                assert "-serial null" in msg and "cannot be taken over" in msg
                desc = (await provider.describe())[0]["consoles"][0]
                assert desc["status"] == "unavailable"

        asyncio.run(main())
    finally:
        v.terminate()


def test_foreign_backend_not_taken(tmp_path):
    """A console on a file (or pty, or a user's socket) is not ours to take."""
    from vproxy.guests.bootsector import build_boot_disk

    disk = build_boot_disk(tmp_path / "f.img")
    out = tmp_path / "serial.out"
    v = QemuVM(["-machine", "pc", "-m", "32", "-drive", "file=%s,format=raw,if=ide" % disk,
                "-chardev", "file,id=con0,path=%s" % out, "-serial", "chardev:con0"],
               workdir=tmp_path, name="filevm").start()
    try:
        async def main():
            async with agent([v]) as (provider, registry):
                with pytest.raises(ChannelRefused) as e:
                    await open_channel(provider, "filevm", "console:con0", "ro")
                assert e.value.code == RefuseCode.UNAVAILABLE
                assert e.value.message == (
                    "console con0 of VM filevm is connected to 'file', which vproxy does not "
                    "take over: start QEMU with -serial null, or -chardev null,id=con0 "
                    "-serial chardev:con0")
                chardevs = await registry.get("filevm").monitor.execute("query-chardev")
                assert {"label": "con0", "filename": "file", "frontend-open": True} in chardevs

        asyncio.run(main())
    finally:
        v.terminate()


def test_unknown_vm_and_console(vm):
    vm.start()

    async def main():
        async with agent([vm, ("ghost", "/nonexistent/ghost.qmp")]) as (provider, registry):
            with pytest.raises(ChannelRefused) as e:
                await open_channel(provider, "nope", "console")
            assert e.value.code == RefuseCode.NO_SUCH_VM
            assert e.value.message == "no VM named 'nope' on this host (known: bs, ghost)"
            with pytest.raises(ChannelRefused) as e:
                await open_channel(provider, "bs", "console:com9")
            assert e.value.code == RefuseCode.NO_SUCH_CHANNEL and "serial0" in e.value.message
            with pytest.raises(ChannelRefused) as e:
                await open_channel(provider, "ghost", "console")
            assert e.value.code == RefuseCode.UNAVAILABLE
            assert "VM ghost is not running" in e.value.message
            with pytest.raises(ChannelRefused) as e:
                await open_channel(provider, "bs", "floppy")
            assert e.value.code == RefuseCode.NO_SUCH_CHANNEL
            with pytest.raises(ChannelRefused) as e:
                await open_channel(provider, "bs", "console", "hotplug")
            assert e.value.code == RefuseCode.BAD_REQUEST
            states = {d["vm"]: d["state"] for d in await provider.describe()}
            assert states == {"bs": "running", "ghost": "absent"}

    asyncio.run(main())


def test_qemu_killed_and_restarted(tmp_path):
    """SIGKILL mid-stream: the stream is reset with a clear message, another VM is
    still served, and when QEMU comes back on the same socket it is re-attached (the
    console's offsets go on, the ring still holds the previous boot)."""
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    a = boot_sector_vm(tmp_path / "a", vnc=False, name="web1", paused=True)
    b = boot_sector_vm(tmp_path / "b", vnc=False, name="web2", paused=True)
    a.start()
    b.start()
    try:
        async def main():
            async with agent([a, b]) as (provider, registry):
                await wait_offset(registry, "web1", len(BANNER))
                s = await open_channel(provider, "web1", "console", "rw", {"replay": "all"})
                await read_until(s, BANNER)
                a.kill()
                with pytest.raises(StreamResetError) as e:
                    await asyncio.wait_for(s.read(), 10)
                assert e.value.code == ResetCode.CHANNEL_GONE
                assert e.value.message == "VM web1 went away (QEMU exited)"
                await asyncio.wait_for(s.task, 5)
                assert registry.get("web1").state == "absent"
                with pytest.raises(ChannelRefused) as e:
                    await open_channel(provider, "web1", "console")
                assert e.value.code == RefuseCode.UNAVAILABLE

                other = await open_channel(provider, "web2", "console", "rw")
                await other.write(b"still here\r")
                assert await read_until(other, b"\r\n") == b"STILL HERE\r\n"
                await end(other)

                a.wait()
                a.proc = None
                a.start()  # paused again: its banner is surely captured
                t0 = time.monotonic()
                assert await registry.get("web1").monitor.wait_ready(10)
                print("re-attached %.2f s after restart" % (time.monotonic() - t0))
                await registry.get("web1").monitor.execute("cont")
                await wait_offset(registry, "web1", 2 * len(BANNER), console="serial0")
                again = await open_channel(provider, "web1", "console", "rw", {"replay": "all"})
                assert await read_exactly(again, 2 * len(BANNER)) == BANNER + BANNER
                await again.write(b"back\r")
                assert await read_until(again, b"\r\n") == b"BACK\r\n"
                await end(again)

        asyncio.run(main())
    finally:
        a.terminate()
        b.terminate()


def test_socket_directory(tmp_path):
    """VMs found in a directory of QMP sockets, including ones that appear later."""
    for sub in ("q", "1", "2"):
        (tmp_path / sub).mkdir()
    d = tmp_path / "q"
    first = boot_sector_vm(tmp_path / "1", vnc=False, name="first", paused=True)
    first.qmp_path = d / "first.qmp"
    first.start()
    # paused: without -S the guest may print its banner before the agent finds it
    late = boot_sector_vm(tmp_path / "2", vnc=False, name="late", paused=True)
    late.qmp_path = d / "late.qmp"
    try:
        async def main():
            async with agent([], socket_dir=str(d), scan_interval=0.1) as (provider, registry):
                assert registry.names() == ["first"]
                late.start()
                deadline = time.monotonic() + 10
                while "late" not in registry.names():
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                assert await registry.get("late").monitor.wait_ready(10)
                await registry.get("late").monitor.execute("cont")
                await wait_offset(registry, "late", len(BANNER))
                s = await open_channel(provider, "late", "console", "rw", {"replay": "all"})
                assert await read_until(s, BANNER) == BANNER
                await end(s)
                late.terminate()  # clean exit: QEMU removes its socket; the VM is dropped
                deadline = time.monotonic() + 10
                while "late" in registry.names():
                    assert time.monotonic() < deadline, os.listdir(d)
                    await asyncio.sleep(0.05)

        asyncio.run(main())
    finally:
        first.terminate()
        late.terminate()


# --------------------------------------------------------------------------- resume_prelaunch

RESUMED = "resumed from prelaunch after taking over its consoles"


def resumed_lines(caplog, vm="bs"):
    return [r for r in caplog.records
            if r.name == "vproxy.qemu.monitor" and r.getMessage() == "VM %s: %s" % (vm, RESUMED)]


def test_resume_prelaunch_keeps_boot_output_from_first_byte(vm, caplog):
    """resume_prelaunch: a VM started with -S is resumed by the agent itself, after the
    takeover, so its banner is in the ring from offset 0; again after a QEMU restart."""
    caplog.set_level(logging.INFO, logger="vproxy.qemu.monitor")
    vm.start()

    async def main():
        # cont=False: the test helper must not resume the VM, only the agent may
        async with agent([vm], cont=False, resume_prelaunch=True) as (provider, registry):
            mon = registry.get("bs").monitor
            assert mon.resume_prelaunch is True
            # ready is set once the VM has been resumed
            assert (await mon.execute("query-status"))["status"] == "running"
            assert mon.state == "running"
            await wait_offset(registry, "bs", len(BANNER))
            s = await open_channel(provider, "bs", "console", "ro", {"replay": "all"})
            assert s.info["start"] == "0"
            assert await read_exactly(s, len(BANNER)) == BANNER  # from its first byte
            assert (await provider.describe())[0]["state"] == "running"
            assert len(resumed_lines(caplog)) == 1
            assert resumed_lines(caplog)[0].levelno == logging.INFO

            # a new QEMU process that comes up in prelaunch is resumed too
            vm.kill()
            with pytest.raises(StreamResetError):
                await asyncio.wait_for(s.read(), 10)
            await end_quietly(s)
            deadline = time.monotonic() + 10
            while mon.state != "absent":
                assert time.monotonic() < deadline, "QEMU's exit went unnoticed"
                await asyncio.sleep(0.02)
            vm.wait(10)
            vm.proc = None
            vm.start()
            assert await mon.wait_ready(10)
            assert (await mon.execute("query-status"))["status"] == "running"
            await wait_offset(registry, "bs", 2 * len(BANNER))
            again = await open_channel(provider, "bs", "console", "ro", {"replay": "all"})
            assert await read_exactly(again, 2 * len(BANNER)) == BANNER + BANNER
            assert len(resumed_lines(caplog)) == 2
            await end(again)

    asyncio.run(main())


async def end_quietly(stream):
    with contextlib.suppress(Exception):
        await asyncio.wait_for(stream.task, 5)


def test_prelaunch_vm_stays_prelaunch_without_resume_prelaunch(vm, caplog):
    """The setting is off by default: the agent takes the console over but never runs
    `cont` (libvirt starts VMs with -S and resumes them itself)."""
    caplog.set_level(logging.INFO, logger="vproxy.qemu.monitor")
    vm.start()

    async def main():
        async with agent([vm], cont=False) as (provider, registry):
            mon = registry.get("bs").monitor
            assert mon.resume_prelaunch is False
            assert registry.get("bs").consoles.describe()[0]["status"] == "attached"
            await asyncio.sleep(1.0)  # the guest prints its banner within ~0.2 s if run
            assert (await mon.execute("query-status"))["status"] == "prelaunch"
            assert (await provider.describe())[0]["state"] == "prelaunch"
            assert registry.get("bs").consoles.consoles["serial0"].offset == 0
            assert resumed_lines(caplog) == []

    asyncio.run(main())


@pytest.mark.parametrize("how", ["paused", "inmigrate"])
def test_resume_prelaunch_leaves_paused_and_inmigrate_alone(tmp_path, caplog, how):
    """Only "prelaunch" is resumed: a VM someone stopped ("paused", here: -S, cont, stop
    before the agent comes) or one waiting for an incoming migration stays as it is."""
    caplog.set_level(logging.INFO, logger="vproxy.qemu.monitor")
    extra = ["-incoming", "defer"] if how == "inmigrate" else []
    v = boot_sector_vm(tmp_path, vnc=False, name="bs", paused=(how == "paused"), extra=extra)
    v.start()
    try:
        async def main():
            if how == "paused":
                from support.vmtools import qmp_connect

                qmp = await qmp_connect(v)
                await qmp.execute("cont")
                await qmp.execute("stop")
                assert (await qmp.execute("query-status"))["status"] == "paused"
                await qmp.disconnect()
            async with agent([v], cont=False, resume_prelaunch=True) as (provider, registry):
                mon = registry.get("bs").monitor
                await asyncio.sleep(0.5)
                assert (await mon.execute("query-status"))["status"] == how
                assert mon.state == how
                # (cont in inmigrate would change no status, only QEMU's autostart: the
                # log line is what tells)
                assert resumed_lines(caplog) == []

        asyncio.run(main())
    finally:
        v.terminate()


def test_resume_prelaunch_waits_for_every_owner(vm):
    """cont is sent only after every owner's on_connected has finished: an owner that
    takes its time still sees the VM in prelaunch at its end."""
    from vproxy.agent.qemu.monitor import MonitorOwner, VMMonitor

    vm.start()

    class SlowOwner(MonitorOwner):
        seen = []

        async def on_connected(self, monitor):
            await asyncio.sleep(0.5)
            self.seen.append((await monitor.execute("query-status"))["status"])

    async def main():
        mon = VMMonitor("bs", str(vm.qmp_path), resume_prelaunch=True)
        first, second = SlowOwner(), SlowOwner()
        first.seen, second.seen = [], []
        mon.add_owner(first)
        mon.add_owner(second)
        mon.start()
        try:
            assert await mon.wait_ready(10)
            assert first.seen == second.seen == ["prelaunch"]
            assert (await mon.execute("query-status"))["status"] == "running"
        finally:
            await mon.stop()

    asyncio.run(main())


@pytest.mark.parametrize("failure", ["qmp", "bug"])
def test_resume_prelaunch_failure_is_a_warning(vm, caplog, failure):
    """A cont that fails is one warning; the supervisor goes on (the VM is served,
    and stays in prelaunch)."""
    from vproxy.agent.qemu.errors import QMPCommandError
    from vproxy.agent.qemu.monitor import VMMonitor

    caplog.set_level(logging.INFO, logger="vproxy.qemu.monitor")
    vm.start()

    class FailingCont(VMMonitor):
        async def execute(self, cmd, args=None):
            if cmd == "cont":
                if failure == "qmp":
                    raise QMPCommandError(self.name, cmd, args, "GenericError", "not now")
                raise RuntimeError("oops")
            return await super().execute(cmd, args)

    async def main():
        mon = FailingCont("bs", str(vm.qmp_path), resume_prelaunch=True)
        mon.start()
        try:
            assert await mon.wait_ready(10)
            assert not mon._task.done()
            assert (await mon.execute("query-status"))["status"] == "prelaunch"
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                        and "could not resume it from prelaunch" in r.getMessage()]
            assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
            assert ("not now" if failure == "qmp" else "oops") in warnings[0].getMessage()
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert resumed_lines(caplog) == []
        finally:
            await mon.stop()

    asyncio.run(main())
