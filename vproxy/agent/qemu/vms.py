"""The VMs an agent serves (`VMRegistry`) and what lives on each (`VM`).

VMs come from two places:
- the configuration: (name, QMP socket path) pairs, served for the agent's lifetime
  (shown as "absent" while no QEMU answers);
- a directory of QMP sockets: every socket named ``NAME.qmp`` (or with no suffix at
  all) is a VM. Everything else there is ignored without a word: regular files
  (``100.pid``) and sockets with another suffix (Proxmox's ``100.serial0``,
  ``100.vnc``, ``100.qga`` beside ``100.qmp`` in /var/run/qemu-server). The directory
  is scanned every `scan_interval` seconds (polling; no inotify), so sockets that
  appear later are picked up. A VM whose socket file is gone and whose QEMU is not
  connected is dropped. Configured names win over directory names.

Naming a directory VM: its socket's stem (``100.qmp`` -> ``100``) is its `key`. When
its QEMU has ``-name`` (``query-name``, asked on every QMP connection), the VM is known
by that name and the key stays an alias: both open it, and an ACL rule matches it by
either (`VM.names`; vproxy.agent.acl). The reported name is not used (the VM keeps its
key, and a warning says why, once) when it is the key or configured name of another
VM, when two sockets report the same name (both keep their keys), or when it is not a
plain word (whitespace, control characters, "/" or a leading "-" or "."). Configured VMs
keep the name the configuration gives them.

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
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

from ._streams import RefuseCode, refuse
from .chardev import ADOPT_KINDS
from .console import DEFAULT_LINGER, DEFAULT_RING_SIZE, ConsoleSet
from .guestchannel import GuestChannels
from .errors import QMPCommandError
from .monitor import EXCLUSIVE, MonitorOwner, VMMonitor, make_monitor
from .vnc import VncService

log = logging.getLogger("vproxy.qemu.vms")


class VM:
    """One VM: its QMP monitor, consoles, guest channels and VNC."""

    def __init__(self, name: str, qmp_path: str, *, source: str = "config",
                 ring_size: int = DEFAULT_RING_SIZE, log_dir: Optional[str] = None,
                 linger: float = DEFAULT_LINGER, resume_prelaunch: bool = False,
                 qmp_mode: str = EXCLUSIVE, adopt: Sequence[str] = ADOPT_KINDS,
                 on_named: Optional[Callable[["VM"], None]] = None):
        #: The name it was found by: the configured name, or the socket's stem. Stable
        #: for the VM's life (console logs are named after it).
        self.key = name
        #: What it is known by: `key`, or QEMU's -name (see the module docstring).
        self.name = name
        #: What ``query-name`` said on the last QMP connection ("" if no -name).
        self.reported_name = ""
        self.qmp_path = str(qmp_path)
        self.source = source  # "config" or "dir"
        #: The per-VM settings it runs with (a reload that changes them replaces the VM).
        self.options: Dict[str, Any] = {"qmp_mode": qmp_mode, "adopt": tuple(adopt)}
        #: A directory VM's QEMU has been asked for its -name at least once
        #: (`VMRegistry.wait_named`); always True for a configured VM.
        self.named_once = source != "dir"
        self.monitor = make_monitor(name, self.qmp_path, qmp_mode, resume_prelaunch=resume_prelaunch)
        self.consoles = ConsoleSet(name, ring_size=ring_size, log_dir=log_dir, linger=linger,
                                   adopt=adopt)
        self.channels = GuestChannels(name, linger=linger, adopt=adopt)
        self.vnc = VncService(name)
        owners: List[MonitorOwner] = [self.consoles, self.channels, self.vnc]
        if source == "dir":  # first: the others set up under the VM's name
            owners.insert(0, _Naming(self, on_named))
        for owner in owners:
            self.monitor.add_owner(owner)
        self._unused_name = ""  # the reported name last warned about

    @property
    def aliases(self) -> List[str]:
        """Other names that open this VM (its socket's stem when it goes by -name)."""
        return [self.key] if self.name != self.key else []

    @property
    def names(self) -> Tuple[str, ...]:
        """Every name of this VM, its name first: what ACL rules are matched against."""
        return (self.name, *self.aliases)

    def set_name(self, name: str) -> None:
        """Be known as *name* (`key` or the reported name) from now on, in messages too."""
        if name == self.name:
            return
        log.info("VM %s: now known as %s%s", self.name, name,
                 " (alias %s)" % self.key if name != self.key else "")
        self.name = name
        self.monitor.name = name
        self.consoles.vm = name
        for console in self.consoles.consoles.values():
            console.vm = name
        self.channels.vm = name
        self.vnc.vm = name

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
            "aliases": self.aliases,
            "state": self.monitor.state,
            "qmp": self.qmp_path,
            "qmp_mode": self.monitor.mode,
            "error": "" if self.monitor.connected else self.monitor.last_error,
            "consoles": self.consoles.describe(),
            "channels": self.channels.describe(),
            "vnc": self.vnc.describe(),
        }


