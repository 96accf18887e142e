"""Guest channels (virtio-serial ports) through the agent.

The plumbing (takeover, hotplug and removal, BUSY, refusals) is checked on the small
boot-sector VM with a virtio-serial controller (its guest has no virtio driver, which
QEMU does not mind). Data, VSERPORT_CHANGE and a guest going away are checked on the
Linux guest (tests/support/guests/linux_guest.py), whose ports named org.vproxy.echo* run an
echo program.
"""

import asyncio
import contextlib
import hashlib
import os
import time

import pytest

from support.memstream import open_channel, read_exactly, read_until
from support.vmtools import boot_sector_vm, qemu_available
from vproxy.errors import ChannelRefused, StreamResetError
from vproxy.mux import RefuseCode, ResetCode
from vproxy.agent.qemu.provider import QemuProvider
from vproxy.agent.qemu.vms import VMRegistry

pytestmark = [pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 not installed"),
              pytest.mark.qemu, pytest.mark.slow]


@contextlib.asynccontextmanager
async def agent(*vms, **options):
    registry = VMRegistry([(v.name, str(v.qmp_path)) for v in vms], **options)
    await registry.start()
    try:
        for v in vms:
            assert await registry.get(v.name).monitor.wait_ready(10)
        yield QemuProvider(registry), registry
    finally:
        await registry.stop()


async def end(s):
    s.reset(ResetCode.CANCEL, "test done")
    await asyncio.wait_for(s.task, 10)


async def port_ids(registry, vm):
    ports = await registry.get(vm).channels.list_ports(registry.get(vm).monitor)
    return {p["name"]: p for p in ports}


def _static_port_args():
    return ["-device", "virtio-serial",
            "-chardev", "null,id=gc0",
            "-device", "virtserialport,chardev=gc0,name=org.example.static,id=gp0"]


def test_takeover_hotplug_busy(tmp_path):
    vm = boot_sector_vm(tmp_path, vnc=False, name="bs", extra=_static_port_args()).start()
    try:
        async def main():
            async with agent(vm) as (provider, registry):
                # an existing port with a null chardev is taken over
                s = await open_channel(provider, "bs", "channel:org.example.static", "rw", identity="alice")
                assert s.info == {"channel": "org.example.static", "guest": "unknown", "hotplugged": "no"}
                with pytest.raises(ChannelRefused) as e:
                    await open_channel(provider, "bs", "channel:org.example.static", "rw", identity="bob")
                assert e.value.code == RefuseCode.BUSY
                assert e.value.message == "guest channel org.example.static of VM bs is in use by alice"
                await end(s)
                # released: re-attached with add_client this time
                assert (await port_ids(registry, "bs"))["org.example.static"]["backend"].startswith("disconnected:fd:")
                s = await open_channel(provider, "bs", "channel:org.example.static", "rw", identity="bob")
                assert (await port_ids(registry, "bs"))["org.example.static"]["backend"] == "unix:"
                await end(s)

                # unknown name without hotplug: refused, listing what exists
                with pytest.raises(ChannelRefused) as e:
                    await open_channel(provider, "bs", "channel:org.example.new")
                assert e.value.code == RefuseCode.NO_SUCH_CHANNEL
                assert "org.example.static" in e.value.message and "hotplug" in e.value.message

                # hotplug: added now, removed when the stream ends
                h = await open_channel(provider, "bs", "channel:org.example.new", "hotplug", identity="carol")
                assert h.info["hotplugged"] == "yes"
                ports = await port_ids(registry, "bs")
                assert ports["org.example.new"]["id"].startswith("vproxy-p-")
                chardev_id = ports["org.example.new"]["chardev"]
                desc = (await provider.describe())[0]["channels"]
                assert {"name": "org.example.new", "holder": "carol", "guest": "unknown",
                        "hotplugged": "yes", "held": "taken over", "held_where": ""} in desc
                with pytest.raises(ChannelRefused) as e:
                    await open_channel(provider, "bs", "channel:org.example.new", "hotplug")
                assert e.value.code == RefuseCode.BUSY
                await end(h)
                assert "org.example.new" not in await port_ids(registry, "bs")
                labels = [c["label"] for c in await registry.get("bs").monitor.execute("query-chardev")]
                assert chardev_id not in labels

                # hotplug of an existing name just opens it
                s = await open_channel(provider, "bs", "channel:org.example.static", "hotplug")
                assert s.info["hotplugged"] == "no"
                await end(s)
                assert "org.example.static" in await port_ids(registry, "bs")

        asyncio.run(main())
    finally:
        vm.terminate()


