"""Managed serial consoles: taken over when the VM appears, always read, many viewers.

Rules this module keeps:
- As soon as a VM's QMP connects (`ConsoleSet.on_connected`), every serial port's
  chardev is taken over (vproxy.agent.qemu.chardev): boot output is captured before anyone
  attaches. A chardev someone else gave a host side is adopted instead, unchanged, if
  the ``adopt`` setting allows its kind: a pty is opened raw ("adopted pty"), a socket
  server on this host is connected to ("adopted socket"); one held by another client
  is refused "in use" and tried again at the next open. Either way the console reads
  a `HostSide` (vproxy.agent.qemu.hostside), and everything below is the same.
  To capture boot output from the very first byte, start QEMU paused (``-S``) and
  either give the agent ``resume_prelaunch`` (``vproxy serve --resume-prelaunch``):
  once every owner's ``on_connected`` has run, a VM in "prelaunch" (-S, never ran)
  gets ``cont`` (VMMonitor._resume_from_prelaunch; on every QEMU (re)start; never a
  "paused" or "inmigrate" VM), or resume it yourself (``cont``) once ``vproxy ls``
  shows the console attached. Off by default: libvirt starts VMs with -S and resumes
  them itself.
- The agent reads every console ALWAYS, into a `RingBuffer` (default 1 MiB, allocated as
  output arrives: a console that printed nothing costs no history) where each
  byte has an offset that only grows (also across QEMU restarts: the ring and offsets
  belong to the console, not to one QEMU process), and optionally appends it to a log
  file. Nothing a viewer does can slow this reader: viewers copy out of the ring at
  their own pace, and one that falls more than the ring's size behind gets a
  ``{"event": "lost", "bytes": N, "offset": NEW}`` NOTICE and continues at the oldest
  byte still held. The ring is the only buffer, so memory does not grow with viewers.
- Any number of viewers; at most one writer. Modes:
    ro     read-only, never writes;
    rw     the writer if there is none, else read-only until the writer leaves (then
           the longest-waiting rw viewer is promoted);
    force  becomes the writer now; the former writer turns read-only (and gets the role
           back when the forcing viewer leaves).
  Every change of writer is told to every viewer:
  ``{"event": "writer-changed", "writer": IDENTITY or "", "mode": "rw"|"ro"}`` (mode:
  the receiving viewer's own mode from now on).
- Input from a read-only viewer is dropped, and the viewer is told with a NOTICE
  ``{"event": "read-only", "writer": IDENTITY}`` (at most one per second) rather than a
  reset: a spy who types by mistake keeps watching.
- Open options: ``replay=N`` (the last N bytes, or ``all``) or ``offset=N`` (resume: the
  bytes from offset N on, no gap and no repeat; if the ring no longer reaches back to
  N, a "lost" NOTICE first, then the oldest byte held). ACCEPT info: ``console`` (the
  chardev id), ``offset`` (the console's current end), ``start`` (the offset of the first
  byte this viewer will get), ``writer``, ``mode``, ``epoch`` (changes when the agent's
  console object is new, i.e. offsets restarted from 0).
- When the viewer half-closes, it stops being a writer; output keeps flowing until it
  has caught up and the console has been quiet for `linger` seconds, then the agent
  closes its side (so ``echo cmd | vproxy console`` shows the answer).
- When QEMU goes away every viewer's stream is reset (CHANNEL_GONE) with a sentence
  such as "VM web1 went away (QEMU exited)".
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from typing import Any, Dict, List, Optional, Sequence

from vproxy.net.tasks import Nursery

from . import chardev
from ._streams import (
    FRAME_CHUNK, STREAM_ERRORS, RefuseCode, ResetCode, int_option, refuse, safe_close,
    safe_notify, safe_reset,
)
from .errors import QemuError
from .hostside import TAKEN_OVER, HostSide, SocketSide
from .monitor import MonitorOwner, VMMonitor
from .ring import RingBuffer

log = logging.getLogger("vproxy.qemu.console")

#: QOM types of serial-port front ends whose chardev is a console.
SERIAL_TYPES = ("isa-serial", "pci-serial", "usb-serial", "pl011")
DEFAULT_RING_SIZE = 1 << 20
DEFAULT_LINGER = 1.0

# ManagedConsole.status values
ATTACHED = "attached"
DETACHED = "detached"  # we held it but lost the connection while QEMU lives on
UNAVAILABLE = "unavailable"  # cannot be taken over (reason says why)

_HOW_TO = "start QEMU with -serial null, or -chardev null,id=%s -serial chardev:%s"


class ManagedConsole:
    """One serial port of one VM: the agent's end of its chardev, ring, log, viewers."""

    def __init__(self, vm: str, chardev_id: str, *, ring_size: int = DEFAULT_RING_SIZE,
                 log_path: Optional[str] = None, linger: float = DEFAULT_LINGER):
        self.vm = vm
        self.id = chardev_id
        self.ring = RingBuffer(ring_size)
        self.epoch = secrets.token_hex(4)
        self.log_path = log_path
        self.linger = linger
        self.status = DETACHED
        self.reason = "not taken over yet"
        self.held = ""  # how the chardev is held while attached: hostside.TAKEN_OVER, ...
        self.held_where = ""  # the pty or socket adopted
        self.retry = False  # UNAVAILABLE for now only (in use, cannot open): try again on open
        self.viewers: List[ConsoleViewer] = []
        self.writer: Optional[ConsoleViewer] = None
        self._side: Optional[HostSide] = None
        self._reader: Optional[asyncio.Task] = None
        self._input_lock: Optional[asyncio.Lock] = None
        self._log = None  # type: Any
        self._monitor: Optional[VMMonitor] = None

    def __repr__(self) -> str:
        return "<ManagedConsole %s/%s %s @%d>" % (self.vm, self.id, self.status, self.ring.end)

    @property
    def offset(self) -> int:
        return self.ring.end

    # ------------------------------------------------------------------ QEMU side

    def attach(self, side: HostSide, monitor: Optional[VMMonitor] = None) -> None:
        """Start reading *side*, the agent's end of the chardev."""
        self._close_side()
        self._side = side
        self._monitor = monitor
        self.status, self.reason = ATTACHED, ""
        self.held, self.held_where = side.how, side.where
        if self.log_path and self._log is None:
            try:
                self._log = open(self.log_path, "ab", buffering=0)
            except OSError as e:
                log.error("console %s of VM %s: cannot open log %s: %s", self.id, self.vm,
                          self.log_path, e)
        self._reader = asyncio.ensure_future(self._read_loop(side))

    def mark_unavailable(self, reason: str, retry: bool = False) -> None:
        """*retry*: the next open tries again (a socket server's other client may have left)."""
        self._close_side()
        self.status, self.reason = UNAVAILABLE, reason
        self.retry = retry
        self.end_viewers(reason)

    def detach(self, reason: str) -> None:
        """QEMU went away (or dropped our end): stop reading, reset every viewer."""
        self._close_side()
        self.status, self.reason = DETACHED, reason
        self.end_viewers(reason)

    def close(self) -> None:
        self.detach("the agent is shutting down")
        if self._log is not None:
            self._log.close()
            self._log = None

    def end_viewers(self, reason: str) -> None:
        viewers, self.viewers, self.writer = self.viewers, [], None
        for viewer in viewers:
            viewer.gone(reason)

    def _close_side(self) -> None:
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
        self._reader = None
        side, self._side = self._side, None
        if side is not None:
            self._drain(side)  # the last words of a dying QEMU (a panic...) are kept
            side.close()

    def _drain(self, side: HostSide) -> None:
        while True:
            data = side.read_nowait()
            if data is None:
                return
            self._received(data)

    async def _read_loop(self, side: HostSide) -> None:
        async for data in side.chunks():
            self._received(data)
        # QEMU closed our end: usually it exited (the monitor will say so in a moment),
        # else someone changed the chardev behind our back.
        if self._side is not side:
            return
        self._side = None
        self._reader = None
        side.close()
        reason = ("console %s of VM %s lost its connection to QEMU (was its chardev changed "
                  "by someone else?)" % (self.id, self.vm))
        self.status, self.reason = DETACHED, reason
        monitor = self._monitor
        if monitor is not None and not await monitor.is_alive():
            reason = monitor.gone_message()  # QEMU exited: the monitor says so too
        if self._side is None and self.status == DETACHED:
            self.detach(reason)

    def _received(self, data: bytes) -> None:
        self.ring.append(data)
        if self._log is not None:
            try:
                self._log.write(data)
            except OSError as e:
                log.error("console %s of VM %s: log %s: %s; logging stops", self.id,
                          self.vm, self.log_path, e)
                self._log.close()
                self._log = None
        for viewer in self.viewers:
            viewer.wake()

    async def send_input(self, data: bytes) -> None:
        """Write *data* to the guest (waits while the guest does not read)."""
        if self._input_lock is None:
            self._input_lock = asyncio.Lock()
        async with self._input_lock:
            side = self._side
            if side is None:
                return  # detached: the viewer is being reset anyway
            try:
                await side.send(data)
            except OSError:
                pass  # the reader sees the EOF and handles it

    # ------------------------------------------------------------------ viewers

    def open_viewer(self, identity: Any, mode: str, options: Dict[str, str]) -> "ConsoleViewer":
        """Register a viewer (the writer role is decided now); refuses bad options."""
        if mode not in ("ro", "rw", "force"):
            raise refuse(RefuseCode.BAD_REQUEST,
                         "mode %r is not valid for a console (ro, rw or force)" % mode)
        if self.status == UNAVAILABLE:
            raise refuse(RefuseCode.UNAVAILABLE, self.reason)
        if self.status != ATTACHED:
            raise refuse(RefuseCode.UNAVAILABLE, "console %s of VM %s is not available: %s"
                         % (self.id, self.vm, self.reason))
        replay, offset = options.get("replay"), int_option(options, "offset")
        if replay is not None and offset is not None:
            raise refuse(RefuseCode.BAD_REQUEST, "give either replay or offset, not both")
        end, start = self.ring.end, self.ring.start
        if replay == "all":
            offset = start
        elif replay is not None:
            offset = max(0, end - (int_option(options, "replay") or 0))
        if offset is not None and offset > end:
            raise refuse(RefuseCode.BAD_REQUEST,
                         "offset %d is beyond the end of console %s of VM %s (%d, epoch %s)"
                         % (offset, self.id, self.vm, end, self.epoch))
        viewer = ConsoleViewer(self, identity, wants_write=(mode != "ro"))
        if offset is None:
            viewer.pos = end
        elif offset < start:
            viewer.pos = start
            viewer.notify({"event": "lost", "bytes": str(start - offset), "offset": str(start)})
        else:
            viewer.pos = offset
        self.viewers.append(viewer)
        if mode == "force" or (mode == "rw" and self.writer is None):
            self._set_writer(viewer)
        viewer.info = {
            "console": self.id,
            "offset": str(end),
            "start": str(viewer.pos),
            "writer": _name(self.writer),
            "mode": viewer.mode,
            "epoch": self.epoch,
        }
        return viewer

    def remove_viewer(self, viewer: "ConsoleViewer") -> None:
        if viewer in self.viewers:
            self.viewers.remove(viewer)
        if self.writer is viewer:
            waiting = [v for v in self.viewers if v.wants_write and not v.ended]
            self._set_writer(waiting[0] if waiting else None)

    def release_writer(self, viewer: "ConsoleViewer") -> None:
        viewer.wants_write = False
        if self.writer is viewer:
            waiting = [v for v in self.viewers if v.wants_write and not v.ended]
            self._set_writer(waiting[0] if waiting else None)

    def _set_writer(self, writer: "Optional[ConsoleViewer]") -> None:
        old, self.writer = self.writer, writer
        if old is writer:
            return
        for v in self.viewers:
            v.mode = "rw" if v is writer else "ro"
        for v in self.viewers:
            if v.info:  # a viewer being opened learns it from its ACCEPT info instead
                v.notify({"event": "writer-changed", "writer": _name(writer), "mode": v.mode})

    def describe(self) -> Dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "reason": self.reason,
            "held": self.held if self.status == ATTACHED else "",
            "held_where": self.held_where if self.status == ATTACHED else "",
            "offset": self.ring.end,
            "buffered": len(self.ring),
            "viewers": [str(v.identity) for v in self.viewers],
            "writer": _name(self.writer),
            "log": self.log_path or "",
        }


