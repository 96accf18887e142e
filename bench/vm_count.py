#!/usr/bin/env python3
"""What an agent costs per VM: N paused QEMUs, one agent serving them all.

    .venv/bin/python bench/vm_count.py [--counts 100,1000] [--idle-seconds 10] [--settle 16]
                                       [--tree DIR[,DIR]] [--json FILE]

The script starts everything itself and stops and deletes it all when it ends (or is
interrupted, or fails):
- N QEMUs (qemu-system-x86_64 -accel tcg -machine pc -m 16 -display none -S), each
  with the boot-sector guest of vproxy/guests (one disk image, shared, locking off:
  a paused VM never writes it), COM1 on a null chardev for the agent to take over, and
  its QMP socket as DIR/vmNNNN.qmp. Paused (-S): their consoles print nothing, so the
  agent holds N empty console histories;
- one agent, ``python -m vproxy serve --vm-dir DIR --local-socket PATH --allow uid:UID``
  (local mode: no PKI), started once all N QMP sockets exist.

For each N it prints:
- discovery s: agent start until ``vproxy ls`` lists all N VMs with their console
  attached (taken over): the agent's scan of DIR, N QMP handshakes, N take-overs;
- ls s: the wall time of one ``vproxy ls unix:PATH --json`` once all are there
  (median of 3; includes the client's Python start-up, about 0.2 s);
- idle CPU %: the agent's user+system CPU over --idle-seconds, nobody connected,
  divided by that time; measured --settle seconds after the last `vproxy ls` (default
  16: the agent gives its heap back to the OS 15 s after its last session ended,
  vproxy.agent.memory, a one-off gc.collect + malloc_trim that is not idle work);
- agent RSS MiB (VmRSS) at the end of the idle period, and MiB per VM above the
  agent serving no VM (N=0, measured first);
- QEMU MiB: the mean private (anonymous) memory of one paused QEMU, from
  /proc/PID/smaps_rollup, and the host's MemAvailable at the peak.

--tree runs the agent from another source tree (e.g. ``git archive main | tar -x -C
/tmp/before``) for a before/after comparison in one run: ``--tree A,B`` measures each
N with the agent of A, then of B, with the same QEMUs. Asserts nothing.
"""

import argparse
import atexit
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vproxy.guests.bootsector import build_boot_disk  # noqa: E402

QEMU = os.environ.get("VPROXY_TEST_QEMU", "qemu-system-x86_64")
PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


class Children:
    """Every process this script started, killed (process group) on every way out."""

    def __init__(self) -> None:
        self.procs: List[subprocess.Popen] = []

    def add(self, proc: subprocess.Popen) -> subprocess.Popen:
        self.procs.append(proc)
        return proc

    def stop(self, procs: Optional[List[subprocess.Popen]] = None, sig: int = signal.SIGKILL) -> None:
        procs = self.procs if procs is None else procs
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.procs = [p for p in self.procs if p not in procs]


def cpu_seconds(pid: int) -> float:
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mib(pid: int) -> float:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def anon_mib(pid: int) -> float:
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Anonymous:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def mem_available_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return 0.0


def vproxy_ls(tree: Path, sock: Path) -> Dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "vproxy", "ls", "unix:%s" % sock, "--json"],
                         env=dict(os.environ, PYTHONPATH=str(tree)), cwd=str(tree),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    try:
        return json.loads(out.stdout)[0]
    except (ValueError, IndexError):
        return {"error": out.stderr.decode(errors="replace"), "vms": []}


def ready_count(listing: Dict[str, Any]) -> int:
    return sum(1 for vm in listing.get("vms", [])
               if vm.get("consoles") and all(c["status"] == "attached" for c in vm["consoles"]))


