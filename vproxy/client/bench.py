"""`vproxy bench`: check a link to an agent and measure the mux (iperf-like).

Uses the agent's built-in channels: sink (upload), source (download), echo (latency
and concurrent streams). Returns plain numbers; the CLI formats them.
"""

import asyncio
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import List

from .connection import AgentClient
from vproxy.mux import Priority

BLOCK = 256 * 1024


@dataclass
class BenchResult:
    upload_mbps: float  # megabytes (10^6) per second, client -> agent
    download_mbps: float  # agent -> client
    rtt_p50_us: float  # 1-byte round trip through an echo stream
    rtt_p99_us: float
    rtt_samples: int
    ping_us: float  # session-level PING round trip
    streams: int  # concurrent echo streams opened
    streams_ok: int  # of those, how many echoed their data intact
    streams_seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


async def upload(client: AgentClient, seconds: float) -> float:
    stream = await client.open("", "sink")
    block = os.urandom(BLOCK)
    sent = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        await stream.write(block)
        sent += len(block)
    await stream.close()
    answer = await stream.read()
    elapsed = time.perf_counter() - start
    if int(answer or b"0") != sent:
        raise RuntimeError("the agent's sink counted %r bytes, we sent %d" % (answer, sent))
    return sent / elapsed / 1e6


async def download(client: AgentClient, seconds: float) -> float:
    stream = await client.open("", "source")
    received = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        chunk = await stream.read(1 << 20)
        if not chunk:
            break
        received += len(chunk)
    elapsed = time.perf_counter() - start
    stream.reset()
    return received / elapsed / 1e6


async def round_trips(client: AgentClient, seconds: float, max_samples: int = 20000) -> List[float]:
    stream = await client.open("", "echo", priority=Priority.INTERACTIVE)
    samples: List[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline and len(samples) < max_samples:
        t0 = time.perf_counter()
        await stream.write(b"x")
        await stream.readexactly(1)
        samples.append(time.perf_counter() - t0)
    await stream.close()
    return samples


async def concurrent_streams(client: AgentClient, count: int, size: int = 64 * 1024) -> int:
    async def one(index: int) -> bool:
        payload = os.urandom(size)
        stream = await client.open("", "echo")
        await stream.write(payload)
        await stream.close()
        back = bytearray()
        while True:
            chunk = await stream.read()
            if not chunk:
                break
            back += chunk
        return bytes(back) == payload

    results = await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
    return sum(1 for r in results if r is True)


def percentile(samples: List[float], fraction: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, int(round(fraction * (len(ordered) - 1)))))
    return ordered[index]


async def run(client: AgentClient, seconds: float = 2.0, streams: int = 100) -> BenchResult:
    up = await upload(client, seconds)
    down = await download(client, seconds)
    samples = await round_trips(client, min(seconds, 2.0))
    ping = await client.ping()
    start = time.perf_counter()
    ok = await concurrent_streams(client, streams)
    return BenchResult(
        upload_mbps=round(up, 1),
        download_mbps=round(down, 1),
        rtt_p50_us=round(statistics.median(samples) * 1e6, 1),
        rtt_p99_us=round(percentile(samples, 0.99) * 1e6, 1),
        rtt_samples=len(samples),
        ping_us=round(ping * 1e6, 1),
        streams=streams,
        streams_ok=ok,
        streams_seconds=round(time.perf_counter() - start, 3),
    )
