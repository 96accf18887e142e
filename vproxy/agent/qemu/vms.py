"""The VMs an agent serves (`VMRegistry`) and what lives on each (`VM`).

VMs come from two places:
- the configuration: (name, QMP socket path) pairs, served for the agent's lifetime
  (shown as "absent" while no QEMU answers);
- a directory of QMP sockets: every socket file in it is a VM named after the file's
  stem (``web1.qmp`` -> ``web1``). The directory is scanned every `scan_interval`
  seconds (polling; no inotify), so sockets that appear later are picked up. A VM
  whose socket file is gone and whose QEMU is not connected is dropped. Configured
  names win over directory names.

Each VM has one `VMMonitor` that reconnects by itself when its QEMU comes back, and
the channel kinds hanging off it (consoles, guest channels, VNC) as monitor owners:
they take over what they need when QEMU appears and reset their streams when it goes.
With ``resume_prelaunch``, a QEMU started with -S is then resumed (vproxy.agent.qemu.monitor).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from ._streams import RefuseCode, refuse
from .chardev import ADOPT_KINDS
from .console import DEFAULT_LINGER, DEFAULT_RING_SIZE, ConsoleSet
from .guestchannel import GuestChannels
from .monitor import VMMonitor
from .vnc import VncService

log = logging.getLogger("vproxy.qemu.vms")


class VM:
    """One VM: its QMP monitor, consoles, guest channels and VNC."""

    def __init__(self, name: str, qmp_path: str, *, source: str = "config",
                 ring_size: int = DEFAULT_RING_SIZE, log_dir: Optional[str] = None,
                 linger: float = DEFAULT_LINGER, resume_prelaunch: bool = False,
                 adopt: Sequence[str] = ADOPT_KINDS):
        self.name = name
        self.qmp_path = str(qmp_path)
        self.source = source  # "config" or "dir"
        self.monitor = VMMonitor(name, self.qmp_path, resume_prelaunch=resume_prelaunch)
        self.consoles = ConsoleSet(name, ring_size=ring_size, log_dir=log_dir, linger=linger,
                                   adopt=adopt)
        self.channels = GuestChannels(name, linger=linger)
        self.vnc = VncService(name)
        for owner in (self.consoles, self.channels, self.vnc):
            self.monitor.add_owner(owner)

    def __repr__(self) -> str:
        return "<VM %s %s>" % (self.name, self.monitor.state)

    @property
    def state(self) -> str:
        return self.monitor.state

    def start(self) -> None:
        self.monitor.start()

    async def stop(self, reason: str = "") -> None:
        """Stop serving this VM; open streams are reset with *reason*."""
        await self.monitor.stop(reason)
        self.consoles.close()

    async def ready(self, timeout: float = 5.0) -> None:
        """Wait (briefly) for QMP and takeover; refuse UNAVAILABLE if no QEMU answers."""
        monitor = self.monitor
        if monitor.ready:
            return
        # Just appeared, or coming back: give the supervisor a moment.
        wait = timeout if monitor.connected else min(timeout, 2 * monitor.min_backoff + 0.2)
        if not await monitor.wait_ready(wait):
            raise refuse(RefuseCode.UNAVAILABLE, monitor.not_running_message())

    def describe(self) -> Dict[str, Any]:
        return {
            "vm": self.name,
            "state": self.monitor.state,
            "qmp": self.qmp_path,
            "error": "" if self.monitor.connected else self.monitor.last_error,
            "consoles": self.consoles.describe(),
            "channels": self.channels.describe(),
            "vnc": self.vnc.describe(),
        }


class VMRegistry:
    """All VMs of this agent, by name."""

    def __init__(self, vms: Iterable[Tuple[str, str]] = (), socket_dir: Optional[str] = None,
                 *, scan_interval: float = 1.0, ring_size: int = DEFAULT_RING_SIZE,
                 log_dir: Optional[str] = None, linger: float = DEFAULT_LINGER,
                 resume_prelaunch: bool = False, adopt: Sequence[str] = ADOPT_KINDS):
        self.socket_dir = socket_dir
        self.scan_interval = scan_interval
        self._vm_options = dict(ring_size=ring_size, log_dir=log_dir, linger=linger,
                                resume_prelaunch=resume_prelaunch, adopt=tuple(adopt))
        self._configured = list(vms)
        self._vms: Dict[str, VM] = {}
        self._scanner: Optional[asyncio.Task] = None
        self._started = False

    def __repr__(self) -> str:
        return "<VMRegistry %s>" % sorted(self._vms)

    def __iter__(self) -> Iterator[VM]:
        return iter([self._vms[n] for n in sorted(self._vms)])

    def names(self) -> List[str]:
        return sorted(self._vms)

    def get(self, name: str) -> VM:
        vm = self._vms.get(name)
        if vm is None:
            known = ", ".join(self.names()) or "none"
            raise refuse(RefuseCode.NO_SUCH_VM,
                         "no VM named %r on this host (known: %s)" % (name, known))
        return vm

    async def start(self) -> None:
        """Start monitoring configured VMs, scan the directory, keep scanning it."""
        self._started = True
        for name, path in self._configured:
            if name in self._vms:
                raise ValueError("VM %r is configured twice" % name)
            self._add(VM(name, path, source="config", **self._vm_options))  # type: ignore[arg-type]
        if self.socket_dir is not None:
            await self.rescan()
            self._scanner = asyncio.ensure_future(self._scan_forever())

    async def stop(self) -> None:
        if self._scanner is not None:
            self._scanner.cancel()
            await asyncio.gather(self._scanner, return_exceptions=True)
            self._scanner = None
        vms, self._vms = list(self._vms.values()), {}
        await asyncio.gather(*(vm.stop() for vm in vms), return_exceptions=True)

    async def reconfigure(self, vms: Iterable[Tuple[str, str]],
                          reason: str = "") -> Tuple[List[str], List[str]]:
        """Make the configured VMs *vms* (e.g. on a configuration reload); returns the
        names (added, removed). A VM whose path changed is replaced; a directory VM
        whose name is now configured gives way. Streams of a VM that goes are reset
        with *reason* (default: "VM x was removed from the agent's configuration")."""
        new = dict(vms)
        added: List[str] = []
        removed: List[str] = []
        for name in sorted(set(new) | {n for n, v in self._vms.items() if v.source == "config"}):
            vm = self._vms.get(name)
            if vm is not None and vm.source == "config" and vm.qmp_path == new.get(name):
                continue
            if vm is not None:
                del self._vms[name]
                await vm.stop(reason or "VM %s was removed from the agent's configuration" % name)
                if name not in new:
                    removed.append(name)
            if name in new:
                self._add(VM(name, new[name], source="config", **self._vm_options))  # type: ignore[arg-type]
                added.append(name)
        self._configured = list(new.items())
        return added, removed

    async def rescan(self) -> None:
        """Pick up new sockets in the directory; drop VMs whose socket is gone."""
        if self.socket_dir is None:
            return
        found = _scan(self.socket_dir)
        for name, path in found.items():
            if name not in self._vms:
                log.info("VM %s: found QMP socket %s", name, path)
                self._add(VM(name, path, source="dir", **self._vm_options))  # type: ignore[arg-type]
        for name, vm in list(self._vms.items()):
            if vm.source == "dir" and name not in found and not vm.monitor.connected:
                log.info("VM %s: QMP socket %s is gone", name, vm.qmp_path)
                del self._vms[name]
                await vm.stop()

    def _add(self, vm: VM) -> None:
        self._vms[vm.name] = vm
        vm.start()

    async def _scan_forever(self) -> None:
        while True:
            await asyncio.sleep(self.scan_interval)
            try:
                await self.rescan()
            except Exception:
                log.exception("scanning %s failed", self.socket_dir)

    async def describe(self) -> List[Dict[str, Any]]:
        return [vm.describe() for vm in self]


def _scan(directory: str) -> Dict[str, str]:
    """name -> path of every socket file in *directory* (name: the file's stem)."""
    found: Dict[str, str] = {}
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as e:
        log.warning("cannot scan %s for QMP sockets: %s", directory, e)
        return found
    for entry in entries:
        try:
            if not stat.S_ISSOCK(entry.stat().st_mode):
                continue
        except OSError:
            continue
        name = entry.name.rsplit(".", 1)[0] if "." in entry.name[1:] else entry.name
        found.setdefault(name, entry.path)
    return found
