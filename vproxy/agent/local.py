"""Local mode: the agent on a unix socket, each client known by its uid (SO_PEERCRED).

For single-host use without certificates: `vproxy serve --local-socket PATH` listens on
a unix socket as well as (or instead of) TLS, and speaks the same vproxy/1 protocol on
it, in the clear (the bytes never leave the host). The kernel tells the agent the uid of
the process that connected; the agent authorizes it with the same ACL as certificate
identities, under the names "uid:N" and, when the uid has a passwd entry, "user:NAME":

    [[allow]]
    identities = ["user:alice", "uid:1001"]

Rules kept here:
- No implicit rights, for root neither: uid 0 gets what an ACL rule grants "uid:0" or
  "user:root", nothing more. (Root can read the agent's keys anyway; the ACL and the
  audit trail still say who did what.)
- The socket is mode 0666: any local user may connect, the ACL decides what they get
  (the built-in channels sink, source, echo are open to every connection, as they are
  to every certificate the CA signed, unless builtin_channels is "acl" or "off"; ls
  always is). Restrict the directory to narrow it.
- The credentials are those of the process that called connect(), read once.
- A stale socket file (nothing answers) is replaced; a live one is an error.
"""

import asyncio
import logging
import os
import socket
from typing import Any, Sequence, cast

from vproxy.errors import UserError
from vproxy.net.address import clear_stale_socket
from vproxy.net.peercred import peer_identity

from .session import AgentSession

log = logging.getLogger("vproxy.agent")


class LocalAgentSession(AgentSession):
    """An AgentSession on the local socket: the identity comes from SO_PEERCRED."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            self.peer_identity = peer_identity(transport.get_extra_info("socket"))
        except (OSError, UserError) as e:
            log.warning("refused local connection: no peer credentials: %s", e)
            cast(asyncio.Transport, transport).abort()
            return
        super().connection_made(transport)

    def peer_label(self, peer: Any) -> str:
        return "pid %d on the local socket" % self.peer_identity.pid


class LocalServer:
    """The agent's unix listener; close() also removes the socket file."""

    def __init__(self, server: asyncio.base_events.Server, path: str):
        self.server = server
        self.path = path
        self._inode = os.stat(path).st_ino

    @property
    def sockets(self) -> Sequence[socket.socket]:
        return self.server.sockets

    def close(self) -> None:
        self.server.close()
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass

    async def wait_closed(self) -> None:
        await self.server.wait_closed()


async def start_local_server(agent: Any, path: str) -> LocalServer:
    """Listen on the unix socket `path` for `agent` (a vproxy.agent.Agent)."""
    path = os.path.abspath(os.path.expanduser(path))
    if getattr(socket, "SO_PEERCRED", None) is None:
        raise UserError("--local-socket needs SO_PEERCRED (Linux): this system has none")
    sock = _bind(path)
    loop = asyncio.get_event_loop()
    server = await loop.create_unix_server(lambda: LocalAgentSession(agent), sock=sock)
    return LocalServer(server, path)


def _bind(path: str) -> socket.socket:
    clear_stale_socket(path, "local socket %s" % path, "another agent listens there",
                       "stop it, or give another --local-socket path")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)  # any local user may connect; the ACL decides
    except OSError as e:
        sock.close()
        raise UserError("cannot listen on local socket %s: %s" % (path, e.strerror),
                        hint="does its directory exist, and may you write there?") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock
