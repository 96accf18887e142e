"""A small Linux guest for the tests: Debian's kernel + a busybox-static initramfs.

`build_linux_guest(cache_dir)` returns ``(kernel_path, initrd_path)``, building them on
first use and caching them:

- the kernel: Debian's current ``linux-image-*-amd64`` package (the dependency of
  ``linux-image-amd64`` per ``apt-cache depends``; ``VPROXY_TEST_KERNEL_PKG`` picks
  another) fetched with ``apt-get download`` and read with ``dpkg-deb --fsys-tarfile``,
  NOT installed. Only vmlinuz and the virtio modules needed for virtio-serial are kept
  (``virtio_console`` and ``virtio_pci`` plus their ``depends=`` closure read from each
  module's .modinfo: the package has no modules.dep, depmod makes it at install time).
  The bzImage's payload is unpacked (Python's lzma) to an ELF vmlinux that QEMU boots
  through its PVH entry: under TCG the in-guest decompressor alone costs several
  seconds. Once a kernel is cached it is reused, even if the archive has moved on (delete the
  cache dir, or set ``VPROXY_TEST_KERNEL_PKG``, to change it).
- busybox: /bin/busybox when it is a static binary (package busybox-static), else
  ``apt-get download busybox-static``.
- the initramfs (newc cpio, gzip, written here in Python; no cpio tool needed), keyed by
  a hash of its whole content. Its /init:
    * mounts proc, sysfs, devtmpfs; insmods the modules in dependency order;
    * waits until the virtio-serial ports present at boot have their names, and opens
      every port whose name starts with ``org.vproxy.echo`` running an echo loop on it
      (``cat <&3 >&3`` on ONE read-write open; when the host side is disconnected the
      read sees EOF, and the loop retries every 0.2 s on the same open file, so the
      guest keeps the port open and VSERPORT_CHANGE fires once);
    * silences kernel messages on the console (``dmesg -n 1``) and prints
      ``READY_MARKER`` on the console (ttyS0);
    * keeps scanning every 0.2 s for hotplugged ``org.vproxy.echo*`` ports (a port that
      is unplugged and replugged under the same vportNpM name is told apart by the inode
      of its sysfs ``name`` file);
    * runs a fake login on ttyS0 forever: prints ``vproxy-guest login: ``, reads a name
      (any; no password), then an interactive busybox sh with the tty as controlling
      terminal (Ctrl-C works) and ``PS1='root@vproxy-guest:~# '``; ``exit`` gives the
      login prompt again.

Boot it with `support.vmtools.linux_vm` (TCG: the Debian kernel hangs early under KVM on
these machines) and kernel command line `KERNEL_CMDLINE`.

The cache dir defaults to ``$VPROXY_TEST_CACHE`` or ``~/.cache/vproxy-tests``; the
files live under ``<cache>/linux-guest/``. Building takes about 10 s (download ~70 MB,
decompress); later calls take milliseconds and need no network.
"""

import fcntl
import gzip
import hashlib
import io
import os
import re
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

__all__ = [
    "READY_MARKER",
    "LOGIN_PROMPT",
    "SHELL_PROMPT",
    "ECHO_PORT_PREFIX",
    "KERNEL_CMDLINE",
    "build_linux_guest",
    "GuestBuildError",
]

#: Printed on the console once the modules are loaded and the boot-time echo ports run.
READY_MARKER = b"vproxy linux guest ready"
#: The fake login prompt (then any name, no password).
LOGIN_PROMPT = b"vproxy-guest login: "
#: The shell prompt after login.
SHELL_PROMPT = b"root@vproxy-guest:~# "
#: virtio-serial ports whose name starts with this get an echo loop in the guest.
ECHO_PORT_PREFIX = "org.vproxy.echo"
#: Kernel command line for `linux_vm`.
KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1"

# the modules we need; their dependencies are added from .modinfo
_WANTED_MODULES = ("virtio_pci", "virtio_console")
# where in the kernel package to look for them (and their dependencies) on the first pass
_MODULE_DIRS = ("kernel/drivers/virtio/", "kernel/drivers/char/")

PathLike = Union[str, "os.PathLike[str]"]


class GuestBuildError(RuntimeError):
    pass


_INIT = r"""#!/bin/busybox sh
# /init of the vproxy test guest (tests/support/guests/linux_guest.py)
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /run /tmp /root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in $(cat /lib/vproxy/modules.order); do
    insmod /lib/vproxy/$m.ko || echo "vproxy guest: insmod $m failed"
done
hostname vproxy-guest
dmesg -n 1

named_ports() {  # how many virtio ports have a name yet
    n=0
    for f in /sys/class/virtio-ports/*/name; do
        [ -s "$f" ] && n=$((n + 1))
    done
    echo $n
}

echo_loop() {  # $1 = vportNpM, $2 = inode of its sysfs name file; the port is fd 3
    while [ "$(stat -c %i /sys/class/virtio-ports/$1/name 2>/dev/null)" = "$2" ]; do
        cat <&3 >&3   # returns at EOF: host side not connected (yet, or any more)
        sleep 0.2
    done
}

scan_ports() {  # start an echo loop on each new org.vproxy.echo* port
    for d in /sys/class/virtio-ports/*; do
        [ -s "$d/name" ] || continue
        case "$(cat "$d/name")" in
            __PREFIX__*) ;;
            *) continue ;;
        esac
        port=${d##*/}
        ino=$(stat -c %i "$d/name") || continue
        [ "$(cat /run/echo.$port 2>/dev/null)" = "$ino" ] && continue
        [ -c /dev/$port ] || continue
        exec 3<>/dev/$port || continue   # a port can be opened once: do it once, here
        echo "$ino" > /run/echo.$port
        echo_loop "$port" "$ino" &
        exec 3<&-
    done
}

# wait (at most ~3 s) for the ports present at boot to be announced with their names
last=-1; same=0; i=0
while [ $i -lt 30 ] && [ $same -lt 3 ]; do
    n=$(named_ports)
    if [ "$n" = "$last" ]; then same=$((same + 1)); else same=0; last=$n; fi
    sleep 0.1; i=$((i + 1))
done
# (in subshells: a failed `exec 3<>` must not end this shell, PID 1)
( scan_ports ) </dev/null >/dev/null 2>&1
( while :; do sleep 0.2; ( scan_ports ); done ) </dev/null >/dev/null 2>&1 &

echo "__READY__"
while :; do
    setsid -c sh /bin/vproxy-login <>/dev/ttyS0 >&0 2>&0
    sleep 0.1
done
"""

_LOGIN = r"""#!/bin/busybox sh
# fake login: any name, no password
printf '__LOGIN__'
read -r user || exit 0
[ -n "$user" ] || exit 0
cd /root
export HOME=/root USER="$user" LOGNAME="$user" SHELL=/bin/sh TERM=vt100
export PS1='__PS1__'
exec sh -i
"""


def _init_script() -> str:
    return (_INIT.replace("__PREFIX__", ECHO_PORT_PREFIX)
            .replace("__READY__", READY_MARKER.decode()))


def _login_script() -> str:
    return (_LOGIN.replace("__LOGIN__", LOGIN_PROMPT.decode())
            .replace("__PS1__", SHELL_PROMPT.decode()))


# --------------------------------------------------------------------------- cpio


def _cpio_newc(entries: Iterable[Tuple[str, int, bytes, int, int]]) -> bytes:
    """newc archive of (name, mode, data, rdevmajor, rdevminor) entries; mtime 0."""
    out = io.BytesIO()

    def pad4(n: int) -> None:
        out.write(b"\0" * ((4 - n % 4) % 4))

    ino = 1
    for name, mode, data, rmaj, rmin in list(entries) + [("TRAILER!!!", 0, b"", 0, 0)]:
        nb = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
                  0, 0, rmaj, rmin, len(nb), 0)
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.write(hdr + nb)
        pad4(len(hdr) + len(nb))
        out.write(data)
        pad4(len(data))
        ino += 1
    return out.getvalue()


