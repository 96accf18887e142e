"""One-way throughput over loopback: vproxy.net.transport vs asyncio's TLS vs plain TCP.

"vproxy session" is one stream of a vproxy/1 session (vproxy.net.session over
vproxy.net.transport): the sender writes blocks to the stream, the receiver reads it
with Stream.read(); next to "vproxy.transport" it shows what the mux costs.

The fourth path, "blocking SSLSocket" (sendall / recv_into a 256 KiB buffer, one
process each end, no event loop), is the ceiling for OpenSSL on a socket from Python.

    python3 bench/transport_bench.py [--seconds 3] [--rounds 3] [--same-process]

For each path a receiver (a trivial sink protocol: counts bytes) listens on 127.0.0.1
and a sender writes blocks for --seconds, honouring pause_writing/resume_writing, then
closes. The receiver reports bytes / time from its first byte to the sender's EOF.
The paths take turns, --rounds times, and each gets its median and best: a shared
machine's load comes and goes, and this way it falls on all paths alike.
By default the receiver runs in a child process (two cores, as ssh -L or stunnel
would use); --same-process runs both ends on one event loop (one core).

TLS paths use TLS 1.3 with mutual authentication (vproxy.security.tls contexts, a throwaway
CA made with vproxy.security.pki, so the `cryptography` package is needed). Prints figures,
asserts nothing; compare figures within one run.
"""

import argparse
import asyncio
import multiprocessing
import os
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vproxy.net import transport  # noqa: E402
from vproxy.security import tls  # noqa: E402

BLOCKING = "blocking SSLSocket"
SESSION = "vproxy session"  # one mux stream on a Session over vproxy.net.transport
PATHS = ("vproxy.transport", SESSION, "asyncio ssl", "plain TCP", BLOCKING)


# --------------------------------------------------------------------------- PKI

def make_certs(directory: str) -> Tuple[Tuple[str, str], Tuple[str, str], str]:
    """(server cert, key), (client cert, key), CA path."""
    from vproxy.security import pki

    ca_dir = Path(directory) / "ca"
    ca = pki.init_ca(ca_dir, common_name="bench CA")
    server = pki.issue(ca_dir, "localhost", "server", dns_names=["localhost"],
                       ip_addresses=["127.0.0.1"])
    client = pki.issue(ca_dir, "bench", "client")
    return (str(server[0]), str(server[1])), (str(client[0]), str(client[1])), str(ca)


def contexts(certs) -> Tuple[ssl.SSLContext, ssl.SSLContext]:
    server, client, ca = certs
    return tls.server_context(server[0], server[1], ca), tls.client_context(client[0], client[1], ca)


# --------------------------------------------------------------------------- protocols

class Sink(asyncio.Protocol):
    """Counts bytes; `done` gets (bytes, seconds from first byte to EOF or loss,
    CPU seconds of this process meanwhile)."""

    def __init__(self) -> None:
        self.count = 0
        self.first: Optional[float] = None
        self.first_cpu = 0.0
        self.done = asyncio.get_event_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if self.first is None:
            self.first = time.perf_counter()
            self.first_cpu = time.process_time()
        self.count += len(data)

    def eof_received(self) -> bool:
        self._finish()
        return False

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            elapsed = time.perf_counter() - (self.first or time.perf_counter())
            cpu = time.process_time() - self.first_cpu if self.first else 0.0
            self.done.set_result((self.count, elapsed, cpu))


class Sender(asyncio.Protocol):
    """Writes `block` while not paused, until `seconds` have passed; then closes."""

    def __init__(self, block: bytes, seconds: float) -> None:
        self.block = block
        self.seconds = seconds
        self.deadline = 0.0
        self.paused = False
        self.transport: Optional[asyncio.Transport] = None
        self.sent = 0
        self.closed = asyncio.get_event_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.deadline = time.perf_counter() + self.seconds
        self._pump()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        asyncio.get_event_loop().call_soon(self._pump)  # do not recurse into write()

    def _pump(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        while not self.paused:
            if time.perf_counter() >= self.deadline:
                t.close()
                return
            t.write(self.block)
            self.sent += len(self.block)

    def connection_lost(self, exc) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)


