"""End to end: real QEMU, the real agent process, real mutual TLS, the client API and CLI.

The boot-sector guest's console and VNC display and the Linux guest's virtio-serial port,
reached through `vproxy serve` exactly as a remote user would.
"""

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from support.agenttools import AgentProcess, read_until
from support.vmtools import BOOT_SECTOR_BANNER, boot_sector_vm, linux_vm
from vproxy.client.connection import connect
from vproxy.errors import ChannelRefused
from vproxy.client.forward import bridge
from vproxy.mux import RefuseCode

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)


def connect_as(pki, pair, address):
    return connect(address, pair.cert, pair.key, pki.ca, server_name="localhost")


@pytest.fixture
def bootvm(tmp_path):
    vm = boot_sector_vm(tmp_path / "vm", name="web1", paused=False)
    vm.start()
    yield vm
    vm.terminate()


def test_console_vnc_acl_and_ls_through_the_agent(pki, tmp_path, bootvm):
    agent = AgentProcess(pki, tmp_path, [("web1", bootvm.qmp_path)], [
        {"identities": ["alice"], "vms": ["web*"], "channels": ["console", "vnc"], "modes": ["force"]},
        {"identities": ["bob"], "vms": ["*"], "channels": ["console"], "modes": ["ro"]},
    ])
    try:
        async def main():
            alice = await connect_as(pki, pki.alice, agent.address)
            console = await alice.open("web1", "console", "rw")
            await console.write(b"hello vproxy\r")
            await read_until(console, b"HELLO VPROXY\r\n")
            # output printed before a viewer attached is replayed to it
            late = await alice.open("web1", "console", "ro", {"replay": "4096"})
            await read_until(late, b"HELLO VPROXY\r\n")

            bob = await connect_as(pki, pki.bob, agent.address)
            with pytest.raises(ChannelRefused) as info:
                await bob.open("web1", "console", "rw")
            assert info.value.code == RefuseCode.FORBIDDEN
            assert "bob may not open console of VM web1: mode rw is not granted" in info.value.message
            viewer = await bob.open("web1", "console", "ro")  # read-only is granted
            await console.write(b"seen by bob\r")
            await read_until(viewer, b"SEEN BY BOB")
            with pytest.raises(ChannelRefused) as info:
                await bob.open("web1", "vnc", "rw")
            assert info.value.code == RefuseCode.FORBIDDEN

            vms = await alice.list_vms()
            assert [vm["vm"] for vm in vms] == ["web1"]
            assert "alice" in vms[0]["consoles"][0]["viewers"]
            assert await (await connect_as(pki, pki.san_client, agent.address)).list_vms() == []

            # a real VNC client through the tunnel: a local listener per VNC stream
            async def to_vnc(reader, writer):
                await bridge(await alice.open("web1", "vnc", "rw"), reader, writer)

            server = await asyncio.start_server(to_vnc, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            shot = tmp_path / "screen.png"
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "vncdotool.command", "-s", "127.0.0.1::%d" % port,
                "capture", str(shot), stderr=asyncio.subprocess.PIPE)
            _, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err
            server.close()
            from PIL import Image

            image = Image.open(shot)
            assert image.size == (720, 400) or image.size[0] >= 640
            extrema = image.convert("RGB").getextrema()  # (min, max) per band
            assert any(low != high for low, high in extrema)  # not a blank screen
            await alice.close()
            await bob.close()

        asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        agent.stop()
    audit = agent.audit_lines()
    assert any("identity=bob vm=web1 channel=console mode=rw result='refused:" in line for line in audit)
    assert any("identity=alice vm=web1 channel=console mode=rw result=" in line and "in=25 out=27" in line
               for line in audit)
    assert any("identity=alice vm=web1 channel=vnc" in line for line in audit)


def test_ls_from_the_command_line(pki, tmp_path, bootvm):
    agent = AgentProcess(pki, tmp_path, [("web1", bootvm.qmp_path)],
                         [{"identities": ["alice"], "vms": ["*"]}])
    try:
        args = [sys.executable, "-m", "vproxy", "ls", agent.address, "--cert", pki.alice.cert,
                "--key", pki.alice.key, "--ca", pki.ca]
        deadline = time.monotonic() + 20
        while True:  # the agent takes the console over right after QMP connects
            out = subprocess.run(args + ["--json"], capture_output=True, text=True, env=ENV, timeout=60)
            assert out.returncode == 0, out.stderr
            (host,) = json.loads(out.stdout)
            if host["vms"] and host["vms"][0]["consoles"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert host["host"] == agent.address and host["vms"][0]["vm"] == "web1"
        assert host["vms"][0]["consoles"][0]["id"] == "serial0"
        text = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=60)
        assert "%s/web1  running" % agent.address in text.stdout
        assert "console:serial0" in text.stdout and "vnc" in text.stdout
    finally:
        agent.stop()


def test_64_mib_through_a_guest_channel_over_tls(pki, tmp_path):
    vm = linux_vm(tmp_path / "vm", name="lin")
    vm.start()
    agent = AgentProcess(pki, tmp_path, [("lin", vm.qmp_path)],
                         [{"identities": ["alice"], "vms": ["lin"], "channels": ["channel:org.vproxy.*"],
                           "modes": ["rw", "hotplug"]}])
    try:
        async def main():
            client = await connect_as(pki, pki.alice, agent.address)
            deadline = time.monotonic() + 60
            while True:  # the guest's echo loop starts once it has booted
                try:
                    stream = await client.open("lin", "channel:org.vproxy.echo.e2e", "hotplug")
                    break
                except ChannelRefused as e:
                    assert time.monotonic() < deadline, e.message
                    await asyncio.sleep(1)
            size = 64 * 1024 * 1024
            block = os.urandom(1 << 20)
            want = hashlib.sha256(block * 64).hexdigest()

            async def send():
                for _ in range(64):
                    await stream.write(block)

            async def receive():
                got = hashlib.sha256()
                n = 0
                while n < size:
                    chunk = await stream.read(1 << 20)
                    assert chunk, "EOF after %d bytes" % n
                    got.update(chunk)
                    n += len(chunk)
                return got.hexdigest()

            start = time.monotonic()
            _, digest = await asyncio.gather(send(), receive())
            print("64 MiB through a hotplugged guest channel over TLS in %.1f s" % (time.monotonic() - start))
            assert digest == want
            await client.close()

        asyncio.run(asyncio.wait_for(main(), 300))
    finally:
        agent.stop()
        vm.terminate()


