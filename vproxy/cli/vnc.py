"""`vproxy vnc`: a local listener whose connections are the VM's VNC display, and a
viewer started on it.

The bridging is vproxy.client.forward's, the viewer choice vproxy.client.vncviewer's;
this module wires options, prints, and waits for the viewer or for Ctrl-C.
"""

import sys
from typing import Optional, Tuple

import click

from vproxy.errors import ChannelRefused, UserError
from .common import resolve_client, run_async, tls_options


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
    from vproxy.client.vncviewer import find_viewer, no_viewer_error  # lazy: keeps --help fast
    from ._forwarding import listen_address  # lazy: asyncio and ssl stay out of --help

    address = listen_address(listen, unsafe_listen)
    viewer = None
    if not no_viewer:
        viewer = find_viewer()
        if viewer is None:
            raise no_viewer_error()
    target = resolve_client(host, tls_args)
    sys.exit(run_async(run_vnc(target, vm, address, viewer)))


async def run_vnc(target, vm: str, listen, viewer: Optional[Tuple[str, str]]) -> int:
    # lazy: asyncio and ssl (which the client brings) stay out of --help
    import asyncio
    from vproxy.client.forward import Forwarder
    from vproxy.client.vncviewer import viewer_argument, viewer_command
    from vproxy.mux import RefuseCode
    from ._forwarding import Link, say, until_signal

    link = Link(target)
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
                              report=say, label="VNC display of VM %s" % vm)
        address = await forwarder.start()
        try:
            command = viewer_command(viewer[0], viewer[1], address) if viewer else None
            click.echo(str(address))
            if command is None:
                say("VNC display of VM %s on %s at %s (e.g. vncviewer %s); Ctrl-C to stop"
                     % (vm, target.name, address, viewer_argument("vncviewer", address)))
                await until_signal()
                return 0
            try:
                proc = await asyncio.create_subprocess_exec(*command)
            except OSError as e:
                raise UserError("cannot start %s: %s" % (command[0], e.strerror or e)) from None
            say("VNC display of VM %s on %s at %s; started %s"
                 % (vm, target.name, address, " ".join(command)))
            viewer_done = asyncio.ensure_future(proc.wait())
            await until_signal(viewer_done)
            if not viewer_done.done():  # Ctrl-C: the viewer goes too
                proc.terminate()
                await proc.wait()
                return 0
            status = viewer_done.result()  # the viewer's exit status
            if status != 0:
                say("the viewer exited with status %d" % status)
                return 1
            return 0
        finally:
            await forwarder.close()
    finally:
        await link.close()