class _Naming(MonitorOwner):
    """Asks a directory VM's QEMU for its -name (``query-name``) on every connection."""

    def __init__(self, vm: VM, on_named: Optional[Callable[[VM], None]]):
        self.vm = vm
        self.on_named = on_named

    def __repr__(self) -> str:
        return "<naming of VM %s>" % self.vm.key

    async def on_connected(self, monitor: VMMonitor) -> None:
        try:
            answer = await monitor.execute("query-name")
        except QMPCommandError as e:  # a QEMU that cannot say: it keeps its socket's name
            log.warning("VM %s: query-name failed, it keeps its socket's name: %s", self.vm.key, e)
            answer = {}
        name = answer.get("name", "") if isinstance(answer, dict) else ""
        self.vm.reported_name = name if isinstance(name, str) else ""
        self.vm.named_once = True
        if self.on_named is not None:
            self.on_named(self.vm)


def usable_name(name: str) -> bool:
    """A -name the agent can use as a VM name: one plain word (see the module docstring)."""
    return (0 < len(name) <= 128 and name.isprintable() and not any(c.isspace() for c in name)
            and "/" not in name and not name.startswith(("-", ".")))


#: How long an open for a name no VM has waits, at most, while a directory VM's QEMU
#: has not yet been asked for its -name (`VMRegistry.wait_named`).
NAMING_WAIT = 2.0