def test_refusals(tmp_path):
    """Paused VM (chardev-change on virtio-serial needs a running VM), no controller,
    a port on a file chardev (not ours to take); a port on a socket server is adopted,
    paused or not (tests/test_qemu_adopt_channel.py has the rest)."""
    os.makedirs(tmp_path / "n")
    os.makedirs(tmp_path / "p")
    no_ctrl = boot_sector_vm(tmp_path / "n", vnc=False, name="noctrl")
    paused = boot_sector_vm(tmp_path / "p", vnc=False, name="paused", paused=True,
                            extra=_static_port_args() + [
                                "-chardev", "socket,id=ga,path=%s,server=on,wait=off" % (tmp_path / "p" / "ga.sock"),
                                "-device", "virtserialport,chardev=ga,name=org.qemu.guest_agent.0",
                                "-chardev", "file,id=gf,path=%s" % (tmp_path / "p" / "gf.out"),
                                "-device", "virtserialport,chardev=gf,name=org.example.file"])
    no_ctrl.start()
    paused.start()
    try:
        async def main():
            async with agent(no_ctrl, paused) as (provider, registry):
                with pytest.raises(ChannelRefused) as e:
                    await open_channel(provider, "noctrl", "channel:org.example.x", "hotplug")
                assert e.value.code == RefuseCode.UNAVAILABLE
                assert e.value.message == ("VM noctrl has no virtio-serial controller to add guest "
                                           "channel org.example.x to: start QEMU with -device virtio-serial")
                labels = [c["label"] for c in await registry.get("noctrl").monitor.execute("query-chardev")]
                assert not any(x.startswith("vproxy") for x in labels)  # chardev rolled back

                with pytest.raises(ChannelRefused) as e:
                    await open_channel(provider, "paused", "channel:org.example.static")
                assert e.value.code == RefuseCode.UNAVAILABLE
                assert e.value.message == ("guest channel org.example.static of VM paused can be "
                                           "taken over only while the VM runs (it is prelaunch)")
                with pytest.raises(ChannelRefused) as e:
                    await open_channel(provider, "paused", "channel:org.example.file")
                assert e.value.code == RefuseCode.UNAVAILABLE
                assert e.value.message == (
                    "guest channel org.example.file of VM paused is connected to 'file', which vproxy "
                    "does not take over: give the port a null chardev (-chardev null,id=gf)")
                ga = await open_channel(provider, "paused", "channel:org.qemu.guest_agent.0")
                desc = {c["name"]: c for c in (await provider.describe())[1]["channels"]}
                assert (desc["org.qemu.guest_agent.0"]["held"],
                        desc["org.qemu.guest_agent.0"]["held_where"]) == ("adopted socket",
                                                                          str(tmp_path / "p" / "ga.sock"))
                await end(ga)
                with pytest.raises(ChannelRefused) as e:
                    await open_channel(provider, "paused", "channel:org.example.static", "ro")
                assert e.value.code == RefuseCode.BAD_REQUEST
                # once it runs, it works
                await registry.get("paused").monitor.execute("cont")
                s = await open_channel(provider, "paused", "channel:org.example.static")
                await end(s)

        asyncio.run(main())
    finally:
        no_ctrl.terminate()
        paused.terminate()


# --------------------------------------------------------------------------- Linux guest


def _linux_guest_available():
    try:
        from support.guests import linux_guest  # noqa: F401
    except ImportError:
        return False
    return True


linux = pytest.mark.skipif(not _linux_guest_available(),
                           reason="tests/support/guests/linux_guest.py not available yet")


def boot_linux(tmp_path, name="lin", **vm_options):
    """Start the Linux guest (`support.vmtools.linux_vm` with *vm_options*) and wait
    until it says its echo ports run. (Watches the console with a takeover of its own,
    as the agent would; the agent later re-attaches it with add_client.)"""
    from support.guests.linux_guest import READY_MARKER
    from support.vmtools import linux_vm, qmp_connect, read_until, take_over_chardev

    vm = linux_vm(tmp_path, name=name, **vm_options)
    vm.start()

    async def watch():
        qmp = await qmp_connect(vm)
        try:
            sock = await take_over_chardev(qmp)
        finally:
            await qmp.disconnect()
        try:
            await asyncio.get_event_loop().run_in_executor(None, read_until, sock, READY_MARKER, 120.0)
        finally:
            sock.close()

    try:
        asyncio.run(watch())
    except BaseException:
        vm.terminate()
        raise
    return vm


@pytest.fixture(scope="module")
def _linux_vms(tmp_path_factory):
    booted = []
    yield booted, tmp_path_factory
    for vm in booted:
        vm.terminate()


@pytest.fixture
def linux_vm(_linux_vms):
    """The module's booted Linux guest (booted again if a test killed it)."""
    booted, factory = _linux_vms
    if not booted or not booted[-1].running():
        booted.append(boot_linux(factory.mktemp("linux")))
    return booted[-1]


