#!/usr/bin/env python3
"""vproxy bench beside a direct TCP connection, measured in the same run (loopback).

    python3 bench/link.py [--seconds 3]

Prints a table; asserts nothing. The direct path is a plain TCP sink/echo server in a
child process, measured the same way vproxy bench measures the tunnel: one stream's
throughput each way and the 1-byte round trip (median, p99).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = 256 * 1024

DIRECT_SERVER = r"""
import socket, sys, threading
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
def serve(conn):
    mode = conn.recv(1)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(1 << 20)
    if mode == b"s":            # sink
        while conn.recv_into(buf):
            pass
    elif mode == b"o":          # source
        block = bytes(256 * 1024)
        try:
            while True:
                conn.sendall(block)
        except OSError:
            pass
    else:                       # echo
        while True:
            n = conn.recv_into(buf)
            if not n:
                break
            conn.sendall(buf[:n])
    conn.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def direct(port, seconds):
    def conn(mode):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(mode)
        return s

    s = conn(b"s")
    block, sent, start = os.urandom(BLOCK), 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        s.sendall(block)
        sent += BLOCK
    s.close()
    up = sent / (time.perf_counter() - start) / 1e6
    s = conn(b"o")
    buf, got, start = bytearray(1 << 20), 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        got += s.recv_into(buf)
    down = got / (time.perf_counter() - start) / 1e6
    s.close()
    s = conn(b"e")
    samples, deadline = [], time.perf_counter() + min(seconds, 2)
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        s.sendall(b"x")
        s.recv(1)
        samples.append(time.perf_counter() - t0)
    s.close()
    samples.sort()
    return {"upload_mbps": up, "download_mbps": down,
            "rtt_p50_us": statistics.median(samples) * 1e6,
            "rtt_p99_us": samples[int(0.99 * (len(samples) - 1))] * 1e6}


def vproxy(seconds, work):
    env = dict(os.environ, PYTHONPATH=ROOT, VPROXY_PKI_DIR=os.path.join(work, "pki"))
    py = [sys.executable, "-m", "vproxy"]
    for args in (["pki", "init"], ["pki", "issue", "server", "localhost", "--ip", "127.0.0.1"],
                 ["pki", "issue", "client", "bench"]):
        subprocess.run(py + args, env=env, check=True, capture_output=True)
    agent = subprocess.Popen(py + ["serve", "--identity", "localhost", "--listen", "127.0.0.1:0"],
                             env=env, stderr=subprocess.PIPE, text=True)
    try:
        address = agent.stderr.readline().split("listening on ")[1].strip()
        out = subprocess.run(py + ["bench", address, "--identity", "bench", "--seconds", str(seconds),
                                   "--json"], env=env, check=True, capture_output=True, text=True)
        return json.loads(out.stdout)
    finally:
        agent.terminate()
        agent.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    server = subprocess.Popen([sys.executable, "-c", DIRECT_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        d = direct(port, args.seconds)
    finally:
        server.kill()
    with tempfile.TemporaryDirectory() as work:
        v = vproxy(args.seconds, work)
    print("%-28s %12s %12s %14s %14s" % ("path (loopback)", "up MB/s", "down MB/s", "RTT p50 us", "RTT p99 us"))
    for name, r in (("direct TCP", d), ("vproxy (mTLS, mux)", v)):
        print("%-28s %12.1f %12.1f %14.1f %14.1f" % (name, r["upload_mbps"], r["download_mbps"],
                                                      r["rtt_p50_us"], r["rtt_p99_us"]))


if __name__ == "__main__":
    main()
