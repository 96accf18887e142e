"""`vproxy forward`: a local TCP port or unix socket whose connections are streams to
a channel of a VM.

The bridging is vproxy.client.forward's; this module wires options, prints, and waits
for Ctrl-C.
"""

import sys

import click

from vproxy.errors import UserError
from .common import resolve_client, run_async, tls_options

MODES = ("ro", "rw", "force", "hotplug")


@click.command()
@click.argument("host", metavar="HOST")
@click.argument("vm", metavar="VM")
@click.argument("channel", metavar="CHANNEL")
@click.option("--listen", default="127.0.0.1:0", show_default=True, metavar="ADDR",
              help="HOST:PORT (loopback unless --unsafe-listen; port 0 picks a free one), "
                   "or a unix socket: unix:PATH or a path with a /.")
@click.option("--unsafe-listen", is_flag=True,
              help="Allow --listen beyond loopback: anyone who reaches it uses the channel "
                   "with your rights.")
@click.option("--mode", type=click.Choice(MODES), default="rw", show_default=True,
              help="ro: watch a console; rw: read and write; force: take a console from its "
                   "writer; hotplug: add a new guest channel for each connection.")
@tls_options(server=False)
def forward(host: str, vm: str, channel: str, listen: str, unsafe_listen: bool, mode: str,
            **tls_args) -> None:
    """Forward a local TCP port or unix socket to CHANNEL of VM: console,
    console:ID, channel:NAME (a guest channel, e.g. the guest agent's port) or vnc.
    With VM "" (no VM), CHANNEL is one of the agent's built-in channels, for measuring
    the link with any tool: sink (counts what it reads, answers the count after your
    half-close), source (endless zeros) or echo. Each local connection is one stream;
    half-close passes through both ways. Runs until Ctrl-C. The address is printed on
    standard output.

    \b
    Examples:
      vproxy forward vmhost1 web1 channel:org.qemu.guest_agent.0 --listen unix:/tmp/qga.sock
      vproxy forward vmhost1 web1 console --listen 127.0.0.1:4000
      vproxy forward vmhost1 "" echo --listen 127.0.0.1:5201
    """
    from ._forwarding import listen_address  # lazy: asyncio and ssl stay out of --help

    _check_channel(vm, channel)
    address = listen_address(listen, unsafe_listen)
    target = resolve_client(host, tls_args)
    sys.exit(run_async(run_forward(target, vm, channel, mode, address)))


#: The agent's built-in channels (vproxy.agent.builtin.NAMES), opened with VM "".
BUILTINS = ("sink", "source", "echo")


def _check_channel(vm: str, channel: str) -> None:
    if not vm:
        if channel not in BUILTINS:
            raise UserError("with no VM, the channel is one of the agent's built-ins, not %r" % channel,
                            hint="one of: %s (or name a VM)" % ", ".join(BUILTINS))
        return
    kind, sep, arg = channel.partition(":")
    if kind not in ("console", "channel", "vnc") or (kind == "channel" and not arg) \
            or (kind == "vnc" and sep) or (sep and not arg):
        raise UserError("unknown channel %r" % channel,
                        hint="one of: console, console:ID, channel:NAME, vnc")


async def run_forward(target, vm: str, channel: str, mode: str, listen) -> int:
    # lazy: asyncio and ssl (which the client brings) stay out of --help
    from vproxy.client.forward import Forwarder
    from ._forwarding import Link, check_vm, say, until_signal

    link = Link(target)
    try:
        if vm:
            await check_vm(await link.get(), vm, target.name)
        else:
            await link.get()  # connect (and fail) before listening, as check_vm does
        label = "%s of VM %s" % (channel, vm) if vm else "built-in channel %s" % channel
        forwarder = Forwarder(listen, link.opener(vm, channel, mode), report=say, label=label)
        address = await forwarder.start()
        try:
            click.echo(str(address))
            say("forwarding %s to %s on %s (mode %s); Ctrl-C to stop"
                % (address, label, target.name, mode))
            await until_signal()
        finally:
            await forwarder.close()
    finally:
        await link.close()
    return 0
