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


async def run_bench(target, seconds: float, streams: int, as_json: bool) -> int:
    """target: a vproxy.clientconfig.Target (cli.common.resolve_client)."""
    from .. import benchmark
    from ..errors import SessionClosed

    host = target.name
    client = await target.connect()
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


async def run_ls(targets, as_json: bool) -> int:
    """targets: vproxy.clientconfig.Target objects (cli.common.resolve_client)."""
    from ..errors import UserError

    async def one(target):
        host = target.name
        try:
            client = await target.connect()
        except UserError as e:
            return {"host": host, "error": e.message, "vms": []}
        try:
            return {"host": host, "error": "", "vms": await client.list_vms()}
        finally:
            await client.close()

    results = await asyncio.gather(*(one(t) for t in targets))
    if as_json:
        click.echo(json.dumps(list(results), indent=2))
    else:
        for result in results:
            click.echo(format_listing(result))
    return 0 if all(not r["error"] for r in results) else EXIT_UNREACHABLE


def format_listing(result: dict) -> str:
    lines = []
    if result["error"]:
        return "%s: error: %s" % (result["host"], result["error"])
    if not result["vms"]:
        return "%s: no VMs you may open" % result["host"]
    for vm in result["vms"]:
        lines.append("%s/%s  %s%s" % (result["host"], vm["vm"], vm["state"],
                                       "  (%s)" % vm["error"] if vm.get("error") else ""))
        for con in vm.get("consoles", []):
            who = ", ".join(con["viewers"]) or "nobody attached"
            writer = "; writer %s" % con["writer"] if con.get("writer") else ""
            lines.append("  console:%-22s %s, %d bytes buffered; %s%s"
                         % (con["id"], con["status"], con["buffered"], who, writer))
        for ch in vm.get("channels", []):
            lines.append("  channel:%-22s guest %s; %s" % (ch["name"], ch.get("guest", "?"),
                                                        ch.get("holder") or "free"))
        vnc = vm.get("vnc") or {}
        if vnc.get("available"):
            lines.append("  vnc%-27s %d viewer(s)" % ("", vnc.get("viewers", 0)))
        else:
            lines.append("  vnc%-27s none (%s)" % ("", vnc.get("reason", "no display")))
    return "\n".join(lines)
