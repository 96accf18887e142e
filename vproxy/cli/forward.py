"""`vproxy vnc` and `vproxy forward`: local listeners whose connections are streams.

The bridging is vproxy.forward's, the viewer choice vproxy.vncviewer's; this module wires
options, prints, and waits for the viewer or for Ctrl-C.
"""

import asyncio
import signal
import sys
from typing import Callable, Optional, Tuple

import click

from vproxy.errors import ChannelRefused, SessionClosed, UserError
from .common import resolve_client, run_async, tls_options

MODES = ("ro", "rw", "force", "hotplug")


def _say(text: str) -> None:
    click.echo("vproxy: %s" % text, err=True)


class _Link:
    """The session to the agent; a new one is made when a stream is wanted and the
    old one has ended (the agent restarted, the network dropped)."""

    def __init__(self, target):
        self.target = target
        self.client = None
        self._lock = asyncio.Lock()

    async def get(self):
        async with self._lock:
            if self.client is None or self.client.session.closed.done():
                if self.client is not None:
                    _say("the session to %s ended (%s); connecting again"
                         % (self.target.name, self.client.session.close_reason))
                self.client = await self.target.connect()
            return self.client

    def opener(self, vm: str, channel: str, mode: str) -> Callable:
        async def open_stream():
            client = await self.get()
            return await client.open(vm, channel, mode)

        return open_stream

    async def close(self) -> None:
        if self.client is not None and not self.client.session.closed.done():
            await self.client.close()


async def _check_vm(client, vm: str, host: str) -> None:
    """Fail early, before listening, if the agent shows this identity no such VM."""
    try:
        vms = await client.list_vms()
    except (SessionClosed, ChannelRefused) as e:
        raise UserError("listing the VMs of %s failed: %s" % (host, e)) from None
    if vm not in [v.get("vm") for v in vms]:
        raise UserError("%s has no VM %r that you may open" % (host, vm),
                        hint="vproxy ls %s shows the VMs you may open" % host)


async def _until_signal(also: Optional[asyncio.Future] = None) -> None:
    """Wait for SIGINT or SIGTERM (or `also` to finish)."""
    loop = asyncio.get_event_loop()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    try:
        waiting = [stop] + ([also] if also is not None else [])
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _listen_address(listen: str, unsafe: bool):
    from vproxy.net.address import check_listen_safety, parse_listen

    address = parse_listen(listen)
    check_listen_safety(address, unsafe)
    return address


def _check_channel(channel: str) -> None:
    kind, sep, arg = channel.partition(":")
    if kind not in ("console", "channel", "vnc") or (kind == "channel" and not arg) \
            or (kind == "vnc" and sep) or (sep and not arg):
        raise UserError("unknown channel %r" % channel,
                        hint="one of: console, console:ID, channel:NAME, vnc")


async def run_forward(target, vm: str, channel: str, mode: str, listen) -> int:
    from vproxy.client.forward import Forwarder

    link = _Link(target)
    try:
        await _check_vm(await link.get(), vm, target.name)
        forwarder = Forwarder(listen, link.opener(vm, channel, mode), report=_say,
                              label="%s of VM %s" % (channel, vm))
        address = await forwarder.start()
        try:
            click.echo(str(address))
            _say("forwarding %s to %s of VM %s on %s (mode %s); Ctrl-C to stop"
                 % (address, channel, vm, target.name, mode))
            await _until_signal()
        finally:
            await forwarder.close()
    finally:
        await link.close()
    return 0


