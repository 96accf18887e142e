#!/usr/bin/env python3
"""Soak: the real agent process (`vproxy serve`, mutual TLS on loopback) beside a real
QEMU (the boot-sector guest, TCG), driven for several minutes with console, channel
and VNC traffic and reconnects; prints the agent's RSS every 30 s. A bench: it prints,
it asserts nothing (errors are counted and printed).

    python3 bench/soak.py [--minutes 5] [--interval 30]

Each round (about 4 per second):
- console: a line typed into the guest and its echo read back (the writer role);
  a read-only viewer watches all along; both sessions are dropped and made anew
  every 20 s (a reconnect resuming by offset);
- channel: the echo built-in (the boot-sector guest has no virtio-serial port; the
  Linux guest would cost a 6 s boot and 256 MB): 64 KiB there and back;
- VNC: a full-framebuffer screenshot over a new VNC stream every 5 s;
- every 10 s a short-lived session (connect, ls, close).
The test CA comes from tests/support/pkitools.py (made in a temporary directory).
"""

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from support.agenttools import AgentProcess  # noqa: E402
from support.pkitools import make_pki  # noqa: E402
from support.vmtools import boot_sector_vm, expected_echo  # noqa: E402
from vproxy.api import rfb_capture  # noqa: E402
from vproxy.client.connection import connect  # noqa: E402


def rss_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def fds(pid: int) -> int:
    return len(os.listdir("/proc/%d/fd" % pid))


async def soak(pki, agent, minutes: float, interval: float) -> None:
    pid = agent.proc.pid

    async def session():
        return await connect(agent.address, pki.alice.cert, pki.alice.key, pki.ca, server_name="localhost")

    counts = dict(console=0, console_bytes=0, echo_bytes=0, screenshots=0, reconnects=0,
                  short_sessions=0, errors=0)
    errors = []
    started = time.monotonic()
    end = started + minutes * 60
    next_print = started
    rss0 = rss_kib(pid)
    print("%7s %9s %9s %5s %8s %10s %10s %6s %6s %5s" % (
        "t(s)", "RSS KiB", "delta", "fds", "console", "con bytes", "echo MB", "vnc", "recon", "errs"),
        flush=True)

    def report():
        t = time.monotonic() - started
        rss = rss_kib(pid)
        print("%7.0f %9d %+9d %5d %8d %10d %10.1f %6d %6d %5d" % (
            t, rss, rss - rss0, fds(pid), counts["console"], counts["console_bytes"],
            counts["echo_bytes"] / 1e6, counts["screenshots"], counts["reconnects"], counts["errors"]),
            flush=True)

    writer_client = viewer_client = None
    writer = viewer = echo = None
    last_reconnect = last_vnc = last_short = 0.0
    seen = 0
    block = os.urandom(64 * 1024)
    n = 0
    while time.monotonic() < end:
        now = time.monotonic()
        if now >= next_print:
            report()
            next_print += interval
        try:
            if writer_client is None or now - last_reconnect >= 20:
                for c in (writer_client, viewer_client):
                    if c is not None:
                        await c.close()
                        counts["reconnects"] += 1
                writer_client, viewer_client = await session(), await session()
                writer = await writer_client.open("web1", "console", "rw")
                viewer = await viewer_client.open("web1", "console", "ro", {"offset": str(seen)} if seen else {})
                echo = await writer_client.open("", "echo", "rw")
                last_reconnect = now
            line = b"soak round %d abcdefghijklmnopqrstuvwxyz\r" % n
            want = expected_echo(line)
            await writer.write(line)
            got = b""
            while want not in got:
                got += await asyncio.wait_for(writer.read(), 10)
            counts["console"] += 1
            counts["console_bytes"] += len(line) + len(got)
            while True:  # the viewer keeps up (and its offset is what a resume asks for)
                try:
                    chunk = await asyncio.wait_for(viewer.read(), 0.01)
                except asyncio.TimeoutError:
                    break
                if not chunk:
                    break
                seen += len(chunk)
            await echo.write(block)
            back = 0
            while back < len(block):
                back += len(await asyncio.wait_for(echo.read(), 10))
            counts["echo_bytes"] += 2 * len(block)
            if now - last_vnc >= 5:
                vnc = await writer_client.open("web1", "vnc", "rw")
                shot = await rfb_capture(vnc, 30)
                vnc.reset()
                counts["screenshots"] += shot.width > 0
                last_vnc = now
            if now - last_short >= 10:
                c = await session()
                await c.list_vms()
                await c.close()
                counts["short_sessions"] += 1
                last_short = now
        except Exception as e:  # counted and shown; the soak goes on with new sessions
            counts["errors"] += 1
            errors.append("%.0f s: %r" % (time.monotonic() - started, e))
            writer_client = None
        n += 1
        await asyncio.sleep(0.25)
    report()
    for c in (writer_client, viewer_client):
        if c is not None:
            await c.close()
    await asyncio.sleep(1.0)
    print("after closing everything: RSS %d KiB, fds %d; %d short sessions; errors: %s"
          % (rss_kib(pid), fds(pid), counts["short_sessions"], errors[:5] or "none"), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between RSS lines")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vpsoak") as d:
        work = Path(d)
        pki = make_pki(work / "pki")
        vm = boot_sector_vm(work / "vm", name="web1")
        vm.start()
        agent = AgentProcess(pki, work, [("web1", vm.qmp_path)],
                             [{"identities": ["alice"], "vms": ["*"], "modes": ["force"]}])
        try:
            asyncio.run(soak(pki, agent, args.minutes, args.interval))
        finally:
            agent.stop()
            vm.terminate()


if __name__ == "__main__":
    main()
