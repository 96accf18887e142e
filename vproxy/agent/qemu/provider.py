"""The QEMU channel provider: turns an OpenRequest into a Channel (docs/ARCHITECTURE.md).

Channel names:
    console, console:<id>   a serial console (id: chardev id, or serialN for the N-th port)
    channel:<name>          a virtio-serial guest channel (port name, e.g. org.qemu.guest_agent.0)
    vnc                     one VNC connection to the VM's display

Everything that can be decided before ACCEPT is decided in `open()` (the writer role,
the takeover, the add_client), so a refusal always comes with the reason and ACCEPT
info is true; `Channel.run(stream)` then serves the stream. Access control is not
done here: the agent checks the ACL before calling `open()`.
"""

from __future__ import annotations

from typing import Any, Dict, List

from vproxy.agent.channels import Channel, PeerIdentity
from vproxy.mux import OpenRequest

from ._streams import RefuseCode, refuse
from .errors import QemuError
from .vms import VMRegistry

CHANNEL_KINDS = ("console", "channel", "vnc")


class QemuProvider:
    def __init__(self, registry: VMRegistry, *, ready_timeout: float = 5.0):
        self.registry = registry
        self.ready_timeout = ready_timeout

    async def open(self, request: OpenRequest, identity: PeerIdentity) -> Channel:
        kind, _, arg = request.channel.partition(":")
        if kind not in CHANNEL_KINDS:
            raise refuse(RefuseCode.NO_SUCH_CHANNEL,
                         "unknown channel %r (console, console:ID, channel:NAME or vnc)"
                         % request.channel)
        vm = self.registry.get(request.vm)
        await vm.ready(self.ready_timeout)
        options = dict(getattr(request, "options", {}) or {})
        try:
            if kind == "console":
                console = await vm.consoles.get(arg or None)
                return console.open_viewer(identity, request.mode, options)
            if kind == "channel":
                return await vm.channels.open(vm.monitor, arg, identity, request.mode)
            if arg:
                raise refuse(RefuseCode.NO_SUCH_CHANNEL, "vnc takes no argument (got %r)"
                             % request.channel)
            return await vm.vnc.open(vm.monitor, identity, request.mode)
        except QemuError as e:  # QEMU went away or refused while we set the channel up
            raise refuse(RefuseCode.UNAVAILABLE, str(e)) from None

    async def describe(self) -> List[Dict[str, Any]]:
        """One dict per VM, for `vproxy ls`:
        {"vm", "aliases", "state", "qmp", "error",
         "consoles": [{"id", "status", "reason", "held" ("taken over", "adopted pty",
                       "adopted socket"; "" unless attached), "held_where" (the pty or
                       socket adopted), "offset", "buffered", "viewers": [..], "writer", "log"}],
         "channels": [{"name", "holder", "guest", "hotplugged", "held" ("taken over",
                       "adopted socket"; "" unless held), "held_where" (the socket adopted)}],
         "vnc": {"available", "viewers", "clients", "reason", "auth"}}
        ("aliases": the VM's other names, e.g. ["100"] for web1 found as 100.qmp;
        "auth": the VNC server's own, which the agent skips.)"""
        return await self.registry.describe()
