"""`vproxy demo` and `vproxy completion`: trying vproxy out, and setting up the shell.

The demo's logic is in vproxy.demo; completion is click's own (click.shell_completion).
"""

import sys

import click

#: The environment variable that makes `vproxy` answer completion requests
#: (vproxy.cli.entry passes it to click whatever the program is called).
COMPLETE_VAR = "_VPROXY_COMPLETE"
SHELLS = ("bash", "zsh", "fish")


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
    from vproxy import demo as demo_module

    root = ctx.find_root().command
    commands = sorted(getattr(root, "commands", {}))
    sys.exit(demo_module.run(qemu=qemu, screenshot=screenshot, keep_running=keep_running,
                             cli_commands=commands))


@click.command()
@click.argument("shell", type=click.Choice(SHELLS))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the shell completion script for bash, zsh or fish.

    \b
    Load it in your shell's startup file:
      bash:  eval "$(vproxy completion bash)"        (~/.bashrc)
      zsh:   eval "$(vproxy completion zsh)"         (~/.zshrc)
      fish:  vproxy completion fish | source         (~/.config/fish/config.fish)
    """
    from click.shell_completion import get_completion_class

    root = ctx.find_root().command
    cls = get_completion_class(shell)
    if cls is None:  # pragma: no cover - the Choice above lists click's shells
        raise click.BadParameter("no completion for %s" % shell)
    click.echo(cls(root, {}, "vproxy", COMPLETE_VAR).source())
