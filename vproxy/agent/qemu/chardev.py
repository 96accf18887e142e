"""Finding a VM's chardevs and their front ends, and taking chardevs over.

A front end (a serial port, a virtio-serial port) is found in the QOM tree: devices
made by ``-serial`` live in /machine/unattached, those made by ``-device`` (and hotplug)
in /machine/peripheral (with an id) or /machine/peripheral-anon; each has a string
property ``chardev`` naming its back end. ``query-chardev`` then tells what the back
end is, by its "filename":

    null                      -serial null / -chardev null: free for the agent to take
    unix:                     an fd socket with a peer: held by (an earlier) vproxy agent
    disconnected:fd:NAME      an fd socket whose peer closed: re-attach with add_client
    mux                       a mux (-serial mon:stdio, -nographic): cannot be changed
    pty:/dev/pts/N            a pty (libvirt's default): adopted by opening that path
    disconnected:unix:PATH,server=on
    disconnected:tcp:HOST:PORT,server=on
                              a free socket server (Proxmox, libvirt mode='bind', CI
                              scripts): adopted by connecting to it as its client
    unix:PATH,server=on       the same, held by another client: a second connect()
    tcp:HOST:PORT,server=on <-> PEER:PORT
                              would succeed and then hang, so it is refused as "in use"
    anything else             file, stdio, a socket client to elsewhere...: not ours to take

(The strings are QEMU 7.2's. Adopting never changes the chardev: whatever made it, e.g.
``virsh console`` or a Proxmox ``qm terminal``, still finds it as it was.)

Taking over means: a socketpair, one end passed to QEMU, and either ``chardev-change``
(``"server": false`` is required: QMP defaults to server) or, for a disconnected fd
socket, ``add_client {"protocol": CHARDEV_ID}``. The agent keeps the other end,
non-blocking.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, List, Optional, Union

from .hostside import ADOPTED_SOCKET, FdSide, SocketSide, open_pty
from .monitor import VMMonitor

#: QOM containers where front-end devices live.
DEVICE_CONTAINERS = ("/machine/unattached", "/machine/peripheral", "/machine/peripheral-anon")

# Back-end kinds (see the module docstring).
NULL = "null"
OURS = "ours"
OURS_DISCONNECTED = "ours-disconnected"
MUX = "mux"
OTHER = "other"
MISSING = "missing"
PTY = "pty"
SOCKET_SERVER = "socket-server"  # free: the agent connects as its client
SOCKET_SERVER_HELD = "socket-server-held"  # another client holds it

#: What the ``adopt`` setting may name, and its default (both).
ADOPT_KINDS = ("pty", "socket")


@dataclass
class Device:
    path: str  # QOM path, e.g. /machine/peripheral/vp0
    type: str  # QOM type, e.g. isa-serial, virtserialport
    props: Dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """The -device id (last path element under /machine/peripheral), else ""."""
        parent, _, last = self.path.rpartition("/")
        return last if parent == "/machine/peripheral" else ""


async def find_devices(monitor: VMMonitor, types: Collection[str],
                       props: Collection[str] = ("chardev",)) -> List[Device]:
    """Devices of the QOM *types* with the string/int properties *props* read."""
    found = []
    for container in DEVICE_CONTAINERS:
        for child in await monitor.execute("qom-list", {"path": container}):
            ctype = child.get("type", "")
            if not (ctype.startswith("child<") and ctype[6:-1] in types):
                continue
            dev = Device("%s/%s" % (container, child["name"]), ctype[6:-1])
            for prop in props:
                dev.props[prop] = await monitor.execute(
                    "qom-get", {"path": dev.path, "property": prop})
            found.append(dev)
    return found


async def chardev_backends(monitor: VMMonitor) -> Dict[str, str]:
    """chardev id -> its "filename" from query-chardev."""
    return {c["label"]: c.get("filename", "") for c in await monitor.execute("query-chardev")}


def backend_kind(filename: str) -> str:
    if filename == "null":
        return NULL
    if filename == "unix:":
        return OURS
    if filename.startswith("disconnected:fd:"):
        return OURS_DISCONNECTED
    if filename == "mux":
        return MUX
    if filename.startswith("pty:"):
        return PTY
    server = socket_server(filename)
    if server is not None:
        return SOCKET_SERVER if filename.startswith("disconnected:") else SOCKET_SERVER_HELD
    return OTHER


@dataclass(frozen=True)
class SocketServer:
    """A socket server chardev's listening address, from its query-chardev filename."""

    path: str = ""  # unix
    host: str = ""  # tcp
    port: int = 0

    def __str__(self) -> str:
        if self.path:
            return self.path
        return "[%s]:%d" % (self.host, self.port) if ":" in self.host else "%s:%d" % (self.host, self.port)


def socket_server(filename: str) -> Optional[SocketServer]:
    """The address of a unix or TCP socket SERVER chardev (free or held), else None
    (clients, telnet, websocket and everything else)."""
    name = filename[len("disconnected:"):] if filename.startswith("disconnected:") else filename
    name = name.split(" <-> ", 1)[0]
    if not name.endswith(",server=on"):
        return None
    name = name[:-len(",server=on")]
    if name.startswith("unix:") and len(name) > 5:
        return SocketServer(path=name[5:])
    if name.startswith("tcp:"):
        host, _, port = name[4:].rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if port.isdigit():
            return SocketServer(host=host, port=int(port))
    return None


