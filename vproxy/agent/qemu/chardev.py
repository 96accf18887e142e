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
    anything else             pty, file, stdio, a user's socket...: not ours to take

Taking over means: a socketpair, one end passed to QEMU, and either ``chardev-change``
(``"server": false`` is required: QMP defaults to server) or, for a disconnected fd
socket, ``add_client {"protocol": CHARDEV_ID}``. The agent keeps the other end,
non-blocking.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, List

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
    return OTHER


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
