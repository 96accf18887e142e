"""Who is at the other end of a unix socket, as the kernel says (SO_PEERCRED).

The agent's local mode knows each client by it ("uid:N", "user:NAME" in the ACL), and a
client on the local socket learns the agent's uid the same way.
"""

import socket
import struct
from dataclasses import dataclass
from typing import Any, Tuple

from vproxy.errors import UserError

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
        import pwd  # optional: not on every platform

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
