"""What the agent serves, as types: providers make channels for identities; listeners
accept the sessions those identities come on.

The agent (vproxy.agent.server) knows these interfaces only, never the classes behind
them, so that a new kind of channel (a disk, a web console) is a new provider and
nothing else changes:

- A ChannelProvider answers one kind of open request: the built-in channels
  (vproxy.agent.builtin.BuiltinProvider, requests without a VM) or the VMs'
  (vproxy.agent.qemu.provider.QemuProvider). Its open() decides everything that can be
  decided before ACCEPT and raises ChannelRefused with the reason otherwise; access
  control is not its business (the agent checks the ACL before and after open()).
- A Channel is what open() returned: its info goes out in the ACCEPT, then run(stream)
  serves the accepted stream until either side is done. The agent resets the stream if
  run() returns without having closed it.
- A PeerIdentity is who opened: a verified certificate (vproxy.security.tls.Identity)
  or a local uid (vproxy.net.peercred.LocalIdentity). str() is what audit lines and
  messages name it by; names() is what an ACL matches.
- A Listener is one of the agent's servers (vproxy.net.transport.Server for TLS,
  vproxy.agent.local.LocalServer for the local socket).

Protocols, not base classes: the implementations need not import this module.
"""

import socket
from typing import Any, Dict, List, Protocol, Sequence, Tuple

from vproxy.mux import OpenRequest
from vproxy.net.session import Stream


class PeerIdentity(Protocol):
    """Who is on the other end of a session."""

    def names(self) -> Tuple[str, ...]:
        """Every name the peer goes by, the one it is known by first."""
        ...

    def __str__(self) -> str:
        ...


class Channel(Protocol):
    """An opened channel, not yet serving."""

    info: Dict[str, str]  # sent with the ACCEPT

    async def run(self, stream: Stream) -> None:
        """Serve the accepted stream; return (or raise) when done."""
        ...


class ChannelProvider(Protocol):
    """Makes the channels of one kind of request."""

    async def open(self, request: OpenRequest, identity: PeerIdentity) -> Channel:
        """The channel `request` names, for `identity`; raises ChannelRefused."""
        ...

    async def describe(self) -> List[Dict[str, Any]]:
        """What `vproxy ls` shows of this provider: one dict per VM."""
        ...


class Listener(Protocol):
    """One of the agent's servers."""

    @property
    def sockets(self) -> Sequence[socket.socket]:
        ...

    def close(self) -> None:
        """Stop accepting; the sessions already accepted go on."""
        ...

    async def wait_closed(self) -> None:
        ...
