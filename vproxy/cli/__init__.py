"""The command line: click lives here and only here.

Commands wire options to library calls; the logic is in the library. A UserError
becomes one line ("vproxy: error: ...", then a hint) and its exit code, never a
traceback.
"""

import sys

import click

from ..errors import UserError
from .common import EXIT_INTERRUPTED, run_async, tls_options, resolve_tls


def _version() -> str:
    from .. import __version__

    try:
        from .._build import BUILD_HASH  # written into the .pyz by build.py
    except ImportError:
        BUILD_HASH = "dev"
    return "vproxy %s (build %s, Python %s)" % (__version__, BUILD_HASH[:12], sys.version.split()[0])


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(message="%(version)s", version=_version())
@click.option("-v", "--verbose", count=True, help="More log output (repeat for debug).")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """Reach the consoles, guest channels and VNC display of QEMU VMs on other hosts
    over one mutually authenticated TLS connection.

    \b
    Quick start (one host):
      vproxy pki init
      vproxy pki issue server localhost --dns localhost --ip 127.0.0.1
      vproxy pki issue client alice
      vproxy serve --identity localhost &
      vproxy bench localhost --identity alice

    See vproxy(1) and vproxy COMMAND --help.
    """
    import logging

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="vproxy: %(name)s: %(message)s", stream=sys.stderr)
    ctx.obj = {"verbose": verbose}


@main.command()
@click.option("--listen", "listen", default="127.0.0.1:7443", show_default=True, metavar="ADDR",
              help="Address and port to listen on (HOST:PORT; [::] or 0.0.0.0 for all).")
@tls_options(server=True)
@click.option("--handshake-timeout", type=float, default=5.0, show_default=True, metavar="SECONDS",
              help="Drop a connection whose TLS handshake takes longer.")
@click.option("--audit-log", type=click.Path(dir_okay=False), metavar="FILE",
              help="Append one audit line per channel open to FILE (default: stderr).")
def serve(listen: str, handshake_timeout: float, audit_log, **tls_args) -> None:
    """Run the agent: accept mTLS sessions and serve channels.

    The agent always offers the built-in channels sink, source and echo (used by
    `vproxy bench`) to any client whose certificate the CA signed.

    \b
    Example:
      vproxy serve --listen 0.0.0.0:7443 --identity vmhost1
    """
    from ..agent import Agent, AgentConfig
    from ..client import parse_address
    from .serving import run_agent

    host, port = parse_address(listen, listening=True)
    paths = resolve_tls(tls_args, server=True)
    config = AgentConfig(listen_host=host, listen_port=port, handshake_timeout=handshake_timeout, **paths)
    run_async(run_agent(Agent(config), audit_log))


@main.command()
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
    from .serving import run_bench

    paths = resolve_tls(tls_args, server=False)
    code = run_async(run_bench(host, paths, seconds, streams, as_json))
    sys.exit(code)


def _add_optional_commands() -> None:
    from .pki_commands import pki

    main.add_command(pki)


_add_optional_commands()


def entry() -> None:
    """Console-script entry point: run main() with vproxy's error handling."""
    try:
        main(standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("vproxy: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except UserError as e:
        click.echo("vproxy: error: %s" % e.message, err=True)
        if e.hint:
            click.echo("hint: %s" % e.hint, err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("vproxy: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