class ConsoleViewer:
    """One stream watching (and maybe writing to) a console: the provider's Channel."""

    def __init__(self, console: ManagedConsole, identity: Any, wants_write: bool):
        self.console = console
        self.identity = identity
        self.wants_write = wants_write
        self.mode = "ro"
        self.pos = 0  # offset of the next byte to send
        self.info: Dict[str, str] = {}
        self.ended = False
        self._stream: Any = None
        self._pending: List[Dict[str, str]] = []  # notices before run()
        self._gone_reason = ""
        self._wake_event: Optional[asyncio.Event] = None
        self._children: Optional[Nursery] = None
        self._last_ro_notice = 0.0

    def __repr__(self) -> str:
        return "<ConsoleViewer %s on %s/%s %s @%d>" % (
            self.identity, self.console.vm, self.console.id, self.mode, self.pos)

    def notify(self, fields: Dict[str, str]) -> None:
        if self._stream is None:
            self._pending.append(fields)
        else:
            safe_notify(self._stream, fields)

    def wake(self) -> None:
        if self._wake_event is not None:
            self._wake_event.set()

    def gone(self, reason: str) -> None:
        """The console went away: reset the stream with *reason*."""
        if self.ended:
            return
        self._gone_reason = reason
        self.ended = True
        if self._stream is not None:
            safe_reset(self._stream, ResetCode.CHANNEL_GONE, reason)
        if self._children is not None:
            self._children.cancel()
        self.console.remove_viewer(self)

    async def run(self, stream: Any) -> None:
        self._stream = stream
        if self.ended:
            safe_reset(stream, ResetCode.CHANNEL_GONE, self._gone_reason)
            return
        self._wake_event = asyncio.Event()
        for fields in self._pending:
            safe_notify(stream, fields)
        self._pending = []
        try:
            async with Nursery() as children:
                self._children = children  # for gone()
                children.start(self._pump_out())
                inp = children.start(self._pump_in())
                await children.wait_any()
                if inp.done() and not inp.cancelled() and inp.exception() is None:
                    await safe_close(stream)  # the client half-closed and we lingered
        except _StreamOver:
            pass  # the stream was reset or the session ended while reading it
        finally:
            if not self.ended:
                self.ended = True
                self.console.remove_viewer(self)

    async def _pump_out(self) -> None:
        ring = self.console.ring
        assert self._wake_event is not None
        try:
            while True:
                if self.pos < ring.start:
                    lost, self.pos = ring.start - self.pos, ring.start
                    self.notify({"event": "lost", "bytes": str(lost), "offset": str(self.pos)})
                if self.pos >= ring.end:
                    self._wake_event.clear()
                    await self._wake_event.wait()
                    continue
                chunk = ring.read(self.pos, FRAME_CHUNK)
                await self._stream.write(chunk)
                self.pos += len(chunk)
        except STREAM_ERRORS:
            return

    async def _pump_in(self) -> None:
        console = self.console
        try:
            while True:
                data = await self._stream.read(FRAME_CHUNK)
                if not data:
                    break
                if console.writer is self:
                    await console.send_input(data)
                else:
                    now = time.monotonic()
                    if now - self._last_ro_notice >= 1.0:
                        self._last_ro_notice = now
                        self.notify({"event": "read-only", "writer": _name(console.writer)})
        except STREAM_ERRORS:
            raise _StreamOver() from None
        # Half-closed by the client: no more input; linger while output still flows.
        console.release_writer(self)
        ring = console.ring
        last_end, quiet_since = ring.end, time.monotonic()
        while True:
            await asyncio.sleep(min(0.05, console.linger / 4) if console.linger > 0 else 0.01)
            if ring.end != last_end:
                last_end, quiet_since = ring.end, time.monotonic()
            elif self.pos >= ring.end and time.monotonic() - quiet_since >= console.linger:
                return


