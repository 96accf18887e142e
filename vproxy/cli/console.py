"""`vproxy console`: wires the options to vproxy.client.console."""

import sys

import click

from vproxy.errors import UserError
from .common import resolve_client, run_async, tls_options


def _escape(ctx: click.Context, param: click.Parameter, value: str):
    from vproxy.client.terminal import parse_escape  # lazy: the terminal brings asyncio

    try:
        return parse_escape(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None


@click.command(name="console")
@click.argument("host", metavar="HOST")
@click.argument("vm")
@click.argument("console", required=False, metavar="[CONSOLE]")
@tls_options(server=False)
@click.option("--read-only", "read_only", is_flag=True,
              help="Watch only: never take the writer role; typing is dropped.")
@click.option("--force", is_flag=True,
              help="Take the writer role now; the current writer turns read-only.")
@click.option("--replay", metavar="N|all", default=None,
              help="Bytes of history to show on attaching, or all that the agent keeps "
                   "[default: 4096 on a terminal, 0 in a pipe].")
@click.option("--escape", "escape", metavar="CHAR", default="^]", show_default=True,
              callback=_escape,
              help="Escape character: ^X (caret notation), one character, or none.")
def console(host: str, vm: str, console, read_only: bool, force: bool, replay, escape,
            **tls_args) -> None:
    """Attach to a serial console of VM on the agent HOST (a name from the client
    configuration, HOST[:PORT], or unix:PATH): the VM's first console, or CONSOLE (a
    chardev id such as serial0, or serialN for the N-th port).

    At a terminal it is raw and interactive; the escape character (^] by default)
    followed by . quits, ? shows help, f takes the writer role. One viewer writes,
    any number watch. When the connection drops or the VM restarts it reconnects by
    itself and shows what was printed meanwhile. When stdin or stdout is not a
    terminal it is a plain pipe: stdin goes to the console, and after the end of
    stdin the console's output until it has been quiet for a moment.

    \b
    Examples:
      vproxy console vmhost1 web1 --identity alice
      vproxy console vmhost1 web1 serial1 --read-only --replay all
      echo root | vproxy console vmhost1 web1
    """
    # lazy: the console client brings asyncio and ssl, which --help does without
    from vproxy.client.console import ConsoleSettings, parse_replay, run_console

    if read_only and force:
        raise UserError("--read-only and --force exclude each other")
    target = resolve_client(host, tls_args)  # a name from the client config, an address
    settings = ConsoleSettings(                # or unix:PATH (local mode)
        address=host, vm=vm, console=console, connector=target.connect,
        mode="ro" if read_only else "force" if force else "rw",
        replay=parse_replay(replay), escape=escape)
    sys.exit(run_async(run_console(settings)))
