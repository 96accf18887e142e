#!/usr/bin/env python3
"""VNC full-screen update rate through the vproxy tunnel beside a direct VNC connection.

    python3 bench/vnc_rate.py [--seconds 3] [--rounds 3] [--inflight 1,4]
                              [--paths direct,ssh,ssh-aes128-gcm,vproxy] [--accel auto|kvm|tcg]
                              [--json FILE]

The script starts everything itself, on 127.0.0.1 only, and stops and deletes it all
when it ends (or is interrupted):
- QEMU (qemu-system-x86_64; KVM when /dev/kvm really runs guest code, else TCG) with
  the boot-sector guest (vproxy/guests/bootsector.py, a 720x400 VGA text screen), a QMP
  socket and `-vnc 127.0.0.1:N`: QEMU's own VNC server, the "direct" path;
- a vproxy agent (`vproxy serve`, mutual TLS, a test PKI from tests/support/pkitools.py) that
  serves this VM; the "vproxy" path opens the VM's `vnc` channel through vproxy.api;
- the throwaway sshd and `ssh -N -L` clients of bench/peers.py (OpenSSH's default
  cipher and aes128-gcm), forwarding to QEMU's VNC port; installed with apt-get as
  root when missing, left out when they cannot be.

On every path the same minimal RFB 3.8 client (the handshake of vproxy.api, which the
screenshots use: security None, 32-bit true colour, SetEncodings [raw]) asks for
non-incremental full-screen FramebufferUpdates back to back, with K requests in flight
(--inflight), and counts the complete updates and their bytes.

How to read it:
- QEMU sends a client at most one update per display refresh, and its refresh interval
  is 30 ms while the screen changes but grows towards 3 s while it does not. So each
  update request goes with a key press that the guest echoes onto its screen, which
  keeps the screen changing; the ceiling is then about 33 updates/s (about 38 MB/s at
  720x400x4 bytes) on every path. A path that shows fewer updates/s than direct could
  not carry them in time.
- "transfer ms" is the time from an update's first byte to its last at the client: the
  figure that shows what the path itself costs per full screen.
- "CPU ms per update" adds up the CPU time of every process this script started except
  QEMU (this client, the agent, sshd and ssh) per update: QEMU's share is left out
  because the guest polls its serial port and burns a CPU all the time anyway.
- On a machine shared with other work (see the load averages printed), compare figures
  within one run only. With --rounds N each path is measured N times, taking turns, and
  the table shows the median of the rounds.

Prints a table (and, with --json, the raw figures); asserts nothing.
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
for _where in (ROOT, ROOT / "tests", ROOT / "bench"):
    if str(_where) not in sys.path:
        sys.path.insert(0, str(_where))

import peers  # noqa: E402  (bench/peers.py: the throwaway sshd, CPU accounting)
from support.agenttools import AgentProcess  # noqa: E402
from support.pkitools import make_pki  # noqa: E402
from support.vmtools import QEMU, accel_args, boot_sector_vm  # noqa: E402
from vproxy.api import connect_async, rfb_capture, rfb_handshake  # noqa: E402

VM_NAME = "bench"
PATHS = ("direct", "ssh", "ssh-aes128-gcm", "vproxy")
TITLES = {"direct": "direct", "ssh": "ssh -L (default)", "ssh-aes128-gcm": "ssh -L aes128-gcm",
          "vproxy": "vproxy"}
WARM_UP = 0.5  # seconds of updates not counted (QEMU's refresh interval settles first)
READ_CHUNK = 1 << 20
KEY_X = 0x78  # X keysym for "x": the guest draws an "X" for every one


# --------------------------------------------------------------------------- RFB over any stream

class SocketStream:
    """A plain asyncio connection with the interface of a vproxy stream: async
    readexactly / read / write (what rfb_handshake and the counter below use)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.readexactly, self.read = reader.readexactly, reader.read

    @classmethod
    async def open(cls, port: int) -> "SocketStream":
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=READ_CHUNK)
        return cls(reader, writer)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


def update_request(width: int, height: int) -> bytes:
    """A non-incremental full-screen FramebufferUpdateRequest, with a key press and
    release the guest echoes onto its screen (so QEMU keeps refreshing every 30 ms)."""
    request = struct.pack(">BBHHHH", 3, 0, 0, 0, width, height)
    key = struct.pack(">BBxxI", 4, 1, KEY_X) + struct.pack(">BBxxI", 4, 0, KEY_X)
    return request + key


async def discard(stream: Any, size: int) -> None:
    while size:
        chunk = await stream.read(min(size, READ_CHUNK))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", size)
        size -= len(chunk)


async def read_update(stream: Any) -> Tuple[int, float]:
    """Skip server messages up to and through one FramebufferUpdate; returns its pixel
    bytes and the seconds from its first byte to its last."""
    while True:
        kind = (await stream.readexactly(1))[0]
        if kind == 0:
            break
        if kind == 2:  # Bell
            continue
        if kind == 3:  # ServerCutText
            (length,) = struct.unpack(">3xI", await stream.readexactly(7))
            await discard(stream, length)
            continue
        raise RuntimeError("unexpected VNC server message type %d" % kind)
    first_byte = time.perf_counter()
    (rects,) = struct.unpack(">xH", await stream.readexactly(3))
    size = 0
    for _ in range(rects):
        _, _, w, h, encoding = struct.unpack(">HHHHi", await stream.readexactly(12))
        if encoding != 0:
            raise RuntimeError("VNC encoding %d although only raw was asked for" % encoding)
        await discard(stream, w * h * 4)
        size += w * h * 4
    return size, time.perf_counter() - first_byte


