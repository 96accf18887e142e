#!/usr/bin/env python3
"""vproxy as users run it, through `vproxy forward`, beside direct TCP, ssh -L and
stunnel, all in one run on loopback.

    python3 bench/forward_path.py [--seconds 2] [--rounds 1] [--streams 200]
                                  [--paths direct,ssh-aes128-gcm,stunnel,vnc,builtin,api]
                                  [--json FILE]

Every path ends at the same target server (bench/peers.py's: sink, source and echo
over plain TCP), and the bench talks to each through a local port, as a user's tool
would:
- direct: the target itself;
- ssh-aes128-gcm: `ssh -N -L` with aes128-gcm@openssh.com to a throwaway sshd, which
  connects to the target (bench/peers.py starts both);
- stunnel: stunnel client -> stunnel server (mutual TLS 1.3) -> the target;
- vnc: `vproxy forward 127.0.0.1:PORT vm1 vnc` (a real `python -m vproxy forward`
  process) -> the agent (a real `python -m vproxy serve` process, mutual TLS) -> its
  VNC path (query-vnc-servers, getfd with the fd by SCM_RIGHTS, add_client: one
  exchange per stream) -> a stand-in QEMU (bench/qemu_standin.py: just enough QMP,
  and each passed fd relayed to the target, as QEMU's chardev would serve it; one more
  relay hop than QEMU itself, two blocking threads per stream) -> the target;
- builtin: `vproxy forward 127.0.0.1:PORT "" sink|source|echo` (three forward
  processes) -> the agent's built-in channels: no QEMU, no target;
- api: the second row, what bench/peers.py prints: the Python API in this process
  (vproxy.client) -> the agent's built-in channels. Two processes on the path instead
  of four.

Figures per path: bulk MB/s each way (MB = 10^6 bytes; upload counts what the far end
confirmed after end of stream), 1-byte round trip through an echo (p50, p99) and the
CPU all processes on the path spent per round trip, time to first byte on a new
stream (a new local connection: through ssh -L a new channel of the live ssh
connection, through stunnel a new TLS handshake, through vproxy forward a new stream
on the live session, for vnc with its QMP exchange), and --streams local connections
at once, each echoing 64 KiB.

Prints a table and asserts nothing: compare figures within one run only; the load
average is printed with them. With --rounds N each path is measured N times, taking
turns, and the table shows the median. Installs openssh and stunnel4 when missing
(as bench/peers.py does), and stops and deletes everything it started when it ends.
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import peers  # noqa: E402  (bench/peers.py: the peers, the target, the agent, the CPU clock)

ROOT = peers.ROOT
PATHS = ("direct", "ssh-aes128-gcm", "stunnel", "vnc", "builtin", "api")
TITLES = {
    "direct": "direct TCP",
    "ssh-aes128-gcm": "ssh -L aes128-gcm",
    "stunnel": "stunnel mTLS 1.3",
    "vnc": "fwd>agent>VNC>QEMU*",
    "builtin": "fwd>agent built-in",
    "api": "API>agent built-in",
}
STREAM_SIZE = 64 * 1024
VM = "vm1"

#: a path, as the bench reaches it: kind ("s" sink, "o" source, "e" echo) -> (local
#: port, the bytes that pick the kind at the target: b"" for the built-ins)
Ends = Dict[str, Tuple[int, bytes]]


# --------------------------------------------------------------------------- starting

def start_standin(children: peers.Children, work: str, target: int) -> str:
    """bench/qemu_standin.py on WORK/vm1.qmp; the socket's path once it listens."""
    qmp = os.path.join(work, "%s.qmp" % VM)
    proc = children.start([sys.executable, os.path.join(HERE, "qemu_standin.py"), qmp, str(target)],
                          os.path.join(work, "standin.log"), stdout=subprocess.PIPE)
    if proc.stdout.readline().strip() != b"ready":
        raise RuntimeError("the QEMU stand-in did not start: %s" % peers.tail(os.path.join(work, "standin.log")))
    return qmp


