"""`vproxy completion`: the shell completion script. Completion is click's own
(click.shell_completion); this module only names the shells and the variable."""

import click
from click.shell_completion import get_completion_class

#: The environment variable that makes `vproxy` answer completion requests
#: (vproxy.cli.entry passes it to click whatever the program is called).
COMPLETE_VAR = "_VPROXY_COMPLETE"
SHELLS = ("bash", "zsh", "fish")


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
    root = ctx.find_root().command
    cls = get_completion_class(shell)
    if cls is None:  # pragma: no cover - the Choice above lists click's shells
        raise click.BadParameter("no completion for %s" % shell)
    click.echo(cls(root, {}, "vproxy", COMPLETE_VAR).source())