async def update_rate(stream: Any, seconds: float, inflight: int) -> Dict[str, float]:
    """Full-screen updates with *inflight* requests outstanding, for *seconds* after a
    warm-up; the stream is fresh (the RFB handshake is done here)."""
    width, height, _ = await rfb_handshake(stream)
    request = update_request(width, height)
    await stream.write(request * inflight)
    warm_until = time.perf_counter() + WARM_UP
    while time.perf_counter() < warm_until:
        await read_update(stream)
        await stream.write(request)
    updates, size, transfers = 0, 0, []
    cpu0, start = cpu_outside_qemu(), time.perf_counter()
    while time.perf_counter() - start < seconds:
        got, transfer = await read_update(stream)
        await stream.write(request)
        updates, size = updates + 1, size + got
        transfers.append(transfer)
    elapsed, cpu = time.perf_counter() - start, cpu_outside_qemu() - cpu0
    return {"updates_per_s": updates / elapsed, "mb_per_s": size / elapsed / 1e6,
            "transfer_ms_p50": statistics.median(transfers) * 1e3,
            "transfer_ms_max": max(transfers) * 1e3,
            "cpu_ms_per_update": cpu / max(updates, 1) * 1e3, "updates": updates}


# --------------------------------------------------------------------------- CPU accounting

QEMU_PID: Optional[int] = None


def process_cpu(pid: int) -> float:
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / peers.CLOCK_TICKS


def cpu_outside_qemu() -> float:
    """CPU seconds of this process and all it started (bench/peers.py's tree_cpu),
    QEMU's own left out."""
    return peers.tree_cpu() - (process_cpu(QEMU_PID) if QEMU_PID else 0.0)


# --------------------------------------------------------------------------- the peers

def start_vm(work: Path, accel: str):
    """The boot-sector guest with QEMU's VNC server on a free 127.0.0.1 port."""
    vnc_port = peers.free_port()  # an ephemeral port: always above 5900
    accel_option = accel_args(prefer_kvm=True) if accel == "auto" else ["-accel", accel]
    vm = boot_sector_vm(work / "vm", vnc=False, name=VM_NAME, extra=accel_option + [
        "-vga", "std", "-vnc", "127.0.0.1:%d" % (vnc_port - 5900)])
    vm.start()
    vm.vnc_port = vnc_port
    return vm


