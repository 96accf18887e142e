#!/usr/bin/env python3
"""Where a 1-byte round trip through `vproxy forward` spends its time, per process.

    python3 bench/forward_rtt_profile.py [--count 5000] [--paths vnc,builtin] [--no-strace]

Starts what bench/forward_path.py starts for its vnc and builtin paths (the target,
the QEMU stand-in, `vproxy serve`, `vproxy forward` processes), then for each path
runs --count 1-byte round trips on one connection, twice:
- without tracing: the CPU time (user and system, from /proc/PID/stat) each process
  on the path spent, per round trip;
- under `strace -f -c` (all threads of each process, and those started later; strace slows everything, so only
  its counts are reported): the system calls per round trip of each process, and the
  most frequent ones.
Prints per process figures; asserts nothing. Compare within one run; the load average
is printed.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import forward_path  # noqa: E402  (bench/forward_path.py: starting the path, the round trips)
import peers  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu(pids: List[int]) -> Tuple[float, float]:
    """(user, system) CPU seconds of the processes *pids*, all their threads."""
    user = system = 0
    for pid in pids:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def with_descendants(pid: int) -> List[int]:
    """*pid* and every process below it (sshd's per-connection children)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found = [pid]
    for candidate in parent:
        seen, p = set(), candidate
        while p in parent and p not in seen and p != pid:
            seen.add(p)
            p = parent[p]
        if p == pid and candidate != pid:
            found.append(candidate)
    return found


def round_trips(ends: forward_path.Ends, count: int) -> float:
    s = forward_path.opener(ends)(b"e")
    start = time.perf_counter()
    for _ in range(count):
        s.sendall(b"x")
        if s.recv(1) != b"x":
            raise RuntimeError("bad echo")
    elapsed = time.perf_counter() - start
    s.close()
    return elapsed


def strace_counts(pids: Dict[str, List[int]], ends: forward_path.Ends, count: int, work: str) -> Dict[str, List]:
    """name -> [total calls, [(syscall, calls), ...]] under strace -c for *count* round trips."""
    tracers = {}
    for name, group in pids.items():
        out = os.path.join(work, "strace-%s.txt" % name)
        tids = sorted(tid for pid in group for tid in os.listdir("/proc/%d/task" % pid))
        args = ["strace", "-f", "-c", "-q", "-o", out] + [a for tid in tids for a in ("-p", tid)]
        tracers[name] = (subprocess.Popen(args, stderr=subprocess.DEVNULL), out)
    time.sleep(1.0)  # attached
    round_trips(ends, count)
    time.sleep(0.3)
    result = {}
    for name, (proc, out) in tracers.items():
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        calls = []
        with open(out) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 5 and re.match(r"^[\d.]+$", fields[0]) and fields[-1] != "total":
                    calls.append((fields[-1], int(fields[3])))
        result[name] = [sum(n for _, n in calls), sorted(calls, key=lambda c: -c[1])]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--paths", default="ssh-aes128-gcm,vnc,builtin",
                        help="a subset of ssh-aes128-gcm, vnc, builtin")
    parser.add_argument("--no-strace", action="store_true")
    args = parser.parse_args()
    paths = [p for p in args.paths.split(",") if p]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    children = peers.Children()
    load = os.getloadavg()[0]
    lines = []
    with tempfile.TemporaryDirectory(prefix="vproxy-rttprof-") as work:
        try:
            target = peers.start_target(children, work)
            pki = peers.make_pki(work)
            standin = forward_path.start_standin(children, work, target)
            agent = peers.start_agent(children, work, pki, ["--vm", "%s=%s" % (forward_path.VM, standin),
                                                            "--allow", "bench"])
            procs = {"target": children.procs[0].pid, "standin": children.procs[1].pid, "agent": agent.pid}
            ends: Dict[str, forward_path.Ends] = {}
            fwd_pid: Dict[str, int] = {}
            for path in paths:
                if path == "ssh-aes128-gcm":
                    first = len(children.procs)
                    ends[path] = {"e": (peers.start_ssh(children, work, target)[path], b"e")}
                    procs["sshd"] = children.procs[first].pid
                    fwd_pid[path] = children.procs[-1].pid
                    continue
                if path == "vnc":
                    port = forward_path.start_forward(children, work, pki, agent.address, forward_path.VM, "vnc")
                    ends[path] = {"e": (port, b"e")}
                else:
                    port = forward_path.start_forward(children, work, pki, agent.address, "", "echo")
                    ends[path] = {"e": (port, b"")}
                fwd_pid[path] = children.procs[-1].pid
            for path in paths:
                round_trips(ends[path], 200)  # warm (and sshd forks its connection's children)
                if path == "ssh-aes128-gcm":
                    on_path = {"bench": [os.getpid()], "ssh -L": [fwd_pid[path]],
                               "sshd": with_descendants(procs["sshd"]), "target": [procs["target"]]}
                else:
                    on_path = {"bench": [os.getpid()], "forward": [fwd_pid[path]], "agent": [procs["agent"]]}
                    if path == "vnc":
                        on_path.update(standin=[procs["standin"]], target=[procs["target"]])
                before = {n: cpu(p) for n, p in on_path.items()}
                elapsed = round_trips(ends[path], args.count)
                after = {n: cpu(p) for n, p in on_path.items()}
                lines.append("%s: %d round trips, %.0f us each (wall)" % (
                    forward_path.TITLES[path], args.count, elapsed / args.count * 1e6))
                counts = {} if args.no_strace else strace_counts(
                    {n: p for n, p in on_path.items() if n != "bench"}, ends[path], args.count, work)
                for name in on_path:
                    user = (after[name][0] - before[name][0]) / args.count * 1e6
                    system = (after[name][1] - before[name][1]) / args.count * 1e6
                    line = "  %-8s CPU %5.0f us per round trip (user %4.0f, system %4.0f)" % (
                        name, user + system, user, system)
                    if name in counts:
                        total, top = counts[name]
                        line += "; %4.1f system calls per round trip: %s" % (
                            total / args.count, ", ".join("%s %.1f" % (c, n / args.count) for c, n in top[:6]))
                    lines.append(line)
        finally:
            children.stop_all()
    print("vproxy/bench/forward_rtt_profile.py: %s; load average %.1f at the start, %.1f at the end"
          % (peers.versions(), load, os.getloadavg()[0]))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
