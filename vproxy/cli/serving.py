"""The long-running parts of `serve` and `bench`: signals, readiness, output."""

import asyncio
import json
import logging
import signal
import sys
from typing import Dict, Optional

import click

from .common import EXIT_UNREACHABLE


async def run_agent(agent, audit_path: Optional[str] = None) -> int:
    if audit_path:
        handler = logging.FileHandler(audit_path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        audit = logging.getLogger("vproxy.audit")
        audit.addHandler(handler)
        audit.propagate = False
    logging.getLogger("vproxy.audit").setLevel(logging.INFO)
    await agent.start()
    stop = asyncio.Event()
    loop = asyncio.get_event_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for address in agent.addresses:
        click.echo("vproxy: listening on %s" % address, err=True)
    await stop.wait()
    click.echo("vproxy: shutting down: draining %d session(s)" % len(agent.sessions), err=True)
    await agent.shutdown()
    return 0


async def run_bench(host: str, paths: Dict[str, Optional[str]], seconds: float, streams: int,
                    as_json: bool) -> int:
    from .. import benchmark
    from ..client import connect
    from ..errors import SessionClosed

    client = await connect(host, **paths)
    try:
        result = await benchmark.run(client, seconds, streams)
    except SessionClosed as e:
        click.echo("vproxy: error: the session to %s ended: %s" % (host, e.reason), err=True)
        return EXIT_UNREACHABLE
    finally:
        await client.close()
    if as_json:
        click.echo(json.dumps(result.as_dict()))
    else:
        r = result
        click.echo("vproxy bench %s" % host)
        click.echo("  upload      %9.1f MB/s" % r.upload_mbps)
        click.echo("  download    %9.1f MB/s" % r.download_mbps)
        click.echo("  round trip  %9.1f us median, %.1f us p99 (%d samples, 1 byte)"
                   % (r.rtt_p50_us, r.rtt_p99_us, r.rtt_samples))
        click.echo("  ping        %9.1f us" % r.ping_us)
        click.echo("  streams     %9d of %d echoed intact in %.3f s"
                   % (r.streams_ok, r.streams, r.streams_seconds))
    return 0 if result.streams_ok == result.streams else 1
