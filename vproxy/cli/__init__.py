"""The command line: click lives here and only here.

This module is the `vproxy` group, the registration of its commands and entry();
each command (group) is a module named after it: serve, ls, bench, console, vnc,
forward, pki, demo, completion, with the options they share in common.

Commands wire options to library calls; the logic is in the library. A UserError
becomes one line ("vproxy: error: ...", then a hint) and its exit code, never a
traceback.

`vproxy --help` and every `vproxy COMMAND --help` import the command modules, so these
import neither asyncio nor ssl nor the agent at module level: what a command runs is
imported inside its function (each such import says so in a comment).
"""

import logging
import sys

import click

from vproxy._version import version_line
from vproxy.errors import UserError
from . import bench, completion, console, demo, forward, ls, pki, serve, vnc
from .common import EXIT_INTERRUPTED


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(message="%(version)s", version=version_line())
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
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="vproxy: %(name)s: %(message)s", stream=sys.stderr)
    ctx.obj = {"verbose": verbose}


for _command in (serve.serve, ls.ls_command, bench.bench, pki.pki, demo.demo,
                 completion.completion, console.console, vnc.vnc, forward.forward):
    main.add_command(_command)


def entry() -> None:
    """Console-script entry point: run main() with vproxy's error handling."""
    try:
        # completion requests (see `vproxy completion`) whatever the program is called
        main(standalone_mode=False, complete_var=completion.COMPLETE_VAR)
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
