"""VNC: each stream is one VNC client connection of its own (`VncService`).

For every open: a socketpair, one end passed to QEMU, ``add_client {"protocol": "vnc",
"fdname": ..., "skipauth": true}``; QEMU then speaks RFB on it ("RFB 003.008"), with
no TCP listener needed (``-vnc none`` is enough). The agent copies bytes both ways.

Rules this module keeps:
- "Has this VM VNC?" is asked BEFORE any fd is passed, because with no ``-vnc`` option
  QEMU answers add_client with ``{}`` and silently drops the connection (and the fd).
  ``query-vnc-servers`` tells: ``[]`` without ``-vnc``, one server (id "default", maybe
  with no listening address) with ``-vnc none`` or ``-vnc :N``. (``query-vnc`` cannot:
  it says "disabled" for ``-vnc none`` too.) A QEMU built without VNC answers
  CommandNotFound.
- A VNC server that asks for a password (Proxmox runs ``-vnc unix:PATH,password=on``;
  ``-vnc none,password=on`` works too) is a display like any other: its server's
  "auth" is "vnc" instead of "none", and ``skipauth`` makes QEMU offer the agent's
  connections security type None all the same (verified on QEMU 7.2), so no password
  is needed or asked for: the client's certificate and the ACL have decided. `describe`
  reports the server's "auth".
- Every viewer is shared: the RFB ClientInit "shared-flag" a client sends is forced to
  1 on the way in, so a viewer asking for exclusive access does not disconnect the
  others (QEMU's default share policy, allow-exclusive, would). Only the flag byte is
  touched; see `SharedFlagFilter`.
- Half-close passes through: client EOF shuts the socket's write side (QEMU then ends
  the VNC connection, and we close the stream when it does).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Dict, Optional, Set

from vproxy.net.tasks import Nursery

from ._streams import (
    FRAME_CHUNK, STREAM_ERRORS, GoneOnQemuExit, RefuseCode, copy_socket_to_stream,
    ended_with, refuse, safe_close,
)
from .chardev import socket_to_qemu
from .errors import QemuError, QMPCommandError
from .monitor import MonitorOwner, VMMonitor


class SharedFlagFilter:
    """Rewrites the client's ClientInit shared-flag to 1 in a client->server byte flow.

    Client bytes: ProtocolVersion (12 bytes, "RFB 003.00x\\n"); for 3.7 and later the
    chosen security type (1 byte: QEMU offers only None with skipauth); then ClientInit
    (1 byte: shared-flag). After that the filter is a no-op."""

    def __init__(self) -> None:
        self._seen = 0
        self._version = bytearray()
        self._flag_at: Optional[int] = None  # offset of the shared flag in the flow
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if self.done or not data:
            return data
        start = self._seen
        self._seen += len(data)
        if len(self._version) < 12:
            self._version += data[: 12 - len(self._version)]
            if len(self._version) == 12:
                self._flag_at = _shared_flag_offset(bytes(self._version))
                if self._flag_at is None:
                    self.done = True  # not RFB as we know it: leave it alone
                    return data
        if self._flag_at is None:
            return data
        i = self._flag_at - start
        if 0 <= i < len(data):
            self.done = True
            if data[i] == 0:
                data = data[:i] + b"\x01" + data[i + 1:]
        return data


def _shared_flag_offset(version: bytes) -> Optional[int]:
    if not (version.startswith(b"RFB ") and version.endswith(b"\n")):
        return None
    try:
        major, minor = int(version[4:7]), int(version[8:11])
    except ValueError:
        return None
    if major != 3:
        return None
    return 12 if minor < 7 else 13


class VncService(MonitorOwner):
    """The VNC display of one VM: hands out one QEMU VNC connection per stream."""

    def __init__(self, vm: str):
        self.vm = vm
        self.viewers: Set[VncViewer] = set()
        self.available: Optional[bool] = None  # None: not known yet
        self.reason = ""
        self.auth = ""  # the VNC server's own auth ("none", "vnc": a password...); skipped
        self._monitor: Optional[VMMonitor] = None

    async def on_connected(self, monitor: VMMonitor) -> None:
        self._monitor = monitor
        await self.probe(monitor)

    def on_lost(self, reason: str) -> None:
        for viewer in list(self.viewers):
            viewer.gone(reason)

    async def probe(self, monitor: VMMonitor) -> bool:
        """Does this QEMU have a VNC display? Sets `available` and `reason`."""
        try:
            servers = await monitor.execute("query-vnc-servers")
        except QMPCommandError as e:
            if not e.command_not_found:
                raise
            self.available = False
            self.reason = ("VM %s has no VNC display: its QEMU was built without VNC support"
                           % self.vm)
            return False
        self.available = bool(servers)
        self.auth = str(servers[0].get("auth", "")) if servers else ""
        self.reason = "" if servers else (
            "VM %s has no VNC display: start QEMU with -vnc none (vproxy needs no VNC "
            "listener, only the display)" % self.vm)
        return self.available

    async def open(self, monitor: VMMonitor, identity: Any, mode: str) -> "VncViewer":
        if mode not in ("rw", "force"):
            raise refuse(RefuseCode.BAD_REQUEST,
                         "mode %r is not valid for VNC (rw; view-only is not supported)" % mode)
        try:
            if not await self.probe(monitor):
                raise refuse(RefuseCode.UNAVAILABLE, self.reason)
            ours = await socket_to_qemu(monitor, "add_client", lambda fdname: {
                "protocol": "vnc", "fdname": fdname, "skipauth": True})
        except QemuError as e:
            raise refuse(RefuseCode.UNAVAILABLE, str(e)) from None
        viewer = VncViewer(self, monitor, identity, ours)
        self.viewers.add(viewer)
        return viewer

    def describe(self) -> Dict[str, Any]:
        return {"available": bool(self.available), "viewers": len(self.viewers),
                "clients": sorted(str(v.identity) for v in self.viewers),
                "reason": self.reason, "auth": self.auth}


class VncViewer(GoneOnQemuExit):
    """One VNC connection: the provider's Channel."""

    def __init__(self, service: VncService, monitor: VMMonitor, identity: Any,
                 sock: socket.socket):
        self.service = service
        self._monitor = monitor
        self.identity = identity
        self.info: Dict[str, str] = {"vnc": "shared"}
        self._sock = sock
        self._stream: Any = None
        self._gone_reason = ""
        self._children: Optional[Nursery] = None

    async def run(self, stream: Any) -> None:
        try:
            if not self._adopt(stream):
                return
            async with Nursery() as children:
                self._children = children  # for gone()
                to_client = children.start(copy_socket_to_stream(self._sock, stream))
                to_qemu = children.start(self._copy_in(stream))
                await children.wait_any()
                if ended_with(to_qemu, "eof"):
                    # The client half-closed; QEMU ends the connection in a moment.
                    await asyncio.wait([to_client], timeout=5.0)
                if ended_with(to_client, "eof"):
                    # QEMU ended the VNC connection: normal, unless QEMU itself is gone.
                    if not await self._monitor.is_alive():
                        self.gone(self._monitor.gone_message())
                        return
                    await safe_close(stream)
                    await asyncio.wait([to_qemu], timeout=5.0)  # the client's half of the close
        finally:
            self._sock.close()
            self.service.viewers.discard(self)

    async def _copy_in(self, stream: Any) -> str:
        """Client -> QEMU; "eof" after the client's half-close, "error" if it broke."""
        loop = asyncio.get_event_loop()
        shared = SharedFlagFilter()
        try:
            while True:
                data = await stream.read(FRAME_CHUNK)
                if not data:
                    break
                await loop.sock_sendall(self._sock, shared.feed(data))
        except STREAM_ERRORS:
            return "error"
        except OSError:
            return "error"
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return "eof"