# --------------------------------------------------------------------------- paths

async def listen(path: str, server_ctx: ssl.SSLContext, factory: Callable[[], Sink]):
    loop = asyncio.get_running_loop()
    if path in ("vproxy.transport", SESSION):
        return await transport.start_server(factory, "127.0.0.1", 0, server_ctx)
    ssl_arg = server_ctx if path == "asyncio ssl" else None
    return await loop.create_server(factory, "127.0.0.1", 0, ssl=ssl_arg)


async def connect(path: str, client_ctx: ssl.SSLContext, port: int, factory):
    loop = asyncio.get_running_loop()
    if path in ("vproxy.transport", SESSION):
        return await transport.create_connection(factory, "127.0.0.1", port, client_ctx,
                                                 "localhost")
    if path == "asyncio ssl":
        return await loop.create_connection(factory, "127.0.0.1", port, ssl=client_ctx,
                                            server_hostname="localhost")
    return await loop.create_connection(factory, "127.0.0.1", port)


async def receive_one(path: str, certs, ports, results) -> None:
    """Child (or task): listen, tell the port, receive one connection, report."""
    server_ctx, _ = contexts(certs)
    sinks = []

    def factory() -> Sink:
        sink = Sink()
        sinks.append(sink)
        return sink

    if path == SESSION:
        factory = _session_sink_factory(sinks)  # type: ignore[assignment]

    server = await listen(path, server_ctx, factory)
    ports.put(server.sockets[0].getsockname()[1])
    while not sinks:
        await asyncio.sleep(0.01)
    result = await sinks[0].done
    server.close()
    results.put(result)


def _receiver_process(path, certs, ports, results) -> None:
    if path == BLOCKING:
        blocking_receive(certs, ports, results)
    else:
        asyncio.run(receive_one(path, certs, ports, results))


def blocking_receive(certs, ports, results) -> None:
    server_ctx, _ = contexts(certs)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ports.put(listener.getsockname()[1])
        conn, _ = listener.accept()
    with server_ctx.wrap_socket(conn, server_side=True) as sock:
        buffer = bytearray(256 * 1024)
        count = 0
        n = sock.recv_into(buffer)
        first, first_cpu = time.perf_counter(), time.process_time()
        while n:
            count += n
            try:
                n = sock.recv_into(buffer)
            except OSError:  # the sender closed without close_notify
                break
        results.put((count, time.perf_counter() - first, time.process_time() - first_cpu))


def blocking_send(certs, port: int, seconds: float, block: bytes) -> float:
    _, client_ctx = contexts(certs)
    raw = socket.create_connection(("127.0.0.1", port))
    with client_ctx.wrap_socket(raw, server_hostname="localhost") as sock:
        cpu = time.process_time()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            sock.sendall(block)
        return time.process_time() - cpu


def _session_sink_factory(sinks: list):
    """Sessions whose first stream is read to its end like Sink counts bytes."""
    from vproxy.net.session import Session

    async def on_open(stream) -> None:
        sink = Sink()
        sinks.append(sink)
        stream.accept()
        while True:
            data = await stream.read(1 << 20)
            if not data:
                break
            sink.data_received(data)
        sink.eof_received()
        await stream.close()

    return lambda: Session(client=False, on_open=on_open)


async def send_session(certs, port: int, seconds: float, block: bytes) -> float:
    from vproxy.mux import OpenRequest
    from vproxy.net.session import Session

    _, client_ctx = contexts(certs)
    _, session = await transport.create_connection(
        lambda: Session(client=True), "127.0.0.1", port, client_ctx, "localhost")
    stream = await session.open(OpenRequest("", "sink"))
    cpu = time.process_time()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        await stream.write(block)
    await stream.close()
    await asyncio.wait_for(stream.read(), 30)  # the receiver's close: all was read
    cpu = time.process_time() - cpu
    session.close()
    await session.wait_closed()
    return cpu


