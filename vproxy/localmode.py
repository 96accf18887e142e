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
import struct
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from .errors import SessionClosed, UserError

log = logging.getLogger("vproxy.agent")

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class LocalIdentity:
    """A local peer, as the kernel saw it connect: Identity-compatible for the ACL."""

    uid: int
    gid: int = -1
    pid: int = 0
    user: str = ""  # passwd name of uid, "" if it has none

    def names(self) -> Tuple[str, ...]:
        """What ACL globs match: "uid:N", then "user:NAME" if the uid has a name."""
        out = ("uid:%d" % self.uid,)
        return out + ("user:%s" % self.user,) if self.user else out

    def __str__(self) -> str:
        """In audit lines and messages: "uid:1000(alice)", or "uid:1000"."""
        return "uid:%d(%s)" % (self.uid, self.user) if self.user else "uid:%d" % self.uid


def identity_for_uid(uid: int, gid: int = -1, pid: int = 0) -> LocalIdentity:
    try:
        import pwd

        user = pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        user = ""
    return LocalIdentity(uid, gid, pid, user)


def peer_credentials(sock: Any) -> Tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected unix socket."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        raise UserError("local mode needs SO_PEERCRED (Linux): this system has none")
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, option, _UCRED.size))
    return pid, uid, gid


def peer_identity(sock: Any) -> LocalIdentity:
    pid, uid, gid = peer_credentials(sock)
    return identity_for_uid(uid, gid, pid)


# --------------------------------------------------------------------------- agent side

def _agent_session_class():
    from .agent import AgentSession

    class LocalAgentSession(AgentSession):
        """An AgentSession on the local socket: the identity comes from SO_PEERCRED."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            try:
                self.peer_identity = peer_identity(transport.get_extra_info("socket"))
            except (OSError, UserError) as e:
                log.warning("refused local connection: no peer credentials: %s", e)
                transport.abort()
                return
            super().connection_made(transport)

        def peer_label(self, peer: Any) -> str:
            return "pid %d on the local socket" % self.peer_identity.pid

    return LocalAgentSession


class LocalServer:
    """The agent's unix listener; close() also removes the socket file."""

    def __init__(self, server: asyncio.AbstractServer, path: str):
        self.server = server
        self.path = path
        self._inode = os.stat(path).st_ino

    @property
    def sockets(self):
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
    session_class = _agent_session_class()
    loop = asyncio.get_event_loop()
    server = await loop.create_unix_server(lambda: session_class(agent), sock=sock)
    return LocalServer(server, path)


def _bind(path: str) -> socket.socket:
    from .forward import clear_stale_socket

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


# --------------------------------------------------------------------------- client side

async def connect_local(path: str, timeout: float = 10.0, config: Any = None,
                        server_name: Optional[str] = None):
    """A vproxy.client.Client over the agent's unix socket: no TLS, no certificate."""
    from .client import Client
    from .session import Session

    address = "unix:%s" % path
    loop = asyncio.get_event_loop()
    try:
        _, session = await asyncio.wait_for(
            loop.create_unix_connection(
                lambda: Session(client=True, config=config, name="session to %s" % address), path),
            timeout)
    except asyncio.TimeoutError:
        raise UserError("no answer from the agent at %s within %.0f s" % (address, timeout)) from None
    except FileNotFoundError:
        raise UserError("no agent socket at %s" % path,
                        hint="is `vproxy serve --local-socket %s` running?" % path) from None
    except ConnectionRefusedError:
        raise UserError("nothing listens on %s (a stale socket file?)" % path,
                        hint="is `vproxy serve --local-socket %s` running?" % path) from None
    except OSError as e:
        raise UserError("cannot connect to the agent at %s: %s" % (address, e.strerror or e)) from None
    try:
        session.peer_identity = peer_identity(session.transport.get_extra_info("socket"))
    except (OSError, UserError):
        pass
    try:
        await session.ping(timeout)
    except (SessionClosed, asyncio.TimeoutError, ConnectionError) as e:
        reason = session.close_reason or str(e) or "no answer"
        raise UserError("the agent at %s refused the session: %s" % (address, reason)) from None
    return Client(session, address)