def pty_path(filename: str) -> str:
    """pty:/dev/pts/N -> /dev/pts/N"""
    return filename[len("pty:"):]


async def is_local_address(host: str) -> bool:
    """Is *host* (a name or an address) one of this host's own addresses? (It is, if a
    socket can be bound to it.)"""
    if host in ("", "0.0.0.0", "::"):
        return True
    loop = asyncio.get_event_loop()
    try:
        infos = await loop.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, _, _, _, addr in infos:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.bind((addr[0], 0) + tuple(addr[2:]))
        except OSError:
            continue
        return True
    return False


async def connect_socket_server(server: SocketServer) -> SocketSide:
    """Connect to a free socket server chardev as its client (raises OSError)."""
    loop = asyncio.get_event_loop()
    if server.path:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: Any = server.path
    else:
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(server.host, server.host)
        family, _, _, _, target = (await loop.getaddrinfo(host, server.port, type=socket.SOCK_STREAM))[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, target), 5.0)
    except BaseException:
        sock.close()
        raise
    if not server.path:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return SocketSide(sock, ADOPTED_SOCKET, str(server))


async def adopt(filename: str) -> Union[FdSide, SocketSide]:
    """The agent's host side of a chardev of kind PTY or SOCKET_SERVER (see
    backend_kind), without changing the chardev. Raises OSError (also asyncio's
    TimeoutError, an OSError from 3.11 on) when the pty or socket cannot be opened."""
    if filename.startswith("pty:"):
        return open_pty(pty_path(filename))
    server = socket_server(filename)
    assert server is not None, filename
    try:
        return await connect_socket_server(server)
    except asyncio.TimeoutError:
        raise OSError("connecting to %s timed out" % server) from None


class NotAdopted(Exception):
    """Why `adopt_allowed` did not adopt a chardev: the message names the console or
    channel. ``retry``: it may work on a later open (another client holds the socket,
    or it could not be opened). ``left_out``: the adopt setting leaves its kind out
    (the caller adds what to do instead)."""

    def __init__(self, message: str, retry: bool = False, left_out: bool = False):
        super().__init__(message)
        self.retry = retry
        self.left_out = left_out


async def adopt_allowed(subject: str, filename: str,
                        allowed: Collection[str]) -> Union[FdSide, SocketSide]:
    """Adopt the chardev *filename* (kind PTY, SOCKET_SERVER or SOCKET_SERVER_HELD) of
    *subject* ("console serial0 of VM web1"), if the ``adopt`` setting *allowed* names
    its kind and it is free and local. Raises NotAdopted."""
    kind = backend_kind(filename)
    setting = "pty" if kind == PTY else "socket"
    server = socket_server(filename)
    what = "a pty (%s)" % pty_path(filename) if kind == PTY else "the socket server %s" % server
    if setting not in allowed:
        raise NotAdopted("%s is %s, which this agent does not adopt (its adopt setting leaves out %r)"
                         % (subject, what, setting), left_out=True)
    if kind == SOCKET_SERVER_HELD:
        raise NotAdopted("%s is in use by another client of %s" % (subject, server), retry=True)
    if server is not None and server.host and not await is_local_address(server.host):
        raise NotAdopted("%s is a socket server on %s, which is not an address of this host: vproxy "
                         "adopts only sockets it can reach locally" % (subject, server))
    try:
        return await adopt(filename)
    except OSError as e:
        raise NotAdopted("%s: cannot open %s: %s" % (subject, what, e.strerror or e), retry=True) from None


def fd_socket_backend(fdname: str) -> Dict[str, Any]:
    """A chardev back end: client socket on an fd QEMU received as *fdname*."""
    return {"type": "socket",
            "data": {"addr": {"type": "fd", "data": {"str": fdname}}, "server": False}}


async def socket_to_qemu(monitor: VMMonitor, cmd: str,
                         make_args: Callable[[str], Dict[str, Any]]) -> socket.socket:
    """Make a socketpair, pass one end to QEMU and run *cmd* with ``make_args(fdname)``
    (`VMMonitor.execute_with_fd`); returns the agent's end, non-blocking.

    Our copy of QEMU's end is closed in every case (QEMU holds its own); the agent's
    end too if the command failed or was cancelled."""
    ours, theirs = socket.socketpair()
    try:
        await monitor.execute_with_fd(theirs.fileno(), cmd, make_args)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    ours.setblocking(False)
    return ours


async def take_over(monitor: VMMonitor, chardev_id: str, kind: str) -> socket.socket:
    """Connect chardev *chardev_id* (of back-end *kind*: NULL, OURS or
    OURS_DISCONNECTED) to a new socketpair; returns the agent's non-blocking end."""
    if kind == OURS_DISCONNECTED:
        return await socket_to_qemu(monitor, "add_client", lambda fdname: {
            "protocol": chardev_id, "fdname": fdname})
    return await socket_to_qemu(monitor, "chardev-change", lambda fdname: {
        "id": chardev_id, "backend": fd_socket_backend(fdname)})


async def add_fd_chardev(monitor: VMMonitor, chardev_id: str) -> socket.socket:
    """``chardev-add`` *chardev_id* as an fd socket; returns the agent's end."""
    return await socket_to_qemu(monitor, "chardev-add", lambda fdname: {
        "id": chardev_id, "backend": fd_socket_backend(fdname)})
