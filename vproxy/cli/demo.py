"""`vproxy demo`: try vproxy out on this machine. The demo's logic is in vproxy.demo."""

import sys

import click


@click.command()
@click.option("--screenshot", "screenshot", type=click.Path(dir_okay=False), metavar="FILE",
              help="Where to save the VM's screen as PNG. [default: ./vproxy-demo.png]")
@click.option("--qemu", default="qemu-system-x86_64", show_default=True, metavar="PROGRAM",
              help="The QEMU system emulator to run.")
@click.option("--keep-running", is_flag=True,
              help="After the demo, keep the agent and the VM up until Ctrl-C, and print "
                   "how to reach them with vproxy ls, console and vnc.")
@click.pass_context
def demo(ctx: click.Context, screenshot, qemu: str, keep_running: bool) -> None:
    """Show vproxy working on this machine, then clean up.

    Makes a throwaway CA in a temporary directory, starts a tiny VM (a 512-byte guest
    that upper-cases what you type) and an agent, connects to it over mutual TLS,
    types a line on the VM's serial console and shows the guest's answer, saves a
    screenshot of its display taken through the tunnel, and removes everything again
    (also on Ctrl-C). Needs QEMU (qemu-system-x86) and the Python package cryptography.

    \b
    Example:
      vproxy demo --screenshot /tmp/screen.png
    """
    from vproxy import demo as demo_module  # lazy: it brings asyncio and ssl

    root = ctx.find_root().command
    commands = sorted(getattr(root, "commands", {}))
    sys.exit(demo_module.run(qemu=qemu, screenshot=screenshot, keep_running=keep_running,
                             cli_commands=commands))