async def wait_for_guest_screen(port: int, timeout: float = 60.0) -> Tuple[int, int]:
    """Until the guest has painted its white-on-blue screen (SeaBIOS's is black; under
    KVM it can take seconds); returns the screen size."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            stream = await SocketStream.open(port)
        except ConnectionRefusedError:  # QEMU's QMP socket comes before its VNC one
            stream = None
        if stream is not None:
            try:
                shot = await rfb_capture(stream, 10)
            except asyncio.TimeoutError:  # a loaded machine, QEMU still starting: again
                shot = None
            finally:
                stream.close()
            red, green, blue = shot.rgb[-3:] if shot else (0, 0, 0)  # the bottom-right pixel
            if red == green == 0 and blue > 0x80:  # VGA blue (0xa8 in QEMU)
                return shot.width, shot.height
        if time.monotonic() > deadline:
            raise RuntimeError("the boot-sector guest did not paint its screen in %.0f s" % timeout)
        await asyncio.sleep(0.2)


def start_agent(work: Path, vm) -> Tuple[AgentProcess, Any]:
    pki = make_pki(work / "pki")
    agent = AgentProcess(pki, work, [(VM_NAME, vm.qmp_path)],
                         [{"identities": ["alice"], "vms": [VM_NAME], "modes": ["rw"]}])
    return agent, pki


# --------------------------------------------------------------------------- one measurement

async def measure_socket(port: int, seconds: float, inflight: int) -> Dict[str, float]:
    stream = await SocketStream.open(port)
    try:
        return await update_rate(stream, seconds, inflight)
    finally:
        stream.close()


async def measure_vproxy(agent: AgentProcess, pki, seconds: float, inflight: int) -> Dict[str, float]:
    client = await connect_async(agent.address, cert=pki.alice.cert, key=pki.alice.key,
                                 ca=pki.ca, server_name="localhost")
    try:
        stream = await client.open(VM_NAME, "vnc", wait=10)
        try:
            return await update_rate(stream, seconds, inflight)
        finally:
            stream.reset()
    finally:
        await client.close()


def measure(path: str, ports: Dict[str, int], agent, pki, seconds: float, inflight: int):
    if path == "vproxy":
        return asyncio.run(measure_vproxy(agent, pki, seconds, inflight))
    return asyncio.run(measure_socket(ports[path], seconds, inflight))


# --------------------------------------------------------------------------- report

ROWS = [
    ("full-screen updates/s", "updates_per_s", "%.1f"),
    ("MB/s", "mb_per_s", "%.1f"),
    ("transfer ms p50 (1st to last byte)", "transfer_ms_p50", "%.2f"),
    ("transfer ms max", "transfer_ms_max", "%.2f"),
    ("CPU ms per update (not QEMU)", "cpu_ms_per_update", "%.2f"),
]


def median_of(rounds: List[Dict[str, float]], key: str) -> Optional[float]:
    values = [r[key] for r in rounds if key in r]
    return statistics.median(values) if values else None


def table(results: Dict[str, Dict[str, List[Dict[str, float]]]], paths: List[str],
          inflights: List[int]) -> str:
    width = 19
    lines = []
    for inflight in inflights:
        lines.append("%-36s" % ("%d request(s) in flight" % inflight)
                     + "".join("%*s" % (width, TITLES[p]) for p in paths))
        for title, key, fmt in ROWS:
            cells = []
            for path in paths:
                value = median_of(results[str(inflight)][path], key)
                cells.append("%*s" % (width, fmt % value if value is not None else "-"))
            lines.append("  %-34s" % title + "".join(cells))
    return "\n".join(lines)


def versions() -> str:
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout
    qemu = out.splitlines()[0].replace("QEMU emulator version", "QEMU") if out else "QEMU ?"
    return "Python %s; %s" % (sys.version.split()[0], qemu)


# --------------------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement (after a %.1f s warm-up)"
                        % WARM_UP)
    parser.add_argument("--rounds", type=int, default=1, help="measure every path N times, taking turns")
    parser.add_argument("--inflight", default="1,4",
                        help="comma-separated numbers of update requests kept in flight")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help="comma-separated subset of " + ", ".join(PATHS)
                        + " (the ssh paths are left out when sshd cannot be installed)")
    parser.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                        help="QEMU accelerator (auto: KVM when it works, else TCG)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw figures here")
    args = parser.parse_args()
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(args.paths) - set(PATHS)
    if unknown:
        parser.error("unknown paths: %s" % ", ".join(sorted(unknown)))
    try:
        peers.install_peers(args.paths)  # sshd and ssh, with apt-get as root
    except SystemExit as e:
        print("%s; measuring without the ssh paths" % e, file=sys.stderr)
    if not os.path.exists(peers.SSHD) or not shutil.which("ssh"):
        args.paths = [p for p in args.paths if not p.startswith("ssh")]
    args.inflight = [int(k) for k in args.inflight.split(",") if k.strip()]
    return args


def run(args: argparse.Namespace, work: Path, children: "peers.Children", cleanup: List) -> Dict[str, Any]:
    global QEMU_PID
    vm = start_vm(work, args.accel)
    cleanup.append(vm.terminate)
    QEMU_PID = vm.pid
    width, height = asyncio.run(wait_for_guest_screen(vm.vnc_port))
    ports = {"direct": vm.vnc_port}
    agent = pki = None
    if "vproxy" in args.paths:
        agent, pki = start_agent(work, vm)
        cleanup.append(agent.stop)
    if any(p.startswith("ssh") for p in args.paths):
        ports.update(peers.start_ssh(children, str(work), vm.vnc_port))
    results = {str(k): {p: [] for p in args.paths} for k in args.inflight}
    for round_ in range(args.rounds):
        for inflight in args.inflight:
            for path in args.paths:
                print("round %d/%d, %d in flight: %s ..." % (round_ + 1, args.rounds, inflight, TITLES[path]),
                      file=sys.stderr, flush=True)
                results[str(inflight)][path].append(
                    measure(path, ports, agent, pki, args.seconds, inflight))
    return {"screen": [width, height], "accel": vm.accel, "results": results}


def main() -> int:
    args = parse_args()
    # SIGTERM ends like Ctrl-C: through the finally below, which stops everything
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load_before, started = os.getloadavg(), time.time()
    children = peers.Children()  # sshd and ssh
    cleanup: List[Any] = []  # QEMU's and the agent's stop functions
    with tempfile.TemporaryDirectory(prefix="vproxy-vnc-rate-") as work:
        try:
            out = run(args, Path(work), children, cleanup)
        finally:
            children.stop_all()
            for stop in reversed(cleanup):
                stop()
    load_after = os.getloadavg()
    print("vproxy/bench/vnc_rate.py: %s; accel %s; %d CPUs, load average %.1f at the start, "
          "%.1f at the end; %.0f s" % (versions(), out["accel"], os.cpu_count() or 0, load_before[0],
                                       load_after[0], time.time() - started))
    print("screen %dx%d, raw 32-bit pixels (%.2f MB per full screen); median of %d round(s) of %.0f s"
          % (out["screen"][0], out["screen"][1], out["screen"][0] * out["screen"][1] * 4 / 1e6,
             args.rounds, args.seconds))
    print(table(out["results"], args.paths, args.inflight))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(out, seconds=args.seconds, rounds=args.rounds, load_before=load_before,
                           load_after=load_after), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