@linux
def test_linux_hotplug_echo_16mib(linux_vm):
    """16+ MiB through a hotplugged port and back, with equal SHA-256; the guest's
    open/close of the port arrives as NOTICEs."""

    async def main():
        async with agent(linux_vm) as (provider, registry):
            s = await open_channel(provider, "lin", "channel:org.vproxy.echo.hot", "hotplug")
            n = await asyncio.wait_for(s.next_notice(), 60)
            assert n == {"event": "guest-open"}
            size = 16 * 1024 * 1024 + 12345
            data = os.urandom(1 << 20)
            want = hashlib.sha256()
            got = hashlib.sha256()

            async def send():
                sent = 0
                while sent < size:
                    chunk = data[: min(len(data), size - sent)]
                    await s.write(chunk)
                    want.update(chunk)
                    sent += len(chunk)

            async def receive():
                n = 0
                while n < size:
                    chunk = await s.read(1 << 20)
                    assert chunk, "EOF after %d bytes" % n
                    got.update(chunk)
                    n += len(chunk)

            t0 = time.monotonic()
            await asyncio.wait_for(asyncio.gather(send(), receive()), 300)
            elapsed = time.monotonic() - t0
            print("echoed %d bytes through a hotplugged port in %.1f s (%.1f MB/s)"
                  % (size, elapsed, size / elapsed / 1e6))
            assert got.hexdigest() == want.hexdigest()
            await s.close()
            assert await asyncio.wait_for(s.read(), 30) == b""  # agent closes after linger
            await asyncio.wait_for(s.task, 30)

    asyncio.run(main())


@linux
def test_linux_static_port(linux_vm):
    """A boot-time port with a null chardev: taken over while the VM runs, one client
    at a time, re-attached (add_client) for the next client."""

    async def main():
        async with agent(linux_vm) as (provider, registry):
            for who in ("alice", "bob"):
                s = await open_channel(provider, "lin", "channel:org.vproxy.echo0", identity=who)
                assert s.info["hotplugged"] == "no"
                with pytest.raises(ChannelRefused) as e:
                    await open_channel(provider, "lin", "channel:org.vproxy.echo0", identity="eve")
                assert e.value.code == RefuseCode.BUSY
                assert e.value.message == "guest channel org.vproxy.echo0 of VM lin is in use by %s" % who
                msg = b"hello from %s\n" % who.encode()
                await s.write(msg)
                assert await read_exactly(s, len(msg), timeout=30) == msg
                await end(s)

    asyncio.run(main())


async def login(con, login_prompt, shell_prompt):
    """Log in on the fake login. (Typed right after the prompt that follows an empty
    name, the name is sometimes lost in the guest: so retry.)"""
    await con.write(b"\r")
    await read_until(con, login_prompt, timeout=30)
    buf = bytearray()
    for _ in range(5):
        await con.write(b"root\r")
        with contextlib.suppress(asyncio.TimeoutError):
            await read_until(con, shell_prompt, timeout=5, buf=buf)
            return
    pytest.fail("no shell prompt: %r" % bytes(buf))


@linux
def test_linux_guest_open_close_notices(linux_vm):
    """The guest opens and closes a hotplugged port from its shell (driven through the
    console): the holder gets guest-open, the data, guest-close."""
    from support.guests.linux_guest import LOGIN_PROMPT, SHELL_PROMPT

    async def main():
        async with agent(linux_vm) as (provider, registry):
            port = await open_channel(provider, "lin", "channel:org.example.shell", "hotplug")
            con = await open_channel(provider, "lin", "console", "rw")
            await login(con, LOGIN_PROMPT, SHELL_PROMPT)
            await con.write(
                b"f=$(grep -l '^org.example.shell$' /sys/class/virtio-ports/*/name); "
                b"d=/dev/$(basename $(dirname $f)); exec 4<>$d; echo hello-from-guest >&4; "
                b"sleep 1; exec 4>&-; echo done-$((40+2))\r")
            await read_until(con, b"done-42", timeout=60)
            assert await asyncio.wait_for(port.next_notice(), 10) == {"event": "guest-open"}
            assert await read_exactly(port, 17, timeout=10) == b"hello-from-guest\n"
            assert await asyncio.wait_for(port.next_notice(), 10) == {"event": "guest-close"}
            desc = (await provider.describe())[0]["channels"]
            assert any(c["name"] == "org.example.shell" and c["guest"] == "closed" for c in desc)
            await con.write(b"exit\r")
            await end(con)
            await end(port)

    asyncio.run(main())


async def kill_and_check_reset(vm, s):
    """Kill *vm*'s QEMU: the channel's stream *s* is reset, CHANNEL_GONE, saying why."""
    vm.kill()
    with pytest.raises(StreamResetError) as e:
        while await asyncio.wait_for(s.read(), 10):
            pass
    assert e.value.code == ResetCode.CHANNEL_GONE
    assert e.value.message == "VM %s went away (QEMU exited)" % vm.name
    await asyncio.wait_for(s.task, 10)


@linux
def test_linux_qemu_killed(linux_vm):
    vm = linux_vm
    try:
        async def main():
            async with agent(vm) as (provider, registry):
                s = await open_channel(provider, "lin", "channel:org.vproxy.echo0")
                await s.write(b"ping\n")
                assert await read_exactly(s, 5, timeout=30) == b"ping\n"
                await kill_and_check_reset(vm, s)

        asyncio.run(main())
    finally:
        vm.terminate()
