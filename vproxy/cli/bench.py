"""`vproxy bench`: measure the link to an agent through its built-in channels."""

import json
import sys

import click

from vproxy.errors import ChannelRefused, SessionClosed
from .common import EXIT_UNREACHABLE, EXIT_USAGE, resolve_client, run_async, tls_options


@click.command()
@click.argument("host", metavar="HOST[:PORT]")
@tls_options(server=False)
@click.option("--seconds", type=float, default=2.0, show_default=True,
              help="Duration of each throughput test.")
@click.option("--streams", type=click.IntRange(1, 10000), default=100, show_default=True,
              help="Concurrent echo streams to open at once.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def bench(host: str, seconds: float, streams: int, as_json: bool, **tls_args) -> None:
    """Measure the link to an agent: throughput each way, round-trip latency,
    concurrent streams. Uses the agent's built-in channels; needs no VM.

    \b
    Example:
      vproxy bench vmhost1 --identity alice --seconds 5
    """
    code = run_async(run_bench(resolve_client(host, tls_args), seconds, streams, as_json))
    sys.exit(code)


async def run_bench(target, seconds: float, streams: int, as_json: bool) -> int:
    """target: a vproxy.client.config.Target (cli.common.resolve_client)."""
    from vproxy.client import bench as benchmark  # lazy: it brings asyncio and ssl

    host = target.name
    client = await target.connect()
    try:
        result = await benchmark.run(client, seconds, streams)
    except SessionClosed as e:
        click.echo("vproxy: error: the session to %s ended: %s" % (host, e.reason), err=True)
        return EXIT_UNREACHABLE
    except ChannelRefused as e:  # builtin_channels = acl or off on that agent
        click.echo("vproxy: error: %s refused: %s" % (host, e.message), err=True)
        return EXIT_USAGE
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