def measure_agent(children: Children, tree: Path, work: Path, count: int, idle: float,
                  settle: float) -> Dict[str, float]:
    sock = work / "agent.sock"
    if sock.exists():
        sock.unlink()
    vm_dir = work / "vms"
    vm_dir.mkdir(exist_ok=True)
    log = open(work / ("agent-%s-%d.log" % (tree.name, count)), "wb")
    started = time.monotonic()
    agent = children.add(subprocess.Popen(
        [sys.executable, "-m", "vproxy", "serve", "--vm-dir", str(vm_dir), "--local-socket", str(sock),
         "--allow", "uid:%d" % os.getuid()],
        env=dict(os.environ, PYTHONPATH=str(tree)), cwd=str(tree), stdin=subprocess.DEVNULL,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        while not sock.exists():
            if agent.poll() is not None:
                raise RuntimeError("the agent exited: %s" % (work / log.name).read_text())
            time.sleep(0.02)
        while True:
            listing = vproxy_ls(tree, sock)
            if ready_count(listing) >= count:
                break
            if time.monotonic() - started > 600:
                raise RuntimeError("after 600 s the agent shows %d of %d VMs: %s"
                                   % (ready_count(listing), count, listing.get("error", "")))
            time.sleep(0.2)
        discovery = time.monotonic() - started
        ls_times = []
        for _ in range(3):
            t0 = time.monotonic()
            vproxy_ls(tree, sock)
            ls_times.append(time.monotonic() - t0)
        time.sleep(settle)  # past the agent's release of the heap after its last session
        cpu0, t0 = cpu_seconds(agent.pid), time.monotonic()
        time.sleep(idle)
        cpu = (cpu_seconds(agent.pid) - cpu0) / (time.monotonic() - t0)
        return {"discovery_s": discovery, "ls_s": statistics.median(ls_times),
                "idle_cpu_pct": 100 * cpu, "rss_mib": rss_mib(agent.pid),
                "mem_available_mib": mem_available_mib()}
    finally:
        children.stop([agent], signal.SIGTERM)
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="100,1000", help="VM counts, comma-separated [100,1000]")
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--settle", type=float, default=16.0,
                    help="seconds from the last `vproxy ls` to the idle measurement [16]")
    ap.add_argument("--tree", default=str(ROOT),
                    help="source tree(s) to run the agent from, comma-separated [this one]")
    ap.add_argument("--json", dest="json_path", help="also write the raw figures here")
    args = ap.parse_args()
    counts = sorted(int(c) for c in args.counts.split(","))
    trees = [Path(t).resolve() for t in args.tree.split(",")]
    children = Children()
    work = Path(tempfile.mkdtemp(prefix="vmcount-", dir="/tmp"))

    def cleanup() -> None:
        children.stop()
        shutil.rmtree(work, ignore_errors=True)

    atexit.register(cleanup)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(1))  # through atexit
    results: List[Dict[str, Any]] = []
    print("load average %s; %s; %s" % (" ".join("%.2f" % x for x in os.getloadavg()), sys.version.split()[0],
                                       subprocess.run([QEMU, "--version"], stdout=subprocess.PIPE)
                                       .stdout.decode().splitlines()[0]))
    try:
        base = {tree: measure_agent(children, tree, work, 0, args.idle_seconds, args.settle) for tree in trees}
        vms: List[subprocess.Popen] = []
        for count in counts:
            t0 = time.monotonic()
            more = count - len(vms)
            if more > 0:  # reuse the VMs of the smaller counts
                vms += start_vms(children, work, len(vms), more)
            qemu_start = time.monotonic() - t0
            qemu_mib = statistics.mean(anon_mib(p.pid) for p in vms[:20])
            for tree in trees:
                r = measure_agent(children, tree, work, count, args.idle_seconds, args.settle)
                r.update(count=count, tree=str(tree), qemu_start_s=qemu_start, qemu_anon_mib=qemu_mib,
                         per_vm_mib=(r["rss_mib"] - base[tree]["rss_mib"]) / count,
                         load=os.getloadavg()[0])
                results.append(r)
                print("N=%d %s: %s" % (count, tree, json.dumps({k: round(v, 3) for k, v in r.items()
                                                                 if isinstance(v, float)})), flush=True)
    finally:
        print()
        print("| agent tree | VMs | discovery s | `vproxy ls` s | idle CPU % | agent RSS MiB | MiB per VM | "
              "QEMU anon MiB each | load |")
        print("|---|---|---|---|---|---|---|---|---|")
        for tree in trees:
            b = base.get(tree) if "base" in locals() else None
            if b:
                print("| %s | 0 | %.2f | %.2f | %.2f | %.1f | | | |" % (
                    tree.name, b["discovery_s"], b["ls_s"], b["idle_cpu_pct"], b["rss_mib"]))
        for r in results:
            print("| %s | %d | %.2f | %.2f | %.2f | %.1f | %.3f | %.1f | %.1f |" % (
                Path(r["tree"]).name, r["count"], r["discovery_s"], r["ls_s"], r["idle_cpu_pct"],
                r["rss_mib"], r["per_vm_mib"], r["qemu_anon_mib"], r["load"]))
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(results, indent=2))
        cleanup()
    return 0


def start_vms(children: Children, work: Path, first: int, count: int) -> List[subprocess.Popen]:
    disk = work / "boot.img"
    if not disk.exists():
        build_boot_disk(disk)
    vm_dir, logs = work / "vms", work / "logs"
    vm_dir.mkdir(exist_ok=True)
    logs.mkdir(exist_ok=True)
    """VMs vmFIRST .. (the names continue from the smaller counts)."""
    procs: List[subprocess.Popen] = []
    for i in range(first, first + count):
        name = "vm%04d" % i
        cmd = [QEMU, "-name", name, "-nodefaults", "-no-user-config", "-display", "none", "-S",
               "-accel", "tcg", "-machine", "pc", "-m", "16",
               "-drive", "file=%s,format=raw,if=ide,file.locking=off" % disk,
               "-chardev", "null,id=serial0", "-serial", "chardev:serial0",
               "-qmp", "unix:%s,server=on,wait=off" % (vm_dir / (name + ".qmp"))]
        with open(logs / (name + ".log"), "wb") as log:
            procs.append(children.add(subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)))
        if len(procs) % 50 == 0:  # let them come up in batches: 2 cores
            wait_sockets(vm_dir, logs, procs, first)
    wait_sockets(vm_dir, logs, procs, first)
    return procs


def wait_sockets(vm_dir: Path, logs: Path, procs: List[subprocess.Popen], first: int,
                  timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for i, p in enumerate(procs, first):
        sock = vm_dir / ("vm%04d.qmp" % i)
        while not sock.exists():
            if p.poll() is not None:
                raise RuntimeError("QEMU vm%04d exited: %s" % (i, (logs / ("vm%04d.log" % i)).read_text()))
            if time.monotonic() > deadline:
                raise RuntimeError("QEMU vm%04d: no QMP socket after %.0f s" % (i, timeout))
            time.sleep(0.01)


if __name__ == "__main__":
    sys.exit(main())