def start_forward(children: peers.Children, work: str, pki: Dict[str, str], agent_address: str,
                  vm: str, channel: str) -> int:
    """`python -m vproxy forward AGENT VM CHANNEL --listen 127.0.0.1:0`; its port."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    for name in ("VPROXY_IDENTITY", "VPROXY_CERT", "VPROXY_KEY", "VPROXY_CA", "VPROXY_CLIENT_CONFIG"):
        env.pop(name, None)
    log = os.path.join(work, "forward-%s-%s.log" % (vm or "builtin", channel))
    proc = children.start([sys.executable, "-m", "vproxy", "forward", agent_address, vm, channel,
                           "--listen", "127.0.0.1:0", "--cert", pki["client_cert"], "--key", pki["client_key"],
                           "--ca", pki["ca"]], log, env=env, stdout=subprocess.PIPE)
    line = proc.stdout.readline().decode().strip()
    if not line:
        raise RuntimeError("vproxy forward %r %s printed no address: %s" % (vm, channel, peers.tail(log)))
    return int(line.rpartition(":")[2])


# --------------------------------------------------------------------------- measuring

def opener(ends: Ends) -> peers.Opener:
    """peers' measurements through these ends: the mode's first byte picks the end, and
    the end's own prefix replaces it (a built-in channel wants none, the stand-in's
    target wants the mode byte)."""
    def open_end(mode: bytes) -> socket.socket:
        port, prefix = ends[mode[:1].decode()]
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if prefix or mode[1:]:
            s.sendall(prefix + mode[1:])
        return s

    return open_end


def many_streams(ends: Ends, count: int, size: int = STREAM_SIZE) -> Dict[str, float]:
    """*count* local connections at once, each echoing *size* random bytes."""
    port, prefix = ends["e"]
    result = peers.tcp_concurrent(port, count, size, prefix)
    return {"ok": result["ok"], "ms": result["seconds"] * 1e3}


def measure_ends(ends: Ends, seconds: float, streams: int) -> Dict[str, object]:
    open_end = opener(ends)
    up = peers.tcp_upload(open_end, seconds)
    down = peers.tcp_download(open_end, seconds)
    rtt, rtt_cpu, _ = peers.with_cpu(peers.tcp_round_trips, open_end, min(seconds, 2.0))
    return {"upload_mbps": up, "download_mbps": down,
            "rtt": dict(peers.summary(rtt), cpu_us=rtt_cpu / len(rtt) * 1e6),
            "first_byte": peers.summary(peers.tcp_first_byte(open_end, peers.TTFB_COUNT)),
            "streams": many_streams(ends, streams) if streams else {}}


async def measure_api(agent, pki: Dict[str, str], seconds: float, streams: int) -> Dict[str, object]:
    """bench/peers.py's in-process figures, and --streams echo streams of 64 KiB."""
    from vproxy.client import bench as benchmark  # lazy: the bench imports vproxy only to measure it

    out = await peers.vproxy_measure(agent, pki, seconds)
    if streams:
        client = await peers.vproxy_connect(agent, pki)
        try:
            start = time.perf_counter()
            ok = await benchmark.concurrent_streams(client, streams, STREAM_SIZE)
            out["streams"] = {"ok": ok, "ms": (time.perf_counter() - start) * 1e3}
        finally:
            await client.close()
    return out


# --------------------------------------------------------------------------- report

ROWS = [
    ("upload MB/s", "upload_mbps", None, "%.0f"),
    ("download MB/s", "download_mbps", None, "%.0f"),
    ("1-byte RTT p50 us", "rtt", "p50_us", "%.0f"),
    ("1-byte RTT p99 us", "rtt", "p99_us", "%.0f"),
    ("CPU us per round trip (all)", "rtt", "cpu_us", "%.0f"),
    ("new stream, first byte p50 us", "first_byte", "p50_us", "%.0f"),
    ("new stream, first byte p99 us", "first_byte", "p99_us", "%.0f"),
    ("N streams x 64 KiB echo, ms", "streams", "ms", "%.0f"),
]