class _StreamOver(Exception):
    """The stream was reset or the session ended: just stop."""


class ConsoleSet(MonitorOwner):
    """All consoles of one VM; takes them over whenever its QEMU (re)appears."""

    def __init__(self, vm: str, *, ring_size: int = DEFAULT_RING_SIZE,
                 log_dir: Optional[str] = None, linger: float = DEFAULT_LINGER,
                 adopt: Sequence[str] = chardev.ADOPT_KINDS):
        self.vm = vm  # the VM's name in messages (it may change: vproxy.agent.qemu.vms)
        self.log_name = vm  # the VM's name in log file names (it does not)
        self.adopt = tuple(adopt)  # which kinds of chardev made by others to adopt: "pty", "socket"
        self.ring_size = ring_size
        self.log_dir = log_dir
        self.linger = linger
        self.consoles: Dict[str, ManagedConsole] = {}  # in port order: the first is "console"
        self._monitor: Optional[VMMonitor] = None

    def __repr__(self) -> str:
        return "<ConsoleSet %s %s>" % (self.vm, list(self.consoles))

    async def on_connected(self, monitor: VMMonitor) -> None:
        self._monitor = monitor
        devices = await chardev.find_devices(monitor, SERIAL_TYPES)
        devices = [d for d in devices if d.props.get("chardev")]
        devices.sort(key=lambda d: (d.type != "isa-serial", d.path.rsplit("/", 1)[0],
                                    _index(d.path)))
        backends = await chardev.chardev_backends(monitor)
        consoles: Dict[str, ManagedConsole] = {}
        for dev in devices:
            cid = str(dev.props["chardev"])
            console = self.consoles.get(cid) or self._new_console(cid)
            consoles[cid] = console
            await self._take_over(monitor, console, backends.get(cid, ""))
        for cid, old in self.consoles.items():
            if cid not in consoles:
                old.close()
        self.consoles = consoles

    def _new_console(self, cid: str) -> ManagedConsole:
        log_path = None
        if self.log_dir:
            log_path = os.path.join(self.log_dir, "%s.%s.log" % (self.log_name, cid))
        return ManagedConsole(self.vm, cid, ring_size=self.ring_size, log_path=log_path,
                       linger=self.linger)

    async def _take_over(self, monitor: VMMonitor, console: ManagedConsole, filename: str) -> None:
        kind = chardev.backend_kind(filename)
        cid = console.id
        if kind == chardev.MUX:
            console.mark_unavailable(
                "console %s of VM %s is a mux chardev (-serial mon:stdio or -nographic) and "
                "cannot be taken over: %s" % (cid, self.vm, _HOW_TO % (cid, cid)))
            return
        if kind in (chardev.PTY, chardev.SOCKET_SERVER, chardev.SOCKET_SERVER_HELD):
            await self._adopt(monitor, console, filename)
            return
        if kind == chardev.OTHER:
            console.mark_unavailable(
                "console %s of VM %s is connected to %r, which vproxy does not take over: %s"
                % (cid, self.vm, filename, _HOW_TO % (cid, cid)))
            return
        try:
            sock = await chardev.take_over(monitor, cid, kind)
        except QemuError as e:
            console.mark_unavailable("console %s of VM %s cannot be taken over: %s"
                                     % (cid, self.vm, e))
            return
        console.attach(SocketSide(sock, TAKEN_OVER), monitor)
        log.info("VM %s: console %s taken over (%s)", self.vm, cid, filename)

    async def _adopt(self, monitor: VMMonitor, console: ManagedConsole, filename: str) -> None:
        """Become the client of a pty or socket server chardev someone else made."""
        cid = console.id
        try:
            side = await chardev.adopt_allowed("console %s of VM %s" % (cid, self.vm), filename, self.adopt)
        except chardev.NotAdopted as e:
            how_to = ": add it, or %s" % (_HOW_TO % (cid, cid)) if e.left_out else ""
            console.mark_unavailable(str(e) + how_to, retry=e.retry)
            return
        console.attach(side, monitor)
        log.info("VM %s: console %s adopted (%s)", self.vm, cid, filename)

    def on_lost(self, reason: str) -> None:
        for console in self.consoles.values():
            console.detach(reason)

    async def get(self, name: Optional[str]) -> ManagedConsole:
        """The console *name* (chardev id, or serialN for the N-th port), or the first."""
        if not self.consoles:
            raise refuse(RefuseCode.NO_SUCH_CHANNEL,
                         "VM %s has no serial console: start QEMU with -serial null" % self.vm)
        if not name:
            console = next(iter(self.consoles.values()))
        elif name in self.consoles:
            console = self.consoles[name]
        elif name.startswith("serial") and name[6:].isdigit() and int(name[6:]) < len(self.consoles):
            console = list(self.consoles.values())[int(name[6:])]
        else:
            raise refuse(RefuseCode.NO_SUCH_CHANNEL, "VM %s has no console %r (consoles: %s)"
                         % (self.vm, name, ", ".join(self.consoles)))
        monitor = self._monitor
        if ((console.status == DETACHED or (console.status == UNAVAILABLE and console.retry))
                and monitor is not None and monitor.connected):
            # We lost our end while QEMU lives on, or another client held the socket we
            # adopt: try (again) to get it.
            try:
                backends = await chardev.chardev_backends(monitor)
            except QemuError:
                backends = {}
            await self._take_over(monitor, console, backends.get(console.id, ""))
        return console

    def close(self) -> None:
        for console in self.consoles.values():
            console.close()

    def describe(self) -> List[Dict[str, Any]]:
        return [c.describe() for c in self.consoles.values()]


def _name(viewer: Optional[ConsoleViewer]) -> str:
    return str(viewer.identity) if viewer is not None else ""


def _index(path: str) -> int:
    """device[12] -> 12, for a stable port order."""
    last = path.rsplit("/", 1)[-1]
    if last.endswith("]") and "[" in last:
        try:
            return int(last[last.index("[") + 1:-1])
        except ValueError:
            pass
    return 0
