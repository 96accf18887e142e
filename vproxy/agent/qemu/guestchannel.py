"""Guest channels: virtio-serial ports, one client each (`GuestChannels`).

A port is named by its virtio-serial name (``-device virtserialport,name=org.x.y``;
the guest sees /dev/virtio-ports/org.x.y). Opening one:
- an existing port whose chardev is null (``-chardev null,id=c -device
  virtserialport,chardev=c,name=...``) is taken over with ``chardev-change`` (QEMU
  allows that for virtio-serial only while the VM runs), one we held before is
  re-attached with ``add_client``;
- a port whose chardev is a unix or TCP socket server on this host (the guest agent's
  shape in libvirt and Proxmox: ``-chardev socket,id=qga0,path=/var/run/qemu-server/
  100.qga,server=on,wait=off -device virtserialport,chardev=qga0,name=org.qemu.
  guest_agent.0``) is adopted, unchanged, by connecting to it as its client, if the
  ``adopt`` setting names "socket" (see chardev.adopt_allowed): refused "in use" while
  another client holds it; this works while the VM is paused too;
- any other back end (a pty, a file, a socket client...) is left alone and the open
  refused, saying why;
- mode "hotplug" adds the port when it does not exist: ``chardev-add`` (fd socket)
  then ``device_add virtserialport`` with ``id`` "vproxy-p-XXXX" (needs ``-device
  virtio-serial``); when the stream ends the port is removed again (``device_del``,
  wait for DEVICE_DELETED, ``chardev-remove``). Ports with such an id found after an
  agent restart are treated as ours: re-attached, and removed when done.

One client per port: a second open is refused BUSY, naming the holder. describe()
says how a held port is held ("taken over" or "adopted socket", as for consoles).
``VSERPORT_CHANGE`` (the guest opened/closed its end; QEMU sends it only for ports
with an ``id``) reaches the client as NOTICE ``{"event": "guest-open"}`` /
``{"event": "guest-close"}``; ACCEPT info carries ``guest`` = open | closed | unknown.
Half-close: after the client's EOF the agent keeps sending what the guest writes until
the guest closes the port or has been quiet for `linger` seconds, then closes its side
(a virtio-serial port has no EOF of its own to pass on).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any, Dict, List, Optional, Sequence

from vproxy.net.tasks import Nursery

from . import chardev
from ._streams import (
    FRAME_CHUNK, STREAM_ERRORS, GoneOnQemuExit, RefuseCode, ended_with, refuse, safe_close,
    safe_notify,
)
from .console import DEFAULT_LINGER
from .errors import QemuError, QMPCommandError
from .hostside import TAKEN_OVER, HostSide, SocketSide
from .monitor import MonitorOwner, VMMonitor

log = logging.getLogger("vproxy.qemu.guestchannel")

PORT_TYPES = ("virtserialport", "virtconsole")
HOTPLUG_PREFIX = "vproxy-p-"
_NEEDS_RUNNING = "Chardev user does not support chardev hotswap"


class GuestChannels(MonitorOwner):
    """The virtio-serial ports of one VM and who holds them."""

    def __init__(self, vm: str, *, linger: float = DEFAULT_LINGER,
                 adopt: Sequence[str] = chardev.ADOPT_KINDS):
        self.vm = vm
        self.linger = linger
        self.adopt = tuple(adopt)  # which chardevs made by others to adopt (only "socket" applies)
        self.holders: Dict[str, GuestChannel] = {}  # port name -> the open channel
        self._reserved: Dict[str, str] = {}  # port name -> identity, while opening
        self._guest_open: Dict[str, bool] = {}  # device id -> VSERPORT_CHANGE "open"
        self._deleted: Dict[str, asyncio.Future] = {}  # device id -> DEVICE_DELETED
        self._monitor: Optional[VMMonitor] = None
        self._known: List[Dict[str, str]] = []  # last listing, for describe()

    async def on_connected(self, monitor: VMMonitor) -> None:
        self._monitor = monitor
        self._guest_open.clear()
        try:
            await self.list_ports(monitor)
        except QemuError:
            pass

    def on_event(self, event: Dict[str, Any]) -> None:
        name, data = event.get("event"), event.get("data") or {}
        if name == "VSERPORT_CHANGE":
            dev_id, is_open = str(data.get("id", "")), bool(data.get("open"))
            self._guest_open[dev_id] = is_open
            for ch in self.holders.values():
                if ch.device_id == dev_id:
                    ch.guest_changed(is_open)
        elif name == "DEVICE_DELETED":
            fut = self._deleted.pop(str(data.get("device", "")), None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    def on_lost(self, reason: str) -> None:
        for ch in list(self.holders.values()):
            ch.gone(reason)
        for fut in self._deleted.values():
            if not fut.done():
                fut.set_result(None)
        self._deleted.clear()

    async def list_ports(self, monitor: VMMonitor) -> List[Dict[str, str]]:
        """Every virtio-serial port: name, chardev, device id, QOM path, back end."""
        devices = await chardev.find_devices(monitor, PORT_TYPES, ("name", "chardev"))
        backends = await chardev.chardev_backends(monitor)
        ports = []
        for dev in devices:
            cid = str(dev.props.get("chardev") or "")
            ports.append({"name": str(dev.props.get("name") or ""), "chardev": cid,
                          "id": dev.id, "path": dev.path, "backend": backends.get(cid, "")})
        self._known = ports
        return ports

    async def open(self, monitor: VMMonitor, name: str, identity: Any,
                   mode: str) -> "GuestChannel":
        if mode not in ("rw", "hotplug"):
            raise refuse(RefuseCode.BAD_REQUEST,
                         "mode %r is not valid for a guest channel (rw or hotplug)" % mode)
        if not name:
            raise refuse(RefuseCode.BAD_REQUEST, "a guest channel needs a name (channel:NAME)")
        holder = self.holders.get(name)
        held_by = str(holder.identity) if holder is not None else self._reserved.get(name)
        if held_by is not None:
            raise refuse(RefuseCode.BUSY, "guest channel %s of VM %s is in use by %s"
                         % (name, self.vm, held_by))
        self._reserved[name] = str(identity)
        try:
            ch = await self._open(monitor, name, identity, mode)
        except QemuError as e:
            raise refuse(RefuseCode.UNAVAILABLE, str(e)) from None
        finally:
            del self._reserved[name]
        self.holders[name] = ch
        return ch

    async def _open(self, monitor: VMMonitor, name: str, identity: Any,
                    mode: str) -> "GuestChannel":
        ports = await self.list_ports(monitor)
        port = next((p for p in ports if p["name"] == name), None)
        if port is None:
            if mode != "hotplug":
                names = ", ".join(p["name"] for p in ports if p["name"]) or "none"
                raise refuse(RefuseCode.NO_SUCH_CHANNEL,
                             "VM %s has no guest channel %r (channels: %s); open it with mode "
                             "hotplug to add one (the VM needs -device virtio-serial)"
                             % (self.vm, name, names))
            return await self._hotplug(monitor, name, identity)
        cid, kind = port["chardev"], chardev.backend_kind(port["backend"])
        if kind in (chardev.SOCKET_SERVER, chardev.SOCKET_SERVER_HELD):
            try:
                side = await chardev.adopt_allowed("guest channel %s of VM %s" % (name, self.vm),
                                                   port["backend"], self.adopt)
            except chardev.NotAdopted as e:
                how_to = (": add it, or give the port a null chardev (-chardev null,id=%s)" % cid
                          if e.left_out else "")
                raise refuse(RefuseCode.UNAVAILABLE, str(e) + how_to) from None
            log.info("VM %s: guest channel %s adopted (%s)", self.vm, name, port["backend"])
            return GuestChannel(self, monitor, name, identity, side, port["id"], "", False)
        if kind not in (chardev.NULL, chardev.OURS, chardev.OURS_DISCONNECTED):
            raise refuse(RefuseCode.UNAVAILABLE,
                         "guest channel %s of VM %s is connected to %r, which vproxy does not "
                         "take over: give the port a null chardev (-chardev null,id=%s)"
                         % (name, self.vm, port["backend"], cid or "ID"))
        try:
            sock = await chardev.take_over(monitor, cid, kind)
        except QMPCommandError as e:
            if _NEEDS_RUNNING in e.desc:
                raise refuse(RefuseCode.UNAVAILABLE,
                             "guest channel %s of VM %s can be taken over only while the VM "
                             "runs (it is %s)" % (name, self.vm, monitor.state)) from None
            raise
        hotplugged = port["id"].startswith(HOTPLUG_PREFIX)
        return GuestChannel(self, monitor, name, identity, SocketSide(sock, TAKEN_OVER), port["id"],
                            cid if hotplugged else "", hotplugged)

    async def _hotplug(self, monitor: VMMonitor, name: str, identity: Any) -> "GuestChannel":
        token = secrets.token_hex(4)
        cid, dev_id = "vproxy-c-" + token, HOTPLUG_PREFIX + token
        sock = await chardev.add_fd_chardev(monitor, cid)
        try:
            await monitor.execute("device_add", {"driver": "virtserialport", "chardev": cid,
                                                 "name": name, "id": dev_id})
        except BaseException as e:
            sock.close()
            try:
                await monitor.execute("chardev-remove", {"id": cid})
            except QemuError:
                pass
            if isinstance(e, QMPCommandError) and "virtio-serial-bus" in e.desc:
                raise refuse(RefuseCode.UNAVAILABLE,
                             "VM %s has no virtio-serial controller to add guest channel %s "
                             "to: start QEMU with -device virtio-serial" % (self.vm, name)) from None
            raise
        log.info("VM %s: hotplugged guest channel %s (%s)", self.vm, name, dev_id)
        return GuestChannel(self, monitor, name, identity, SocketSide(sock, TAKEN_OVER), dev_id, cid, True)

    async def unplug(self, monitor: VMMonitor, dev_id: str, cid: str, timeout: float = 10.0) -> None:
        """device_del, wait for DEVICE_DELETED, chardev-remove."""
        fut = asyncio.get_event_loop().create_future()
        self._deleted[dev_id] = fut
        try:
            await monitor.execute("device_del", {"id": dev_id})
            await asyncio.wait_for(fut, timeout)
            if monitor.connected:
                await monitor.execute("chardev-remove", {"id": cid})
        except (QemuError, asyncio.TimeoutError) as e:
            log.warning("VM %s: removing guest channel device %s: %s", self.vm, dev_id, e)
        finally:
            self._deleted.pop(dev_id, None)

    def guest_state(self, dev_id: str) -> str:
        if dev_id not in self._guest_open:
            return "unknown"
        return "open" if self._guest_open[dev_id] else "closed"

    def describe(self) -> List[Dict[str, str]]:
        """One dict per port: name, holder, guest (open, closed, unknown), hotplugged
        (yes, no), held and held_where (how the holder's side is held: "taken over" or
        "adopted socket", and the socket adopted; "" while nobody holds the port)."""
        out = []
        for port in self._known:
            ch = self.holders.get(port["name"])
            out.append({"name": port["name"], "holder": str(ch.identity) if ch else "",
                        "guest": self.guest_state(port["id"]) if port["id"] else "unknown",
                        "hotplugged": "yes" if port["id"].startswith(HOTPLUG_PREFIX) else "no",
                        "held": ch.side.how if ch else "", "held_where": ch.side.where if ch else ""})
        for name, ch in self.holders.items():
            if not any(p["name"] == name for p in self._known):
                out.append({"name": name, "holder": str(ch.identity),
                            "guest": self.guest_state(ch.device_id),
                            "hotplugged": "yes" if ch.hotplugged else "no",
                            "held": ch.side.how, "held_where": ch.side.where})
        return out


class GuestChannel(GoneOnQemuExit):
    """One client's hold on one virtio-serial port: the provider's Channel."""

    def __init__(self, owner: GuestChannels, monitor: VMMonitor, name: str, identity: Any,
                 side: HostSide, device_id: str, chardev_id: str, hotplugged: bool):
        self.owner = owner
        self.monitor = monitor
        self.name = name
        self.identity = identity
        self.device_id = device_id
        self.chardev_id = chardev_id
        self.hotplugged = hotplugged
        self.info: Dict[str, str] = {
            "channel": name,
            "guest": owner.guest_state(device_id) if device_id else "unknown",
            "hotplugged": "yes" if hotplugged else "no",
        }
        self.side = side  # the agent's end: taken over (socketpair) or adopted (socket server)
        self._stream: Any = None
        self._gone_reason = ""
        self._guest_closed = asyncio.Event()
        self._last_guest_data = time.monotonic()
        self._children: Optional[Nursery] = None
        self._pending: List[Dict[str, str]] = []  # notices before run()

    def __repr__(self) -> str:
        return "<GuestChannel %s of VM %s held by %s>" % (self.name, self.owner.vm, self.identity)

    def guest_changed(self, is_open: bool) -> None:
        if is_open:
            self._guest_closed.clear()
        else:
            self._guest_closed.set()
        fields = {"event": "guest-open" if is_open else "guest-close"}
        if self._stream is None:
            self._pending.append(fields)
        else:
            safe_notify(self._stream, fields)

    async def run(self, stream: Any) -> None:
        try:
            if not self._adopt(stream):
                return
            for fields in self._pending:
                safe_notify(stream, fields)
            self._pending = []
            async with Nursery() as children:
                self._children = children  # for gone()
                to_client = children.start(self._copy_out())
                to_guest = children.start(self._copy_in())
                await children.wait_any()
                if ended_with(to_guest, "eof"):
                    await self._linger(to_client)
                    if not self._gone_reason:
                        await safe_close(stream)
                elif ended_with(to_client, "eof"):
                    await self._qemu_closed()
        finally:
            self.side.close()
            if self.owner.holders.get(self.name) is self:
                del self.owner.holders[self.name]
            if self.hotplugged and self.monitor.connected:
                await self.owner.unplug(self.monitor, self.device_id, self.chardev_id)

    async def _copy_out(self) -> str:
        """Guest -> client: "eof" when QEMU closed our end, "error" if the stream broke."""
        async for data in self.side.chunks():
            self._last_guest_data = time.monotonic()
            try:
                await self._stream.write(data)
            except STREAM_ERRORS:
                return "error"
        return "eof"

    async def _copy_in(self) -> str:
        """Client -> guest: "eof" at the client's half-close, "error" if it broke."""
        try:
            while True:
                data = await self._stream.read(FRAME_CHUNK)
                if not data:
                    return "eof"
                await self.side.send(data)
        except STREAM_ERRORS:
            return "error"
        except OSError:
            return "error"

    async def _linger(self, to_client: "asyncio.Task") -> None:
        """After the client's EOF: forward until the guest closes the port or is quiet."""
        linger = self.owner.linger
        while not to_client.done() and not self._guest_closed.is_set():
            quiet = time.monotonic() - self._last_guest_data
            if quiet >= linger:
                return
            await asyncio.wait([to_client], timeout=linger - quiet)

    async def _qemu_closed(self) -> None:
        """Our end hit EOF: QEMU exited, or someone changed the chardev behind our back."""
        if self._gone_reason:
            return
        if await self.monitor.is_alive():
            self.gone("guest channel %s of VM %s was disconnected by QEMU"
                      % (self.name, self.owner.vm))
        else:
            self.gone(self.monitor.gone_message())