def table(results: Dict[str, List[Dict[str, object]]], paths: List[str]) -> str:
    width = 21
    lines = ["%-31s" % "metric (loopback)" + "".join("%*s" % (width, TITLES[p]) for p in paths)]
    for title, key, sub, fmt in ROWS:
        cells = []
        for p in paths:
            value = peers.median_of(results.get(p, []), key, sub)
            cells.append("%*s" % (width, fmt % value if value is not None else "-"))
        lines.append("%-31s" % title + "".join(cells))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per throughput test")
    parser.add_argument("--rounds", type=int, default=1, help="measure every path N times, taking turns")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ", ".join(PATHS))
    parser.add_argument("--streams", type=int, default=200, help="local connections at once, 64 KiB echoed each")
    parser.add_argument("--json", metavar="FILE", help="also write the raw figures here")
    args = parser.parse_args()
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(paths) - set(PATHS)
    if unknown:
        parser.error("unknown paths: %s" % ", ".join(sorted(unknown)))

    peers.install_peers(paths)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    children = peers.Children()
    results: Dict[str, List[Dict[str, object]]] = {p: [] for p in paths}
    load_before = os.getloadavg()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="vproxy-fwdbench-") as work:
        try:
            target = peers.start_target(children, work)
            pki = peers.make_pki(work)
            ends: Dict[str, Ends] = {"direct": {k: (target, k.encode()) for k in "soe"}}
            if "ssh-aes128-gcm" in paths:
                port = peers.start_ssh(children, work, target)["ssh-aes128-gcm"]
                ends["ssh-aes128-gcm"] = {k: (port, k.encode()) for k in "soe"}
            if "stunnel" in paths:
                port = peers.start_stunnel(children, work, target, pki)
                ends["stunnel"] = {k: (port, k.encode()) for k in "soe"}
            agent = None
            if {"vnc", "builtin", "api"} & set(paths):
                agent_args: List[str] = []
                if "vnc" in paths:
                    agent_args = ["--vm", "%s=%s" % (VM, start_standin(children, work, target)),
                                  "--allow", "bench"]
                agent = peers.start_agent(children, work, pki, agent_args)
                address = str(agent.address)  # set by peers.start_agent
                if "vnc" in paths:
                    port = start_forward(children, work, pki, address, VM, "vnc")
                    ends["vnc"] = {k: (port, k.encode()) for k in "soe"}
                if "builtin" in paths:
                    ends["builtin"] = {k: (start_forward(children, work, pki, address, "", name), b"")
                                       for k, name in (("s", "sink"), ("o", "source"), ("e", "echo"))}
            for round_ in range(args.rounds):
                for path in paths:
                    print("round %d/%d: %s ..." % (round_ + 1, args.rounds, TITLES[path]),
                          file=sys.stderr, flush=True)
                    if path == "api":
                        results[path].append(asyncio.run(measure_api(agent, pki, args.seconds, args.streams)))
                    else:
                        results[path].append(measure_ends(ends[path], args.seconds, args.streams))
        finally:
            children.stop_all()

    print("vproxy/bench/forward_path.py: %s; %d CPUs, load average %.1f at the start, %.1f at the end; "
          "%.0f s" % (peers.versions(), os.cpu_count() or 0, load_before[0], os.getloadavg()[0],
                      time.time() - started))
    print("median of %d round(s), %g s per throughput test, N = %d" % (args.rounds, args.seconds, args.streams))
    print(table(results, paths))
    failed = []
    for p in paths:
        for r in results[p]:
            streams = r.get("streams")
            if isinstance(streams, dict) and streams and streams["ok"] != args.streams:
                failed.append("%s %d of %d" % (TITLES[p], streams["ok"], args.streams))
    if failed:
        print("streams not intact: %s" % ", ".join(failed))
    if "vnc" in paths:
        print("* QEMU here is bench/qemu_standin.py: real QMP exchanges (getfd + add_client per stream), "
              "and one more relay hop (two threads per stream) in place of QEMU's chardev")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"paths": results, "seconds": args.seconds, "rounds": args.rounds,
                       "streams": args.streams}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