async def send_one(path: str, certs, port: int, seconds: float, block: bytes) -> float:
    """Send for `seconds`; returns the CPU seconds this process spent meanwhile."""
    if path == SESSION:
        return await send_session(certs, port, seconds, block)
    _, client_ctx = contexts(certs)
    _, sender = await connect(path, client_ctx, port, lambda: Sender(block, seconds))
    cpu = time.process_time()
    await asyncio.wait_for(sender.closed, seconds + 30)
    return time.process_time() - cpu


Result = Tuple[int, float, float, float]  # bytes, wall s, sender CPU s, receiver CPU s


def run_two_processes(path: str, certs, seconds: float, block: bytes) -> Result:
    mp = multiprocessing.get_context("fork")
    ports, results = mp.Queue(), mp.Queue()
    child = mp.Process(target=_receiver_process, args=(path, certs, ports, results))
    child.start()
    try:
        port = ports.get(timeout=30)
        if path == BLOCKING:
            sender_cpu = blocking_send(certs, port, seconds, block)
        else:
            sender_cpu = asyncio.run(send_one(path, certs, port, seconds, block))
        count, elapsed, receiver_cpu = results.get(timeout=seconds + 30)
        return count, elapsed, sender_cpu, receiver_cpu
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()


def run_same_process(path: str, certs, seconds: float, block: bytes) -> Result:
    import queue

    async def both() -> Result:
        ports, results = queue.Queue(), queue.Queue()
        receiver = asyncio.ensure_future(receive_one(path, certs, ports, results))
        while ports.empty():
            await asyncio.sleep(0.01)
        await send_one(path, certs, ports.get(), seconds, block)
        await receiver
        count, elapsed, cpu = results.get()
        return count, elapsed, cpu, cpu  # one process: both ends' CPU time, each time

    return asyncio.run(both())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of each path, taking turns (default 3)")
    parser.add_argument("--block", type=int, default=256 * 1024,
                        help="bytes per write() (default 256 KiB)")
    parser.add_argument("--same-process", action="store_true",
                        help="both ends on one event loop (one core)")
    parser.add_argument("--only", choices=PATHS, action="append",
                        help="run only this path (repeatable)")
    args = parser.parse_args()

    block = os.urandom(args.block)
    run = run_same_process if args.same_process else run_two_processes
    paths = [p for p in args.only or PATHS if not (args.same_process and p == BLOCKING)]
    print("one-way throughput, %d rounds of %.0f s, %d-byte writes, %s; Python %s, %s" % (
        args.rounds, args.seconds, args.block,
        "sender and receiver on one event loop" if args.same_process
        else "receiver in a child process",
        sys.version.split()[0], ssl.OPENSSL_VERSION))
    with tempfile.TemporaryDirectory() as directory:
        certs = make_certs(directory)
        wall: Dict[str, List[float]] = {path: [] for path in paths}
        cpu: Dict[str, List[Tuple[float, float]]] = {path: [] for path in paths}
        for _ in range(args.rounds):
            for path in paths:
                count, elapsed, sender_cpu, receiver_cpu = run(path, certs, args.seconds, block)
                wall[path].append(count / elapsed / 1e6 if elapsed else 0.0)
                cpu[path].append((count / sender_cpu / 1e6 if sender_cpu else 0.0,
                                  count / receiver_cpu / 1e6 if receiver_cpu else 0.0))
    print("  MB/s over wall-clock time, median and best of the rounds; MB per CPU-second")
    print("  of each end (median): what one end would do with a core of its own (the")
    print("  steal time of a shared machine does not count there)%s" % (
        "; one process: CPU of both ends" if args.same_process else ""))
    print("  %-18s %7s %7s %12s %12s   %s" % ("path", "median", "best", "sender/CPU",
                                            "receiver/CPU", "each round, MB/s"))
    for path in paths:
        mbps = wall[path]
        print("  %-18s %7.0f %7.0f %12.0f %12.0f   %s" % (
            path, statistics.median(mbps), max(mbps),
            statistics.median(c[0] for c in cpu[path]),
            statistics.median(c[1] for c in cpu[path]),
            " ".join("%.0f" % x for x in mbps)))

if __name__ == "__main__":
    main()
