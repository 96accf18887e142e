#!/usr/bin/env python3
"""vproxy beside direct TCP, ssh -L and stunnel, all measured in one run on loopback.

    python3 bench/peers.py [--seconds 3] [--rounds 1] [--idle-streams 10000]
                           [--paths direct,ssh,ssh-aes128-gcm,stunnel,vproxy] [--json FILE]

The script installs what is missing (openssh-server, openssh-client, stunnel4, with
apt-get when run as root; otherwise it says what to install), starts everything
itself, on 127.0.0.1 only, and stops and deletes it all when it ends (or is
interrupted):
- a target server (child process): sink, source and echo over plain TCP;
- a throwaway sshd (/usr/sbin/sshd -D -f <generated config>, generated host and user
  keys, a high port, loopback only, key login for the current user) and two
  `ssh -N -L` clients: OpenSSH's default cipher and aes128-gcm@openssh.com;
- stunnel (client and server instances) with mutual TLS 1.3, certificates from
  `vproxy pki`;
- a vproxy agent (`vproxy serve`), measured through the Python API (vproxy.client)
  against its built-in sink, source and echo channels.

Metrics, per path:
- single-stream throughput each way (MB = 10^6 bytes; upload counts what the far
  end confirmed after end of stream);
- 1-byte round trip through an echo, median and p99;
- time to first byte: open a new stream on the live vproxy session (a new TCP
  connection for the others: through ssh -L that is a new channel of the live ssh
  connection, through stunnel a new TLS handshake), send a byte, get its echo back;
- keystroke round trip while another stream of the same session is saturated by a
  download (vproxy: an interactive stream beside a bulk one; ssh: two channels of
  one ssh connection; direct and stunnel: two separate connections);
and once:
- agent memory per idle stream: VmRSS of the agent before and after opening
  --idle-streams idle echo streams;
- --concurrent streams at once, each echoing 16 KiB (vproxy: streams of one session;
  the others: connections);
- start-up: `python3 dist/vproxy.pyz --version` against `python3 -c pass` (median of
  15 runs each; dist/vproxy.pyz is built into the temporary directory with build.py
  when it is missing).

The CPU rows add up the CPU time of every process on the path (this one, the
forwarders with what they fork, the target, the agent): on a machine shared with
other work, wall-clock figures mostly say how much CPU each path got (a path with
four processes gets more than one with two), CPU per MB says what it costs.

Prints a table and asserts nothing: compare figures within one run only (a shared
machine's load moves them all). With --rounds N every path is measured N times,
taking turns, and the table shows the median of the rounds.
"""

import argparse
import asyncio
import functools
import getpass
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Union

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

BLOCK = 256 * 1024
MAX_SAMPLES = 20000
TTFB_COUNT = 200
SSHD = "/usr/sbin/sshd"
PATHS = ("direct", "ssh", "ssh-aes128-gcm", "stunnel", "vproxy")
TITLES = {
    "direct": "direct TCP",
    "ssh": "ssh -L (default)",
    "ssh-aes128-gcm": "ssh -L aes128-gcm",
    "stunnel": "stunnel mTLS 1.3",
    "vproxy": "vproxy",
}

TARGET_SERVER = r"""
import socket, sys, threading
srv = socket.create_server(("127.0.0.1", 0), backlog=4096)
print(srv.getsockname()[1], flush=True)
def serve(conn):
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mode = conn.recv(1)
        buf = bytearray(1 << 20)
        if mode == b"s":            # sink: count until EOF, answer the count
            total = 0
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                total += n
            conn.sendall(b"%d" % total)
        elif mode == b"o":          # source: zeros until the reader goes away
            block = bytes(256 * 1024)
            while True:
                conn.sendall(block)
        elif mode == b"e":          # echo
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                conn.sendall(buf[:n])
    except OSError:
        pass
    finally:
        conn.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


# --------------------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, log: str, timeout: float = 15.0) -> None:
    """Until port accepts a connection (the connection is closed at once)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("%s exited (%s): %s" % (what, proc.returncode, tail(log)))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("%s did not listen on port %d within %.0f s: %s" % (what, port, timeout, tail(log)))


def tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def percentile(samples: List[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, int(round(fraction * (len(ordered) - 1)))))]


def vmrss_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS for pid %d" % pid)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu() -> float:
    """CPU seconds used so far by this process and every process below it (the
    peers and whatever they forked, such as sshd's per-connection child)."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    me = os.getpid()
    total = 0
    for pid, (_ppid, ticks) in stats.items():
        seen = set()
        while pid not in seen and pid in stats:
            seen.add(pid)
            if pid == me:
                total += ticks
                break
            pid = stats[pid][0]
    return total / CLOCK_TICKS


def with_cpu(fn: Callable, *args):
    """(fn(*args), CPU seconds that all our processes used meanwhile, wall seconds)."""
    before, start = tree_cpu(), time.perf_counter()
    result = fn(*args)
    return result, tree_cpu() - before, time.perf_counter() - start


def summary(samples: List[float]) -> Dict[str, float]:
    return {"p50_us": statistics.median(samples) * 1e6, "p99_us": percentile(samples, 0.99) * 1e6,
            "samples": len(samples)}


class Children:
    """Processes this script started: all stopped at exit."""

    def __init__(self) -> None:
        self.procs: List[subprocess.Popen] = []

    def start(self, args: List[str], log: str, **kwargs) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=kwargs.pop("stdout", out),
                                    stderr=out, **kwargs)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --------------------------------------------------------------------------- peers

# what each path needs: (program, the Debian package that has it)
NEEDS = {
    "ssh": [(SSHD, "openssh-server"), ("ssh", "openssh-client")],
    "ssh-aes128-gcm": [(SSHD, "openssh-server"), ("ssh", "openssh-client")],
    "stunnel": [("stunnel4", "stunnel4")],
}


def install_peers(paths: List[str]) -> None:
    """Install the peers' programs that are missing (apt-get, as root), or say how."""
    missing = sorted({package for path in paths for program, package in NEEDS.get(path, [])
                      if not (os.path.exists(program) if "/" in program else shutil.which(program))})
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit("peers.py: missing %s: install them (apt-get install %s), or leave "
                         "their paths out with --paths" % (", ".join(missing), " ".join(missing)))
    print("installing %s ..." % ", ".join(missing), file=sys.stderr, flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    done = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends"] + missing,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise SystemExit("peers.py: apt-get install %s failed:\n%s" % (" ".join(missing), done.stdout[-2000:]))


def start_target(children: Children, work: str) -> int:
    proc = children.start([sys.executable, "-c", TARGET_SERVER], os.path.join(work, "target.log"),
                          stdout=subprocess.PIPE)
    return int(proc.stdout.readline())


def make_pki(work: str) -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=ROOT, VPROXY_PKI_DIR=os.path.join(work, "pki"))
    py = [sys.executable, "-m", "vproxy", "pki"]
    for args in (["init"], ["issue", "server", "localhost", "--ip", "127.0.0.1"],
                 ["issue", "client", "bench"]):
        subprocess.run(py + args, env=env, check=True, capture_output=True)
    pki = os.path.join(work, "pki")
    return {"dir": pki, "ca": os.path.join(pki, "ca.pem"),
            "server_cert": os.path.join(pki, "issued", "localhost.pem"),
            "server_key": os.path.join(pki, "issued", "localhost.key"),
            "client_cert": os.path.join(pki, "issued", "bench.pem"),
            "client_key": os.path.join(pki, "issued", "bench.key")}


