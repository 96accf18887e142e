"""Test-side helpers to run real QEMU guests.

- `kvm_usable()` / `accel_args()`: pick KVM when it really runs guest code, else TCG.
  ``VPROXY_TEST_ACCEL=kvm|tcg`` overrides the probe.
- `QemuVM`: one qemu-system-x86_64 process with a QMP unix socket, ``-display none``,
  ``-nodefaults``, ``-no-user-config``, a name and a pidfile.
- `boot_sector_vm()` / `linux_vm()`: ready-to-start VMs with the project's test guests.
- async helpers that do over QMP what the agent does (`qmp_connect`,
  `take_over_chardev`, `hotplug_port`): for self-checks of the guests.

Serial console: the VMs get ``-chardev null,id=serial0 -serial chardev:serial0``, a
plain (non-mux) chardev whose id is ``serial0``, which ``chardev-change`` can turn into a
socket on an fd we pass (``-serial null`` creates the same chardev id ``serial0`` and
works the same on QEMU 7.2; the explicit form makes the id obvious).
"""

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import AsyncIterator, Dict, List, Optional, Sequence, Tuple, Union

from vproxy.guests.bootsector import BANNER as BOOT_SECTOR_BANNER
from vproxy.guests.bootsector import build_boot_disk, expected_echo

__all__ = [
    "QEMU",
    "QemuError",
    "QemuVM",
    "BOOT_SECTOR_BANNER",
    "expected_echo",
    "qemu_available",
    "kvm_usable",
    "accel_args",
    "short_socket_path",
    "boot_sector_vm",
    "linux_vm",
    "default_cache_dir",
    "qmp_connect",
    "take_over_chardev",
    "hotplug_port",
    "read_until",
    "wait_event",
    "exchange",
]

QEMU = os.environ.get("VPROXY_TEST_QEMU", "qemu-system-x86_64")
SERIAL_ID = "serial0"
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the NUL

PathLike = Union[str, "os.PathLike[str]"]


class QemuError(RuntimeError):
    """QEMU failed to start (message includes its stderr) or misbehaved."""


def qemu_available() -> bool:
    return shutil.which(QEMU) is not None


def default_cache_dir() -> Path:
    env = os.environ.get("VPROXY_TEST_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "vproxy-tests"


def short_socket_path(directory: PathLike, name: str) -> Path:
    """*directory*/*name* if it fits in a unix socket address, else a path in a new
    short temporary directory (pytest's tmp_path can be too long)."""
    p = Path(directory) / name
    if len(os.fsencode(str(p))) <= _UNIX_PATH_MAX:
        return p
    return Path(tempfile.mkdtemp(prefix="vpq")) / name


# --------------------------------------------------------------------------- accel


def _probe_bios() -> bytes:
    """A 64 KiB firmware image whose reset vector (F000:FFF0) runs
    ``mov al, 0x2a / out 0xf4, al / hlt / jmp $-3``: with ``-device isa-debug-exit``
    QEMU exits with status (0x2a << 1) | 1 = 85 as soon as the vCPU runs it."""
    img = bytearray(b"\xf4" * 65536)  # hlt everywhere
    img[0xFFF0:0xFFF7] = (b"\xb0\x2a"     # mov al, 0x2a
                          b"\xe6\xf4"     # out 0xf4, al   (isa-debug-exit)
                          b"\xf4"         # hlt
                          b"\xeb\xfd")    # jmp short -3   (back to hlt)
    return bytes(img)


@functools.lru_cache(maxsize=None)
def kvm_usable() -> bool:
    """True if /dev/kvm exists AND a vCPU really runs guest code under it.

    Starts ``qemu-system-x86_64 -accel kvm`` with a 7-instruction firmware that writes
    to an isa-debug-exit port: QEMU must exit with status 85 within 10 s (it takes about
    0.1 s). The answer is cached for the process. ``VPROXY_TEST_ACCEL=kvm|tcg``
    overrides the probe.
    """
    forced = os.environ.get("VPROXY_TEST_ACCEL", "").strip().lower()
    if forced in ("kvm", "tcg"):
        return forced == "kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or not qemu_available():
        return False
    with tempfile.TemporaryDirectory(prefix="vpkvm") as d:
        bios = Path(d) / "probe.bios"
        bios.write_bytes(_probe_bios())
        cmd = [
            QEMU, "-accel", "kvm", "-machine", "pc", "-m", "16",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-bios", str(bios), "-device", "isa-debug-exit,iobase=0xf4,iosize=1",
        ]
        try:
            rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, timeout=10).returncode
        except (subprocess.TimeoutExpired, OSError):
            return False
        return rc == 85