async def run_vnc(target, vm: str, listen, viewer: Optional[Tuple[str, str]]) -> int:
    from vproxy.client.forward import Forwarder
    from vproxy.mux import RefuseCode
    from vproxy.client.vncviewer import viewer_command

    link = _Link(target)
    try:
        client = await link.get()
        try:  # ask now, so that a refusal is said here and not by a viewer's blank window
            first = await client.open(vm, "vnc", "rw")
        except ChannelRefused as e:
            hint = ""
            if e.code == RefuseCode.FORBIDDEN:
                hint = "the agent's ACL must grant you channels = [\"vnc\"] on this VM"
            elif e.code == RefuseCode.NO_SUCH_VM:
                hint = "vproxy ls %s shows the VMs you may open" % target.name
            raise UserError("no VNC for VM %s on %s: %s" % (vm, target.name, e.message),
                            hint=hint) from None
        forwarder = Forwarder(listen, link.opener(vm, "vnc", "rw"), prepared=first,
                              report=_say, label="VNC display of VM %s" % vm)
        address = await forwarder.start()
        try:
            command = viewer_command(viewer[0], viewer[1], address) if viewer else None
            click.echo(str(address))
            if command is None:
                from vproxy.client.vncviewer import viewer_argument

                _say("VNC display of VM %s on %s at %s (e.g. vncviewer %s); Ctrl-C to stop"
                     % (vm, target.name, address, viewer_argument("vncviewer", address)))
                await _until_signal()
                return 0
            try:
                proc = await asyncio.create_subprocess_exec(*command)
            except OSError as e:
                raise UserError("cannot start %s: %s" % (command[0], e.strerror or e)) from None
            _say("VNC display of VM %s on %s at %s; started %s"
                 % (vm, target.name, address, " ".join(command)))
            viewer_done = asyncio.ensure_future(proc.wait())
            await _until_signal(viewer_done)
            if not viewer_done.done():  # Ctrl-C: the viewer goes too
                proc.terminate()
                await proc.wait()
                return 0
            if proc.returncode != 0:
                _say("the viewer exited with status %d" % proc.returncode)
                return 1
            return 0
        finally:
            await forwarder.close()
    finally:
        await link.close()


@click.command()
@click.argument("host", metavar="HOST")
@click.argument("vm", metavar="VM")
@click.option("--listen", default="127.0.0.1:0", show_default=True, metavar="ADDR",
              help="Where the viewer connects: HOST:PORT (loopback unless --unsafe-listen; "
                   "port 0 picks a free one) or unix:PATH.")
@click.option("--unsafe-listen", is_flag=True,
              help="Allow --listen beyond loopback: anyone who reaches it sees and controls "
                   "the VM's screen with your rights.")
@click.option("--no-viewer", is_flag=True,
              help="Start no viewer: print the address and serve until Ctrl-C.")
@tls_options(server=False)
def vnc(host: str, vm: str, listen: str, unsafe_listen: bool, no_viewer: bool, **tls_args) -> None:
    """Show the VNC display of VM: listen locally, make each connection to the
    listener one VNC connection to the VM, and start a VNC viewer on it (vncviewer,
    remote-viewer or gvncviewer, the first found on PATH). Ends when the viewer does.

    The address is printed on standard output.

    \b
    Examples:
      vproxy vnc vmhost1 web1
      vproxy vnc vmhost1 web1 --no-viewer --listen 127.0.0.1:5901
    """
    from vproxy.client.vncviewer import find_viewer, no_viewer_error

    address = _listen_address(listen, unsafe_listen)
    viewer = None
    if not no_viewer:
        viewer = find_viewer()
        if viewer is None:
            raise no_viewer_error()
    target = resolve_client(host, tls_args)
    sys.exit(run_async(run_vnc(target, vm, address, viewer)))


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
    Each local connection is one stream; half-close passes through both ways.
    Runs until Ctrl-C. The address is printed on standard output.

    \b
    Examples:
      vproxy forward vmhost1 web1 channel:org.qemu.guest_agent.0 --listen unix:/tmp/qga.sock
      vproxy forward vmhost1 web1 console --listen 127.0.0.1:4000
    """
    _check_channel(channel)
    address = _listen_address(listen, unsafe_listen)
    target = resolve_client(host, tls_args)
    sys.exit(run_async(run_forward(target, vm, channel, mode, address)))