def start_ssh(children: Children, work: str, target: int) -> Dict[str, int]:
    """A throwaway sshd and one `ssh -L` per cipher; returns the local port of each."""
    d = os.path.join(work, "ssh")
    os.makedirs(d)
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(d, name)],
                       check=True, capture_output=True)
    shutil.copy(os.path.join(d, "user.pub"), os.path.join(d, "authorized_keys"))
    port = free_port()
    config = os.path.join(d, "sshd_config")
    with open(config, "w") as f:
        f.write("\n".join([
            "Port %d" % port, "ListenAddress 127.0.0.1", "HostKey %s" % os.path.join(d, "host"),
            "PidFile none", "AuthorizedKeysFile %s" % os.path.join(d, "authorized_keys"),
            "PermitRootLogin yes", "PubkeyAuthentication yes", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
            "AllowTcpForwarding yes", "X11Forwarding no", "PrintMotd no", "LogLevel ERROR",
            "MaxStartups 100", ""]))
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
    log = os.path.join(d, "sshd.log")
    sshd = children.start([SSHD, "-D", "-e", "-f", config], log)
    wait_for_port(port, sshd, "sshd", log)
    ports = {}
    for path, cipher in (("ssh", None), ("ssh-aes128-gcm", "aes128-gcm@openssh.com")):
        local = free_port()
        args = ["ssh", "-N", "-F", "/dev/null", "-p", str(port), "-i", os.path.join(d, "user"),
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "ExitOnForwardFailure=yes",
                "-o", "LogLevel=ERROR", "-L", "127.0.0.1:%d:127.0.0.1:%d" % (local, target)]
        if cipher:
            args += ["-c", cipher]
        log = os.path.join(d, "%s.log" % path)
        proc = children.start(args + ["%s@127.0.0.1" % getpass.getuser()], log)
        wait_for_port(local, proc, "ssh -L (%s)" % path, log)
        ports[path] = local
    return ports


def start_stunnel(children: Children, work: str, target: int, pki: Dict[str, str]) -> int:
    """stunnel client -> stunnel server -> target, mutual TLS 1.3; the client's port."""
    d = os.path.join(work, "stunnel")
    os.makedirs(d)
    binary = shutil.which("stunnel4") or shutil.which("stunnel")
    if binary is None:
        raise RuntimeError("stunnel is not installed")
    server_port, client_port = free_port(), free_port()
    common = ["foreground = yes", "pid =", "debug = 3", "sslVersionMin = TLSv1.3",
              "socket = l:TCP_NODELAY=1", "socket = r:TCP_NODELAY=1"]
    server = common + ["[vproxy-bench]", "accept = 127.0.0.1:%d" % server_port,
                       "connect = 127.0.0.1:%d" % target, "cert = %s" % pki["server_cert"],
                       "key = %s" % pki["server_key"], "CAfile = %s" % pki["ca"],
                       "verifyChain = yes", "requireCert = yes"]
    client = common + ["[vproxy-bench]", "client = yes", "accept = 127.0.0.1:%d" % client_port,
                       "connect = 127.0.0.1:%d" % server_port, "cert = %s" % pki["client_cert"],
                       "key = %s" % pki["client_key"], "CAfile = %s" % pki["ca"],
                       "verifyChain = yes", "checkHost = localhost"]
    for name, lines, port in (("server", server, server_port), ("client", client, client_port)):
        config = os.path.join(d, "%s.conf" % name)
        with open(config, "w") as f:
            f.write("\n".join(lines) + "\n")
        log = os.path.join(d, "%s.log" % name)
        proc = children.start([binary, config], log)
        wait_for_port(port, proc, "stunnel %s" % name, log)
    return client_port