# --------------------------------------------------------------------------- helpers


def _default_cache_dir() -> Path:
    env = os.environ.get("VPROXY_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vproxy-tests"


def _run(cmd: List[str], cwd: Optional[Path] = None) -> str:
    try:
        p = subprocess.run(cmd, cwd=str(cwd) if cwd else None, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise GuestBuildError("%s: %s" % (" ".join(cmd), e)) from e
    if p.returncode != 0:
        raise GuestBuildError("%s failed (%d): %s" % (" ".join(cmd), p.returncode,
                                                       p.stderr.decode(errors="replace")))
    return p.stdout.decode(errors="replace")


def _current_kernel_package() -> str:
    pkg = os.environ.get("VPROXY_TEST_KERNEL_PKG")
    if pkg:
        return pkg
    out = _run(["apt-cache", "depends", "linux-image-amd64"])
    m = re.search(r"Depends:\s*(linux-image-\S+-amd64)\b", out)
    if not m:
        raise GuestBuildError("apt-cache depends linux-image-amd64 names no kernel package "
                              "(run apt-get update?):\n" + out)
    return m.group(1)


def _download(pkg: str, into: Path) -> Path:
    """apt-get download *pkg* into *into*; returns the .deb."""
    before = set(into.glob("*.deb"))
    _run(["apt-get", "download", pkg], cwd=into)
    new = [p for p in into.glob("*.deb") if p not in before] or sorted(into.glob(pkg + "_*.deb"))
    if not new:
        raise GuestBuildError("apt-get download %s left no .deb in %s" % (pkg, into))
    return new[0]


def _deb_members(deb: Path, want) -> Dict[str, bytes]:
    """Stream the .deb's data tar (dpkg-deb --fsys-tarfile) and return the regular files
    for which want(path) is true, by path (without the leading './')."""
    found = {}  # type: Dict[str, bytes]
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name[2:] if member.name.startswith("./") else member.name
                if member.isfile() and want(name):
                    f = tar.extractfile(member)
                    assert f is not None
                    found[name] = f.read()
    finally:
        proc.stdout.close()  # type: ignore[union-attr]
        err = proc.stderr.read() if proc.stderr else b""
        rc = proc.wait()
    if rc != 0:
        raise GuestBuildError("dpkg-deb --fsys-tarfile %s failed: %s" % (deb, err.decode(errors="replace")))
    return found


def _modinfo_depends(ko: bytes) -> List[str]:
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    if not m or not m.group(1):
        return []
    return [d.decode() for d in m.group(1).split(b",") if d]


def _mod_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for ext in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return base.replace("-", "_")


def _decompress_ko(path: str, data: bytes) -> bytes:
    if path.endswith(".ko.xz"):
        import lzma
        return lzma.decompress(data)
    if path.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.endswith(".ko.zst"):
        raise GuestBuildError("zstd-compressed module %s: not supported" % path)
    return data


def _is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a PT_INTERP program header."""
    try:
        with open(path, "rb") as f:
            hdr = f.read(64)
            if hdr[:4] != b"\x7fELF" or hdr[4] != 2:  # 64-bit only
                return False
            e_phoff, = struct.unpack_from("<Q", hdr, 0x20)
            e_phentsize, e_phnum = struct.unpack_from("<HH", hdr, 0x36)
            f.seek(e_phoff)
            ph = f.read(e_phentsize * e_phnum)
    except OSError:
        return False
    for i in range(e_phnum):
        p_type, = struct.unpack_from("<I", ph, i * e_phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def _bzimage_payload(bz: bytes) -> Optional[bytes]:
    """The uncompressed vmlinux ELF inside a bzImage, or None (compression we cannot
    undo with the standard library: zstd, lz4, lzo)."""
    import bz2
    import lzma
    import zlib

    candidates = [
        (b"\xfd7zXZ\x00", lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ)),
        (b"\x1f\x8b\x08", lambda: zlib.decompressobj(wbits=31)),
        (b"BZh", lambda: bz2.BZ2Decompressor()),
        (b"\x5d\x00\x00", lambda: lzma.LZMADecompressor(format=lzma.FORMAT_ALONE)),
    ]
    for magic, make in candidates:
        start = 0
        while True:
            i = bz.find(magic, start)
            if i < 0:
                break
            start = i + 1
            try:
                out = make().decompress(bz[i:])
            except Exception:
                continue
            if out[:4] == b"\x7fELF":
                return out
    return None


def _has_pvh_note(elf: bytes) -> bool:
    """True if the ELF has a Xen note of type 18 (XEN_ELFNOTE_PHYS32_ENTRY): QEMU can
    then boot it directly with -kernel (PVH), skipping the decompressor."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    e_phoff, = struct.unpack_from("<Q", elf, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(e_phnum):
        off = e_phoff + i * e_phentsize
        p_type, = struct.unpack_from("<I", elf, off)
        if p_type != 4:  # PT_NOTE
            continue
        p_offset, = struct.unpack_from("<Q", elf, off + 8)
        p_filesz, = struct.unpack_from("<Q", elf, off + 32)
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12: pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def _ensure_pvh(kdir: Path) -> Path:
    """The kernel to boot: vmlinux (PVH entry, no in-guest decompression: boots in
    about half the time under TCG) when it can be made, else the bzImage."""
    vmlinux, no_pvh = kdir / "vmlinux", kdir / "no-pvh"
    if vmlinux.exists():
        return vmlinux
    if not no_pvh.exists():
        elf = _bzimage_payload((kdir / "vmlinuz").read_bytes())
        if elf is not None and _has_pvh_note(elf):
            _atomic_write(vmlinux, elf)
            return vmlinux
        no_pvh.write_text("")
    return kdir / "vmlinuz"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp%d" % os.getpid())
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- parts


def _cached_kernel(root: Path) -> Optional[Path]:
    pkg = os.environ.get("VPROXY_TEST_KERNEL_PKG")
    dirs = sorted((d for d in root.glob("kernel-*") if (d / "complete").exists()),
                  key=lambda d: d.stat().st_mtime, reverse=True)
    if pkg:
        dirs = [d for d in dirs if d.name.startswith("kernel-%s_" % pkg)]
    return dirs[0] if dirs else None


def _build_kernel(root: Path) -> Path:
    pkg = _current_kernel_package()
    with tempfile.TemporaryDirectory(prefix="dl-", dir=str(root)) as tmp:
        deb = _download(pkg, Path(tmp))
        version = deb.name[len(pkg) + 1:].split("_")[0]
        modules = _deb_members(deb, lambda n: (
            n.startswith("boot/vmlinuz-")
            or (n.startswith("lib/modules/") and ".ko" in n
                and any("/" + d in n for d in _MODULE_DIRS))))
        kernels = [n for n in modules if n.startswith("boot/vmlinuz-")]
        if len(kernels) != 1:
            raise GuestBuildError("expected one boot/vmlinuz-* in %s, found %r" % (deb.name, kernels))
        vmlinuz = modules.pop(kernels[0])
        by_name = {_mod_name(p): (p, d) for p, d in modules.items()}

        order = []  # type: List[str]
        missing = []  # type: List[str]

        def visit(name: str, stack: Tuple[str, ...] = ()) -> None:
            if name in order:
                return
            if name in stack:
                raise GuestBuildError("module dependency cycle: %s" % " -> ".join(stack + (name,)))
            if name not in by_name:
                missing.append(name)
                return
            path, data = by_name[name]
            for dep in _modinfo_depends(_decompress_ko(path, data)):
                visit(dep, stack + (name,))
            order.append(name)

        for m in _WANTED_MODULES:
            visit(m)
        if missing:  # a dependency outside the usual dirs: one more pass over everything
            more = _deb_members(deb, lambda n: n.startswith("lib/modules/") and _mod_name(n) in missing)
            by_name.update({_mod_name(p): (p, d) for p, d in more.items()})
            order, missing = [], []
            for m in _WANTED_MODULES:
                visit(m)
            if missing:
                raise GuestBuildError("modules not found in %s: %s" % (deb.name, ", ".join(missing)))

        dest = root / ("kernel-%s_%s" % (pkg, version))
        if dest.exists():
            shutil.rmtree(dest)
        work = Path(tempfile.mkdtemp(prefix="k-", dir=str(root)))
        work.chmod(0o755)
        (work / "modules").mkdir()
        (work / "vmlinuz").write_bytes(vmlinuz)
        for name in order:
            path, data = by_name[name]
            (work / "modules" / (name + ".ko")).write_bytes(_decompress_ko(path, data))
        (work / "modules.order").write_text("\n".join(order) + "\n")
        (work / "package").write_text("%s %s %s\n" % (pkg, version, deb.name))
        (work / "complete").write_text("")
        os.replace(work, dest)
        return dest


def _busybox(root: Path) -> bytes:
    system = Path("/bin/busybox")
    if _is_static_elf(system):
        return system.read_bytes()
    cached = root / "busybox"
    if _is_static_elf(cached):
        return cached.read_bytes()
    with tempfile.TemporaryDirectory(prefix="dl-", dir=str(root)) as tmp:
        deb = _download("busybox-static", Path(tmp))
        files = _deb_members(deb, lambda n: n in ("bin/busybox", "usr/bin/busybox"))
        if not files:
            raise GuestBuildError("no bin/busybox in %s" % deb.name)
        data = next(iter(files.values()))
    _atomic_write(cached, data)
    cached.chmod(0o755)
    return data


def _initramfs(kernel_dir: Path, busybox: bytes) -> bytes:
    order = (kernel_dir / "modules.order").read_text().split()
    d = stat.S_IFDIR | 0o755
    x = stat.S_IFREG | 0o755
    r = stat.S_IFREG | 0o644
    entries = [
        ("bin", d, b"", 0, 0),
        ("dev", d, b"", 0, 0),
        ("dev/console", stat.S_IFCHR | 0o600, b"", 5, 1),
        ("dev/null", stat.S_IFCHR | 0o666, b"", 1, 3),
        ("dev/ttyS0", stat.S_IFCHR | 0o600, b"", 4, 64),
        ("lib", d, b"", 0, 0),
        ("lib/vproxy", d, b"", 0, 0),
        ("proc", d, b"", 0, 0),
        ("root", d, b"", 0, 0),
        ("run", d, b"", 0, 0),
        ("sys", d, b"", 0, 0),
        ("tmp", stat.S_IFDIR | 0o1777, b"", 0, 0),
        ("bin/busybox", x, busybox, 0, 0),
        ("bin/vproxy-login", x, _login_script().encode(), 0, 0),
        ("init", x, _init_script().encode(), 0, 0),
        ("lib/vproxy/modules.order", r, ("\n".join(order) + "\n").encode(), 0, 0),
    ]
    for name in order:
        entries.append(("lib/vproxy/%s.ko" % name, r, (kernel_dir / "modules" / (name + ".ko")).read_bytes(), 0, 0))
    return _cpio_newc(entries)


def _gzip(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=6) as gz:
        gz.write(data)
    return buf.getvalue()


def build_linux_guest(cache_dir: Optional[PathLike] = None) -> Tuple[Path, Path]:
    """Return ``(kernel_path, initrd_path)``, building and caching them if needed.

    Safe to call from several processes at once (a lock file serialises the build).
    Raises `GuestBuildError` when something cannot be fetched or built.
    """
    root = Path(cache_dir) if cache_dir else _default_cache_dir()
    root = root / "linux-guest"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kdir = _cached_kernel(root) or _build_kernel(root)
        kernel = _ensure_pvh(kdir)
        cpio = _initramfs(kdir, _busybox(root))
        key = hashlib.sha256(cpio).hexdigest()[:16]  # the whole content, scripts included
        initrd = kdir / ("initrd-%s.cpio.gz" % key)
        if not initrd.exists():
            for old in kdir.glob("initrd-*.cpio.gz"):
                old.unlink()
            _atomic_write(initrd, _gzip(cpio))
        return kernel, initrd