def test_qemu_killed_mid_stream_and_started_again(pki, tmp_path):
    """web1's QEMU is SIGKILLed while a client reads its console: the client gets a clear
    reset, web2 on the same agent keeps working, and web1 is served again once its QEMU
    is back (same QMP path)."""
    web1 = boot_sector_vm(tmp_path / "web1", name="web1")
    web2 = boot_sector_vm(tmp_path / "web2", name="web2")
    web1.start()
    web2.start()
    agent = AgentProcess(pki, tmp_path, [("web1", web1.qmp_path), ("web2", web2.qmp_path)],
                         [{"identities": ["alice"]}])
    try:
        async def main():
            from vproxy.errors import StreamResetError

            client = await connect_as(pki, pki.alice, agent.address)
            one = await client.open("web1", "console")
            two = await client.open("web2", "console")
            await one.write(b"a\r")
            await read_until(one, b"A\r\n")
            web1.kill()
            with pytest.raises(StreamResetError) as info:
                while await asyncio.wait_for(one.read(), 20):
                    pass
            assert "web1" in info.value.message and "QEMU" in info.value.message
            reset_message = info.value.message
            await two.write(b"still here\r")
            await read_until(two, b"STILL HERE\r\n")
            web1.wait(10)
            web1.proc = None
            web1.start()
            deadline = time.monotonic() + 30
            while True:
                again = None
                try:  # input typed before the new QEMU is taken over goes nowhere: retry
                    again = await client.open("web1", "console")
                    await again.write(b"back\r")
                    await read_until(again, b"BACK\r\n", timeout=3)
                    break
                except (ChannelRefused, StreamResetError, AssertionError, asyncio.TimeoutError):
                    assert time.monotonic() < deadline, "web1 was not served again"
                    if again is not None:
                        again.reset()  # give up the writer role before the next try
                    await asyncio.sleep(0.5)
            await client.close()
            return reset_message

        reset_message = asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        agent.stop()
        web1.terminate()
        web2.terminate()
    assert any("vm=web1" in line and reset_message in line for line in agent.audit_lines())


@pytest.mark.parametrize("file_line, flags, resumed", [
    ("resume_prelaunch = true", [], True),                           # the config key
    ("", ["--resume-prelaunch"], True),                              # the flag
    ("resume_prelaunch = true", ["--no-resume-prelaunch"], False),   # the flag wins
    ("", [], False),                                                 # default: off
])
def test_resume_prelaunch_through_vproxy_serve(pki, tmp_path, file_line, flags, resumed):
    """`vproxy serve` with resume_prelaunch resumes a VM started with -S once its console
    is taken over: a viewer with replay=all gets the banner from byte 0 and `ls` says
    running. Without it, the VM stays in prelaunch."""
    import threading

    vm = boot_sector_vm(tmp_path / "vm", name="web1", paused=True)
    vm.start()
    config = tmp_path / "agent.toml"
    config.write_text("\n".join([
        'listen = "127.0.0.1:0"', 'cert = "%s"' % pki.server.cert, 'key = "%s"' % pki.server.key,
        'ca = "%s"' % pki.ca, 'crl = "%s"' % pki.crl, file_line,
        "[[vm]]", 'name = "web1"', 'qmp = "%s"' % vm.qmp_path,
        "[[allow]]", 'identities = ["alice"]']) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "vproxy", "-v", "serve", "--config", str(config)] + flags,
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, text=True)
    lines = []
    address = None
    for line in proc.stderr:  # with -v, info lines may come before "listening on"
        lines.append(line)
        if "listening on " in line:
            address = line.split("listening on ")[1].strip()
            break
    assert address, "the agent did not start: " + "".join(lines)
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        async def main():
            alice = await connect_as(pki, pki.alice, address)
            deadline = time.monotonic() + 20
            while True:  # until the agent has the console and (maybe) resumed the VM
                (web1,) = await alice.list_vms()
                done = web1["consoles"] and (web1["state"] == "running" or not resumed)
                if done or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert web1["consoles"][0]["status"] == "attached", web1
            if resumed:
                assert web1["state"] == "running"
                console = await alice.open("web1", "console", "ro", {"replay": "all"})
                assert console.info["start"] == "0"
                data = b""
                while len(data) < len(BOOT_SECTOR_BANNER):
                    chunk = await asyncio.wait_for(console.read(), 20)
                    assert chunk, "EOF after %r" % data
                    data += chunk
                assert data.startswith(BOOT_SECTOR_BANNER)
            else:
                await asyncio.sleep(1.0)  # the guest would have printed by now
                (web1,) = await alice.list_vms()
                assert web1["state"] == "prelaunch"
                assert web1["consoles"][0]["buffered"] == 0
            await alice.close()

        asyncio.run(main())
    finally:
        proc.terminate()
        proc.wait(15)
        reader.join(5)
        vm.terminate()
    said = [line for line in lines if "resumed from prelaunch after taking over its consoles" in line]
    assert len(said) == (1 if resumed else 0), "".join(lines)