class VMRegistry:
    """All VMs of this agent, by name.

    *vm_options*: per configured VM (by name), settings over the registry's own
    (``qmp_mode``, ``adopt``: a [[vm]] table's keys, vproxy.agent.config).
    """

    def __init__(self, vms: Iterable[Tuple[str, str]] = (), socket_dir: Optional[str] = None,
                 *, scan_interval: float = 1.0, ring_size: int = DEFAULT_RING_SIZE,
                 log_dir: Optional[str] = None, linger: float = DEFAULT_LINGER,
                 resume_prelaunch: bool = False, qmp_mode: str = EXCLUSIVE,
                 adopt: Sequence[str] = ADOPT_KINDS,
                 vm_options: Optional[Mapping[str, Mapping[str, Any]]] = None):
        self.socket_dir = socket_dir
        self._per_vm: Dict[str, Dict[str, Any]] = {k: dict(v) for k, v in (vm_options or {}).items()}
        self.scan_interval = scan_interval
        self._vm_options: Dict[str, Any] = dict(ring_size=ring_size, log_dir=log_dir, linger=linger,
                                resume_prelaunch=resume_prelaunch, qmp_mode=qmp_mode,
                                adopt=tuple(adopt))
        self._configured = list(vms)
        self._vms: Dict[str, VM] = {}  # by key (configured name or socket stem)
        self._index: Dict[str, VM] = {}  # by every name and alias (`_rename`)
        self._scanner: Optional[asyncio.Task] = None
        self._started = False
        # What the last rescan saw, to skip the next while nothing changed (`rescan`):
        self._dir_stamp: Optional[Tuple[int, int]] = None
        self._keys_after_scan: Set[str] = set()

    def __repr__(self) -> str:
        return "<VMRegistry %s>" % sorted(self._vms)

    def __iter__(self) -> Iterator[VM]:
        return iter(sorted(self._vms.values(), key=lambda vm: vm.name))

    def names(self) -> List[str]:
        """The names VMs are known by (not their aliases)."""
        return sorted(vm.name for vm in self._vms.values())

    def find(self, name: str) -> Optional[VM]:
        """The VM known by *name* or with the alias *name*, or None."""
        return self._index.get(name) or self._vms.get(name)

    def get(self, name: str) -> VM:
        vm = self.find(name)
        if vm is None:
            known = ", ".join(self.names()) or "none"
            raise refuse(RefuseCode.NO_SUCH_VM,
                         "no VM named %r on this host (known: %s)" % (name, known))
        return vm

    async def wait_named(self, name: str, timeout: float = NAMING_WAIT) -> None:
        """If no VM has the name *name* yet, wait (at most *timeout*) until one has, or
        until every directory VM's QEMU has been asked its -name once or found not
        running: right after the agent starts, web1 is still known only as 100 (its
        socket's name) until the first QMP connection to it, and while another client
        holds a shared QMP socket it cannot be asked. Returns at once when the name is
        known or no directory VM is still to be named."""
        loop = asyncio.get_event_loop()
        deadline = loop.time() + timeout
        while self.find(name) is None and loop.time() < deadline and any(
                not vm.named_once and (vm.monitor.busy or not vm.monitor.last_error)
                for vm in self._vms.values()):
            await asyncio.sleep(0.02)

    def options_for(self, name: str) -> Dict[str, Any]:
        """The settings of configured VM *name*: the registry's, then its own over them."""
        options = dict(self._vm_options)
        options.update(self._per_vm.get(name, {}))
        return options

    def names_of(self, name: str) -> Tuple[str, ...]:
        """Every name of the VM that *name* opens (its name, then its aliases), or just
        (*name*,) if it opens none: what the ACL matches a request for *name* against."""
        vm = self.find(name)
        return vm.names if vm is not None else (name,)

    async def start(self) -> None:
        """Start monitoring configured VMs, scan the directory, keep scanning it."""
        self._started = True
        for name, path in self._configured:
            if name in self._vms:
                raise ValueError("VM %r is configured twice" % name)
            self._add(VM(name, path, source="config", **self.options_for(name)))
        self._rename()
        if self.socket_dir is not None:
            await self.rescan()
            self._scanner = asyncio.ensure_future(self._scan_forever())

    async def stop(self) -> None:
        if self._scanner is not None:
            self._scanner.cancel()
            await asyncio.gather(self._scanner, return_exceptions=True)
            self._scanner = None
        vms, self._vms, self._index = list(self._vms.values()), {}, {}
        await asyncio.gather(*(vm.stop() for vm in vms), return_exceptions=True)

    async def reconfigure(self, vms: Iterable[Tuple[str, str]], reason: str = "",
                          vm_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
                          ) -> Tuple[List[str], List[str]]:
        """Make the configured VMs *vms* (e.g. on a configuration reload), with
        *vm_options* (None: the per-VM settings stay as they were); returns the names
        (added, removed). A VM whose path or own settings (qmp_mode, adopt) changed is
        replaced: its streams are reset and it is served anew, and it counts as added.
        A directory VM whose name is now configured gives way. Streams of a VM that
        goes are reset with *reason* (default: "VM x was removed from the agent's
        configuration")."""
        new = dict(vms)
        if vm_options is not None:
            self._per_vm = {k: dict(v) for k, v in vm_options.items()}
        added: List[str] = []
        removed: List[str] = []
        for name in sorted(set(new) | {n for n, v in self._vms.items() if v.source == "config"}):
            vm = self._vms.get(name)
            options = self.options_for(name)
            options["adopt"] = tuple(options["adopt"])
            if (vm is not None and vm.source == "config" and vm.qmp_path == new.get(name)
                    and all(vm.options[k] == options[k] for k in vm.options)):
                continue
            if vm is not None:
                del self._vms[name]
                if name in new and vm.source == "config":
                    why = "VM %s was restarted in the agent with new settings" % name
                else:
                    why = "VM %s was removed from the agent's configuration" % name
                await vm.stop(reason or why)
                if name not in new:
                    removed.append(name)
            if name in new:
                self._add(VM(name, new[name], source="config", **options))
                added.append(name)
        self._configured = list(new.items())
        self._rename()
        return added, removed

    async def rescan(self) -> None:
        """Pick up new sockets in the directory; drop VMs whose socket is gone.

        Skipped while the directory's inode and mtime are those of the last scan (adding,
        removing or renaming an entry moves the mtime), the VM list is as that scan left
        it, and no VM waits to be dropped: with 1,000 sockets a scan is 1,000 stat calls,
        ~10 ms of CPU a second for an agent that does nothing else while idle. An mtime
        less than `_RACY_MTIME` old is not trusted (a second change within one tick of
        the file system's clock would not move it), so a fresh change is always scanned."""
        if self.socket_dir is None:
            return
        stamp = _dir_stamp(self.socket_dir)
        if stamp is not None and stamp == self._dir_stamp and self._keys_after_scan == self._vms.keys():
            return
        found = _scan(self.socket_dir)
        changed = False
        for name, path in found.items():
            if name not in self._vms:
                log.info("VM %s: found QMP socket %s", name, path)
                self._add(VM(name, path, source="dir", on_named=self._named,
                             **self._vm_options))
                changed = True
        for name, vm in list(self._vms.items()):
            if vm.source == "dir" and name not in found and not vm.monitor.connected:
                log.info("VM %s: QMP socket %s is gone", vm.name, vm.qmp_path)
                del self._vms[name]
                changed = True
                await vm.stop()
        if changed:
            self._rename()
        waiting = any(vm.source == "dir" and name not in found for name, vm in self._vms.items())
        self._dir_stamp = None if waiting else stamp  # a VM still connected is dropped later
        self._keys_after_scan = set(self._vms)

    def _add(self, vm: VM) -> None:
        self._vms[vm.key] = vm
        vm.start()

    def _named(self, vm: VM) -> None:
        """A directory VM's QEMU said its -name (`_Naming`)."""
        if self._vms.get(vm.key) is vm:
            self._rename()

    def _rename(self) -> None:
        """Give every directory VM its reported -name where that is unambiguous (the
        module docstring has the rules), and index every VM by its names and aliases."""
        keys = set(self._vms)
        wanted: Dict[str, List[VM]] = {}
        for vm in self._vms.values():
            if vm.source == "dir" and vm.reported_name and vm.reported_name != vm.key:
                wanted.setdefault(vm.reported_name, []).append(vm)
        index: Dict[str, VM] = {}
        for key in sorted(self._vms):
            vm = self._vms[key]
            name, why = vm.key, ""
            reported = vm.reported_name
            if vm.source == "dir" and reported and reported != vm.key:
                if not usable_name(reported):
                    why = "it is not a plain word"
                elif reported in keys:
                    other = self._vms[reported]
                    why = "VM %s %s" % (reported, "is configured by that name" if other.source == "config"
                                        else "has a QMP socket by that name (%s)" % other.qmp_path)
                elif len(wanted[reported]) > 1:
                    why = "the QEMUs of QMP sockets %s all say so" % ", ".join(
                        sorted(v.qmp_path for v in wanted[reported]))
                else:
                    name = reported
            if why and vm._unused_name != reported:
                log.warning("VM %s: not known by its QEMU's -name %r (%s): it keeps the name of "
                            "its QMP socket %s", vm.key, reported, why, vm.qmp_path)
            vm._unused_name = reported if why else ""
            vm.set_name(name)
            for n in vm.names:
                index[n] = vm
        self._index = index

    async def _scan_forever(self) -> None:
        while True:
            await asyncio.sleep(self.scan_interval)
            try:
                await self.rescan()
            except Exception:
                log.exception("scanning %s failed", self.socket_dir)

    async def describe(self) -> List[Dict[str, Any]]:
        return [vm.describe() for vm in self]


_RACY_MTIME = 2_000_000_000  # ns: a directory mtime younger than this is not trusted


def _dir_stamp(directory: str) -> Optional[Tuple[int, int]]:
    """(inode, mtime in ns) of *directory*, or None if it cannot be read or its mtime is
    too recent to prove that nothing changed since (`VMRegistry.rescan`)."""
    try:
        st = os.stat(directory)
    except OSError:
        return None
    if time.time_ns() - st.st_mtime_ns < _RACY_MTIME:
        return None
    return st.st_ino, st.st_mtime_ns


def _scan(directory: str) -> Dict[str, str]:
    """stem -> path of every QMP socket in *directory*: sockets named STEM.qmp, or
    without a suffix. Other files are not QMP sockets (Proxmox keeps 100.serial0,
    100.vnc, 100.qga and 100.pid beside 100.qmp) and are passed over in silence."""
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
        stem, dot, suffix = entry.name.rpartition(".")
        if not dot or not stem:  # no suffix (a leading dot is no suffix either)
            stem = entry.name
        elif suffix != "qmp":
            continue
        found.setdefault(stem, entry.path)
    return found