def accel_args(prefer_kvm: bool = True) -> List[str]:
    """``["-accel", "kvm"]`` when preferred and usable, else ``["-accel", "tcg"]``.

    ``VPROXY_TEST_ACCEL=kvm|tcg`` decides instead, whatever *prefer_kvm* says (kvm only
    if /dev/kvm is there).
    """
    forced = os.environ.get("VPROXY_TEST_ACCEL", "").strip().lower()
    if forced == "tcg":
        return ["-accel", "tcg"]
    if forced == "kvm" and os.path.exists("/dev/kvm"):
        return ["-accel", "kvm"]
    if prefer_kvm and kvm_usable():
        return ["-accel", "kvm"]
    return ["-accel", "tcg"]


# --------------------------------------------------------------------------- QemuVM


class QemuVM:
    """One qemu-system-x86_64 process.

    Always adds: ``-name NAME -nodefaults -no-user-config -display none
    -qmp unix:QMP_PATH,server=on,wait=off -pidfile PIDFILE`` and, unless *args* already
    has one, the accelerator from `accel_args` (``-accel ...``).

    QEMU's stdout/stderr go to *workdir*/NAME.log (see `.log_text()`); `start()` raises
    `QemuError` with that text if QEMU exits or its QMP socket does not appear.
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        workdir: PathLike,
        name: str = "vproxy-test",
        qmp_path: Optional[PathLike] = None,
        paused: bool = False,
        prefer_kvm: bool = True,
        binary: str = QEMU,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.qmp_path = Path(qmp_path) if qmp_path else short_socket_path(self.workdir, name + ".qmp")
        # a short temporary dir made by short_socket_path: removed by terminate()
        self._own_sock_dir = None if qmp_path or self.qmp_path.parent == self.workdir else self.qmp_path.parent
        self.pidfile = self.workdir / (name + ".pid")
        self.log_path = self.workdir / (name + ".log")
        self.paused = paused
        args = list(args)
        if "-accel" not in args and not any(a.startswith("accel=") for a in args):
            args = accel_args(prefer_kvm) + args
        self.extra_args = args
        self.binary = binary
        self.proc = None  # type: Optional[subprocess.Popen]
        self._log = None

    @property
    def command(self) -> List[str]:
        cmd = [
            self.binary,
            "-name", self.name,
            "-nodefaults", "-no-user-config",
            "-display", "none",
            "-qmp", "unix:%s,server=on,wait=off" % self.qmp_path,
            "-pidfile", str(self.pidfile),
        ]
        if self.paused:
            cmd.append("-S")
        return cmd + self.extra_args

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    @property
    def accel(self) -> str:
        a = self.extra_args
        for i, v in enumerate(a[:-1]):
            if v == "-accel":
                return a[i + 1].split(",")[0]
        return "?"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self, timeout: float = 20.0) -> "QemuVM":
        if self.proc is not None:
            raise QemuError("already started")
        for p in (self.qmp_path, self.pidfile):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        self.qmp_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=self._log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        except OSError as e:
            raise QemuError("cannot run %s: %s" % (self.binary, e)) from e
        deadline = time.monotonic() + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise QemuError("QEMU exited with status %s at start:\n$ %s\n%s"
                                % (rc, " ".join(self.command), self.log_text()))
            if self.qmp_path.exists():
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise QemuError("QEMU's QMP socket %s did not appear in %.0f s:\n%s"
                                % (self.qmp_path, timeout, self.log_text()))
            time.sleep(0.01)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)  # type: ignore[union-attr]

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        if self.proc is None:
            return None
        return self.proc.wait(timeout)

    def terminate(self, timeout: float = 5.0) -> Optional[int]:
        """SIGTERM, then SIGKILL after *timeout*; waits and closes the log."""
        if self.proc is None:
            return None
        self.kill(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            rc = self.proc.wait()
        if self._log:
            self._log.close()
            self._log = None
        if self._own_sock_dir is not None:
            shutil.rmtree(self._own_sock_dir, ignore_errors=True)
            self._own_sock_dir = None
        return rc

    close = terminate

    def __enter__(self) -> "QemuVM":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    def __repr__(self) -> str:
        return "<QemuVM %s pid=%s qmp=%s>" % (self.name, self.pid, self.qmp_path)


def _serial_args() -> List[str]:
    return ["-chardev", "null,id=%s" % SERIAL_ID, "-serial", "chardev:%s" % SERIAL_ID]


def boot_sector_vm(
    tmp_path: PathLike,
    vnc: bool = True,
    extra: Sequence[str] = (),
    *,
    name: str = "bootsector",
    paused: bool = False,
    prefer_kvm: bool = False,
    banner: bytes = BOOT_SECTOR_BANNER,
) -> QemuVM:
    """A not-yet-started VM running the boot-sector echo guest.

    ``-machine pc -m 32``, the disk on IDE, COM1 on chardev ``serial0`` (null until taken
    over), and with *vnc* a VGA card and ``-vnc none`` (viewers come via ``add_client``).

    TCG by default: on these (nested-virtualisation) machines SeaBIOS needs 4-6 s to
    reach the boot sector under KVM (every port I/O is a costly exit) but about 0.15 s
    under TCG. ``prefer_kvm=True`` (or ``VPROXY_TEST_ACCEL=kvm``) runs it under KVM.
    """
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    disk = build_boot_disk(tmp_path / (name + ".img"), banner=banner)
    args = ["-machine", "pc", "-m", "32",
            "-drive", "file=%s,format=raw,if=ide" % disk] + _serial_args()
    if vnc:
        args += ["-vga", "std", "-vnc", "none"]
    args += list(extra)
    return QemuVM(args, workdir=tmp_path, name=name, paused=paused, prefer_kvm=prefer_kvm)


def linux_vm(
    tmp_path: PathLike,
    extra: Sequence[str] = (),
    *,
    name: str = "linux",
    cache_dir: Optional[PathLike] = None,
    paused: bool = False,
    append: str = "",
    vnc: bool = False,
    echo_ports: Sequence[str] = ("org.vproxy.echo0",),
) -> QemuVM:
    """A not-yet-started VM running the Debian-kernel + busybox Linux guest (see
    tests/support/guests/linux_guest.py) under TCG: the Debian kernel hangs under KVM on these
    machines. ``-machine pc -m 256 -no-reboot``, ``-device virtio-serial``, COM1 on
    chardev ``serial0`` (null until taken over) and, for each name in *echo_ports*, a
    boot-time port with a null chardev ``-chardev null,id=ch-echoN -device
    virtserialport,chardev=ch-echoN,name=NAME,id=echoN`` (N = its index), which the
    guest opens and echoes on once the host side is attached (chardev-change while the
    VM runs). Hotplugged ports named org.vproxy.echo* echo too."""
    from support.guests.linux_guest import KERNEL_CMDLINE, build_linux_guest

    kernel, initrd = build_linux_guest(cache_dir)
    cmdline = KERNEL_CMDLINE + ((" " + append) if append else "")
    args = ["-accel", "tcg", "-machine", "pc", "-m", "256", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
            "-device", "virtio-serial"] + _serial_args()
    for i, port in enumerate(echo_ports):
        args += ["-chardev", "null,id=ch-echo%d" % i,
                 "-device", "virtserialport,chardev=ch-echo%d,name=%s,id=echo%d" % (i, port, i)]
    if vnc:
        args += ["-vga", "std", "-vnc", "none"]
    args += list(extra)
    return QemuVM(args, workdir=tmp_path, name=name, paused=paused, prefer_kvm=False)


# --------------------------------------------------------------------------- QMP helpers


async def qmp_connect(vm_or_path: Union[QemuVM, PathLike], timeout: float = 10.0):
    """Connected `qemu.qmp.QMPClient` (the caller disconnects it)."""
    from qemu.qmp import QMPClient

    path = vm_or_path.qmp_path if isinstance(vm_or_path, QemuVM) else vm_or_path
    qmp = QMPClient("vproxy-test")
    await asyncio.wait_for(qmp.connect(str(path)), timeout)
    return qmp


@contextlib.asynccontextmanager
async def qmp_session(vm_or_path: Union[QemuVM, PathLike]) -> AsyncIterator["object"]:
    qmp = await qmp_connect(vm_or_path)
    try:
        yield qmp
    finally:
        await qmp.disconnect()


async def _pass_fd(qmp, fd: int, fdname: str) -> None:
    qmp.send_fd_scm(fd)
    await qmp.execute("getfd", {"fdname": fdname})


def _fd_socket_backend(fdname: str) -> Dict[str, object]:
    return {"type": "socket",
            "data": {"addr": {"type": "fd", "data": {"str": fdname}}, "server": False}}


async def take_over_chardev(qmp, chardev_id: str = SERIAL_ID) -> socket.socket:
    """``chardev-change`` *chardev_id* to one end of a socketpair; returns our end
    (blocking socket). Exactly what the agent does for a console."""
    ours, theirs = socket.socketpair()
    try:
        fdname = "vpc_%s" % chardev_id
        await _pass_fd(qmp, theirs.fileno(), fdname)
        await qmp.execute("chardev-change", {"id": chardev_id, "backend": _fd_socket_backend(fdname)})
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return ours


async def hotplug_port(qmp, name: str, port_id: str, chardev_id: Optional[str] = None) -> socket.socket:
    """``chardev-add`` (fd socket) + ``device_add virtserialport name=NAME id=PORT_ID``;
    returns our end of the socketpair."""
    chardev_id = chardev_id or ("ch_" + port_id)
    ours, theirs = socket.socketpair()
    try:
        fdname = "vph_%s" % port_id
        await _pass_fd(qmp, theirs.fileno(), fdname)
        await qmp.execute("chardev-add", {"id": chardev_id, "backend": _fd_socket_backend(fdname)})
        await qmp.execute("device_add", {"driver": "virtserialport", "chardev": chardev_id,
                                         "name": name, "id": port_id})
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return ours


async def wait_event(qmp, name: str, timeout: float = 30.0, **data_match: object) -> Dict[str, object]:
    """Wait for the next QMP event *name* whose data contains *data_match*.

    Reads `qmp.events` (the default listener): register interest before the action
    by calling this soon after, the queue keeps earlier events."""
    async def _wait() -> Dict[str, object]:
        while True:
            ev = await qmp.events.get()
            if ev["event"] != name:
                continue
            data = ev.get("data", {})
            if all(data.get(k) == v for k, v in data_match.items()):
                return ev
    return await asyncio.wait_for(_wait(), timeout)


def read_until(sock: socket.socket, needle: bytes, timeout: float = 30.0,
               buf: Optional[bytearray] = None) -> bytes:
    """Read from blocking *sock* until *needle* appears; returns everything read up to
    and including it (bytes after it stay in *buf* if given). Raises TimeoutError with
    what was read."""
    if buf is None:
        buf = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        i = buf.find(needle)
        if i >= 0:
            out = bytes(buf[: i + len(needle)])
            del buf[: i + len(needle)]
            return out
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("did not see %r within %.1f s; got %r" % (needle, timeout, bytes(buf[-2000:])))
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        finally:
            sock.settimeout(None)
        if not chunk:
            raise EOFError("EOF before %r; got %r" % (needle, bytes(buf[-2000:])))
        buf += chunk


def exchange(sock: socket.socket, data: bytes, expect_len: int, timeout: float = 60.0) -> bytes:
    """Send *data* from a thread while reading *expect_len* bytes back (so neither
    direction can block the other). Returns what was read."""
    import threading

    err = []  # type: List[BaseException]

    def _send() -> None:
        try:
            sock.sendall(data)
        except BaseException as e:  # pragma: no cover - reported below
            err.append(e)

    t = threading.Thread(target=_send, daemon=True)
    t.start()
    got = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while len(got) < expect_len:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("got %d of %d bytes" % (len(got), expect_len))
            sock.settimeout(left)
            try:
                chunk = sock.recv(min(1 << 20, expect_len - len(got)))
            except socket.timeout:
                continue
            if not chunk:
                raise EOFError("EOF after %d of %d bytes" % (len(got), expect_len))
            got += chunk
    finally:
        sock.settimeout(None)
    t.join(timeout=5)
    if err:
        raise err[0]
    return bytes(got)


def timed(fn, *a, **kw) -> Tuple[object, float]:
    t0 = time.monotonic()
    r = fn(*a, **kw)
    return r, time.monotonic() - t0