def start_agent(children: Children, work: str, pki: Dict[str, str], args: Sequence[str] = ()) -> subprocess.Popen:
    """`vproxy serve` as the identity localhost on a free loopback port, with *args*
    added (bench/forward_path.py adds --vm and --allow)."""
    env = dict(os.environ, PYTHONPATH=ROOT, VPROXY_PKI_DIR=pki["dir"])
    log = os.path.join(work, "agent.log")
    agent = children.start([sys.executable, "-m", "vproxy", "serve", "--identity", "localhost",
                            "--listen", "127.0.0.1:0"] + list(args), log, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(log, errors="replace") as f:
            for line in f:
                if "listening on " in line:
                    agent.address = line.split("listening on ")[1].split()[0]  # type: ignore[attr-defined]
                    return agent
        if agent.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError("the agent did not start: %s" % tail(log))


# --------------------------------------------------------------------------- socket paths

def connect(port: int, mode: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(mode)
    return s


# An opener gives a connected socket for a mode of the target server: b"s" (sink), b"o"
# (source), b"e" (echo), b"ex" (echo, with its first byte already sent). The functions
# below measure through it, so another bench (bench/forward_path.py) can reach the same
# ends through its own listeners. A port means the target's own: connect(port, mode).
Opener = Callable[[bytes], socket.socket]


def opener_for(where: Union[int, Opener]) -> Opener:
    return functools.partial(connect, where) if isinstance(where, int) else where


def tcp_upload(where: Union[int, Opener], seconds: float) -> float:
    s = opener_for(where)(b"s")
    block, sent = os.urandom(BLOCK), 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        s.sendall(block)
        sent += BLOCK
    s.shutdown(socket.SHUT_WR)
    answer = b""
    while True:
        chunk = s.recv(64)
        if not chunk:
            break
        answer += chunk
    elapsed = time.perf_counter() - start
    s.close()
    if int(answer or b"0") != sent:
        raise RuntimeError("the sink counted %r bytes, %d were sent" % (answer, sent))
    return sent / elapsed / 1e6


def tcp_download(where: Union[int, Opener], seconds: float) -> float:
    s = opener_for(where)(b"o")
    buf, got = bytearray(1 << 20), 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        n = s.recv_into(buf)
        if not n:
            raise RuntimeError("the source closed")
        got += n
    elapsed = time.perf_counter() - start
    s.close()
    return got / elapsed / 1e6


def tcp_round_trips(where: Union[int, Opener], seconds: float) -> List[float]:
    s = opener_for(where)(b"e")
    samples = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline and len(samples) < MAX_SAMPLES:
        t0 = time.perf_counter()
        s.sendall(b"x")
        if s.recv(1) != b"x":
            raise RuntimeError("bad echo")
        samples.append(time.perf_counter() - t0)
    s.close()
    return samples


def tcp_first_byte(where: Union[int, Opener], count: int) -> List[float]:
    open_end = opener_for(where)
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        s = open_end(b"ex")
        if s.recv(1) != b"x":
            raise RuntimeError("bad echo")
        samples.append(time.perf_counter() - t0)
        s.close()
    return samples


def tcp_under_load(port: int, seconds: float) -> List[float]:
    """Round trips on one connection while a download saturates another."""
    stop = threading.Event()
    loaded = connect(port, b"o")

    def drain() -> None:
        buf = bytearray(1 << 20)
        try:
            while not stop.is_set() and loaded.recv_into(buf):
                pass
        except OSError:
            pass

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    try:
        time.sleep(0.3)  # let the download fill the pipes
        return tcp_round_trips(port, seconds)
    finally:
        stop.set()
        loaded.close()
        thread.join(5)


def tcp_concurrent(port: int, count: int, size: int = 16 * 1024, prefix: bytes = b"e") -> Dict[str, float]:
    """*count* connections to *port* at once, each sending *prefix* and echoing *size*
    random bytes."""
    async def main() -> Dict[str, float]:
        async def one() -> bool:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            payload = os.urandom(size)
            writer.write(prefix + payload)
            back = await reader.readexactly(size)
            writer.close()
            return back == payload

        start = time.perf_counter()
        results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
        return {"ok": sum(1 for r in results if r is True), "seconds": time.perf_counter() - start}

    return asyncio.run(main())


def measure_socket_path(port: int, seconds: float) -> Dict[str, object]:
    up, up_cpu, up_wall = with_cpu(tcp_upload, port, seconds)
    down, down_cpu, down_wall = with_cpu(tcp_download, port, seconds)
    rtt, rtt_cpu, _ = with_cpu(tcp_round_trips, port, min(seconds, 2.0))
    return {
        "upload_mbps": up, "upload_mb_per_cpu_s": up * up_wall / max(up_cpu, 0.01),
        "download_mbps": down, "download_mb_per_cpu_s": down * down_wall / max(down_cpu, 0.01),
        "rtt": dict(summary(rtt), cpu_us=rtt_cpu / len(rtt) * 1e6),
        "first_byte": summary(tcp_first_byte(port, TTFB_COUNT)),
        "rtt_under_load": summary(tcp_under_load(port, min(seconds, 2.0))),
    }


# --------------------------------------------------------------------------- vproxy

async def vproxy_connect(agent, pki):
    from vproxy.client.connection import connect as vconnect

    return await vconnect(agent.address, cert=pki["client_cert"], key=pki["client_key"],
                          ca=pki["ca"], server_name="localhost")


async def vproxy_measure(agent, pki, seconds: float) -> Dict[str, object]:
    from vproxy.client import bench as benchmark
    from vproxy.mux import Priority

    client = await vproxy_connect(agent, pki)
    try:
        marks = [(tree_cpu(), time.perf_counter())]
        up = await benchmark.upload(client, seconds)
        marks.append((tree_cpu(), time.perf_counter()))
        down = await benchmark.download(client, seconds)
        marks.append((tree_cpu(), time.perf_counter()))
        rtt = await benchmark.round_trips(client, min(seconds, 2.0), MAX_SAMPLES)
        marks.append((tree_cpu(), time.perf_counter()))
        (up_cpu, up_wall), (down_cpu, down_wall), (rtt_cpu, _) = (
            (b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:]))
        first = []
        for _ in range(TTFB_COUNT):
            t0 = time.perf_counter()
            stream = await client.open("", "echo", priority=Priority.INTERACTIVE)
            await stream.write(b"x")
            if await stream.readexactly(1) != b"x":
                raise RuntimeError("bad echo")
            first.append(time.perf_counter() - t0)
            await stream.close()
        # keystrokes on an interactive stream while a bulk download saturates the session
        source = await client.open("", "source")

        async def drain() -> None:
            while await source.read(1 << 20):
                pass

        loader = asyncio.ensure_future(drain())
        await asyncio.sleep(0.3)
        loaded = await benchmark.round_trips(client, min(seconds, 2.0), MAX_SAMPLES)
        source.reset()
        loader.cancel()
        await asyncio.gather(loader, return_exceptions=True)
        return {"upload_mbps": up, "upload_mb_per_cpu_s": up * up_wall / max(up_cpu, 0.01),
                "download_mbps": down, "download_mb_per_cpu_s": down * down_wall / max(down_cpu, 0.01),
                "rtt": dict(summary(rtt), cpu_us=rtt_cpu / len(rtt) * 1e6),
                "first_byte": summary(first), "rtt_under_load": summary(loaded)}
    finally:
        await client.close()


async def vproxy_once(agent, pki, idle: int, concurrent: int) -> Dict[str, object]:
    """Memory per idle stream, and many concurrent streams (once per run)."""
    from vproxy.client import bench as benchmark

    out: Dict[str, object] = {}
    client = await vproxy_connect(agent, pki)
    try:
        if concurrent:
            start = time.perf_counter()
            ok = await benchmark.concurrent_streams(client, concurrent, 16 * 1024)
            out["concurrent"] = {"ok": ok, "seconds": time.perf_counter() - start}
        if idle:
            await asyncio.sleep(0.5)
            before = vmrss_kib(agent.pid)
            streams = []
            start = time.perf_counter()
            for first in range(0, idle, 500):
                streams += await asyncio.gather(*(client.open("", "echo")
                                                  for _ in range(first, min(idle, first + 500))))
            opened = time.perf_counter() - start
            await asyncio.sleep(1.0)
            after = vmrss_kib(agent.pid)
            out["idle"] = {"streams": len(streams), "rss_before_kib": before, "rss_after_kib": after,
                           "per_stream_kib": (after - before) / len(streams), "open_seconds": opened}
            for stream in streams:
                stream.reset()
    finally:
        await client.close()
    return out


# --------------------------------------------------------------------------- start-up

def startup(work: str, python: str, runs: int = 15) -> Dict[str, object]:
    pyz = os.path.join(ROOT, "dist", "vproxy.pyz")
    if not os.path.exists(pyz):
        pyz = os.path.join(work, "vproxy.pyz")
        subprocess.run([sys.executable, os.path.join(ROOT, "build.py"), "-q", "-o", pyz],
                       check=True, capture_output=True, cwd=ROOT)

    def median_ms(args: List[str]) -> float:
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run(args, check=True, capture_output=True, cwd=work)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    env_free = [python, "-I"]  # no user site, no PYTHON* variables: a bare host
    bare = median_ms(env_free + ["-c", "pass"])
    version = median_ms(env_free + [pyz, "--version"])
    return {"python": python, "pyz": pyz, "python_c_pass_ms": bare, "pyz_version_ms": version,
            "ratio": version / bare}


# --------------------------------------------------------------------------- report

def median_of(rounds: List[Dict[str, object]], key: str, sub: Optional[str] = None) -> Optional[float]:
    values = []
    for r in rounds:
        value = r.get(key)
        if sub is not None and isinstance(value, dict):
            value = value.get(sub)
        if isinstance(value, (int, float)):
            values.append(float(value))
    return statistics.median(values) if values else None


ROWS = [
    ("upload MB/s", "upload_mbps", None, "%.0f"),
    ("download MB/s", "download_mbps", None, "%.0f"),
    ("1-byte RTT p50 us", "rtt", "p50_us", "%.0f"),
    ("1-byte RTT p99 us", "rtt", "p99_us", "%.0f"),
    ("first byte, new stream p50 us", "first_byte", "p50_us", "%.0f"),
    ("first byte, new stream p99 us", "first_byte", "p99_us", "%.0f"),
    ("RTT beside a download p50 us", "rtt_under_load", "p50_us", "%.0f"),
    ("RTT beside a download p99 us", "rtt_under_load", "p99_us", "%.0f"),
    ("upload MB per CPU-second", "upload_mb_per_cpu_s", None, "%.0f"),
    ("download MB per CPU-second", "download_mb_per_cpu_s", None, "%.0f"),
    ("CPU us per 1-byte round trip", "rtt", "cpu_us", "%.0f"),
]


def table(results: Dict[str, List[Dict[str, object]]], paths: List[str]) -> str:
    width = 18
    lines = ["%-31s" % "metric (loopback)" + "".join("%*s" % (width, TITLES[p]) for p in paths)]
    for title, key, sub, fmt in ROWS:
        cells = []
        for p in paths:
            value = median_of(results.get(p, []), key, sub)
            cells.append("%*s" % (width, fmt % value if value is not None else "-"))
        lines.append("%-31s" % title + "".join(cells))
    return "\n".join(lines)


def versions() -> str:
    import ssl

    parts = ["Python %s" % sys.version.split()[0], ssl.OPENSSL_VERSION]
    try:
        out = subprocess.run(["ssh", "-V"], capture_output=True, text=True)
        parts.append((out.stderr or out.stdout).strip().split(",")[0])
    except OSError:
        pass
    return "; ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput test")
    parser.add_argument("--rounds", type=int, default=1, help="measure every path N times, taking turns")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ", ".join(PATHS))
    parser.add_argument("--idle-streams", type=int, default=10000)
    parser.add_argument("--concurrent", type=int, default=1000)
    parser.add_argument("--python",
                        default="/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable,
                        help="interpreter for the start-up figures (default: the system python3)")
    parser.add_argument("--no-startup", action="store_true")
    parser.add_argument("--json", metavar="FILE", help="also write the raw figures here")
    args = parser.parse_args()
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(paths) - set(PATHS)
    if unknown:
        parser.error("unknown paths: %s" % ", ".join(sorted(unknown)))

    install_peers(paths)
    # SIGTERM ends like Ctrl-C: through the finally below, which stops every child
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    children = Children()
    results: Dict[str, List[Dict[str, object]]] = {p: [] for p in paths}
    extra: Dict[str, object] = {}
    load_before = os.getloadavg()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="vproxy-peers-") as work:
        try:
            target = start_target(children, work)
            pki = make_pki(work)
            ports: Dict[str, int] = {"direct": target}
            if "ssh" in paths or "ssh-aes128-gcm" in paths:
                ports.update(start_ssh(children, work, target))
            if "stunnel" in paths:
                ports["stunnel"] = start_stunnel(children, work, target, pki)
            agent = start_agent(children, work, pki) if "vproxy" in paths else None
            for round_ in range(args.rounds):
                for path in paths:
                    print("round %d/%d: %s ..." % (round_ + 1, args.rounds, TITLES[path]),
                          file=sys.stderr, flush=True)
                    if path == "vproxy":
                        results[path].append(asyncio.run(vproxy_measure(agent, pki, args.seconds)))
                    else:
                        results[path].append(measure_socket_path(ports[path], args.seconds))
            if args.concurrent:
                print("%d concurrent streams ..." % args.concurrent, file=sys.stderr, flush=True)
                concurrent = {}
                for path in paths:
                    if path != "vproxy":
                        concurrent[path] = tcp_concurrent(ports[path], args.concurrent)
                extra["concurrent"] = concurrent
            if agent is not None and (args.idle_streams or args.concurrent):
                print("vproxy: %d idle streams ..." % args.idle_streams, file=sys.stderr, flush=True)
                once = asyncio.run(vproxy_once(agent, pki, args.idle_streams, args.concurrent))
                if "concurrent" in once:
                    extra.setdefault("concurrent", {})["vproxy"] = once["concurrent"]  # type: ignore[index]
                if "idle" in once:
                    extra["idle"] = once["idle"]
            if not args.no_startup:
                print("start-up ...", file=sys.stderr, flush=True)
                extra["startup"] = startup(work, args.python)
        finally:
            children.stop_all()

    print("vproxy/bench/peers.py: %s; %d CPUs, load average %.1f at the start, %.1f at the end; "
          "%.0f s" % (versions(), os.cpu_count() or 0, load_before[0], os.getloadavg()[0],
                      time.time() - started))
    print("median of %d round(s), %.0f s per throughput test" % (args.rounds, args.seconds))
    print(table(results, paths))
    concurrent = extra.get("concurrent") or {}
    if concurrent:
        print("%d concurrent streams echoing 16 KiB each (s, all intact?): %s" % (
            args.concurrent, ", ".join("%s %.2f%s" % (TITLES[p], r["seconds"], "" if r["ok"] == args.concurrent
                                                       else " (%d ok)" % r["ok"])
                                        for p, r in concurrent.items())))
    idle = extra.get("idle")
    if idle:
        print("vproxy agent RSS: %.1f MiB, with %d idle streams %.1f MiB: %.1f KiB per stream "
              "(opened in %.1f s)" % (idle["rss_before_kib"] / 1024, idle["streams"],
                                      idle["rss_after_kib"] / 1024, idle["per_stream_kib"],
                                      idle["open_seconds"]))
    start = extra.get("startup")
    if start:
        print("start-up (%s, median of 15): python3 -c pass %.1f ms, vproxy.pyz --version %.1f ms "
              "(%.1fx)" % (start["python"], start["python_c_pass_ms"], start["pyz_version_ms"],
                           start["ratio"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"paths": results, "extra": extra, "seconds": args.seconds,
                       "rounds": args.rounds}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
