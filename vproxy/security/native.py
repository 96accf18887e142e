"""cryptography for `vproxy pki`, unpacked on first use from the .pyz.

Native code cannot be imported from inside a zip, and cffi's native module is built per
Python version, so build.py stores cryptography's and cffi's manylinux wheels in the
archive as data (`_native/<arch>/*.whl`) and lists in vproxy/_build.py (NATIVE) which
wheels make the set for each machine and Python. `ensure_cryptography()`:

1. does nothing if `cryptography` is importable already (installed on the host);
2. otherwise picks the set for this interpreter (CPython, platform.machine(), the
   Python's major.minor, glibc >= 2.17), unpacks it once into
   ``$XDG_CACHE_HOME/vproxy/native/<key>/`` (default ``~/.cache/...``), where the key is
   a hash of the wheels' SHA-256s: a new build with other wheels gets a new directory,
   the same wheels are never unpacked twice. It is unpacked into a temporary directory
   beside it and renamed into place, so a half-unpacked set is never used; 0700.
3. puts that directory first on sys.path.

On a target with no set it raises a UserError that says so in one line.
"""

import importlib.util
import os
import platform
import shutil
import struct
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Optional, Tuple

from vproxy.errors import UserError

__all__ = ["ensure_cryptography", "cache_root", "target", "NATIVE_MARKER"]

NATIVE_MARKER = ".vproxy-native-complete"
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8l": "aarch64"}
_done = False


def cache_root() -> Path:
    """Where unpacked sets live: $XDG_CACHE_HOME/vproxy/native or ~/.cache/vproxy/native."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vproxy" / "native"


def target() -> Tuple[str, str]:
    """(machine, "3.X") of the running interpreter, as the NATIVE table names them."""
    machine = platform.machine().lower() or "unknown"
    machine = _ARCH_ALIASES.get(machine, machine)
    if machine == "x86_64" and struct.calcsize("P") == 4:
        machine = "i686"  # a 32-bit Python on a 64-bit kernel
    return machine, "%d.%d" % sys.version_info[:2]


def _glibc() -> Optional[Tuple[int, ...]]:
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        return None
    name, _, version = text.partition(" ")
    if name != "glibc":
        return None
    try:
        return tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return None


def _archive() -> Optional[str]:
    """The .pyz this module was loaded from, or None when running from a source tree."""
    archive = getattr(globals().get("__loader__"), "archive", None)
    return archive if isinstance(archive, str) and zipfile.is_zipfile(archive) else None


def _build_native() -> Tuple[Dict[str, Dict[str, Any]], Tuple[int, ...]]:
    try:
        from vproxy import _build  # optional: written by build.py
    except ImportError:
        return {}, (2, 17)
    return getattr(_build, "NATIVE", {}), tuple(getattr(_build, "NATIVE_GLIBC", (2, 17)))


def _not_covered(machine: str, python: str, why: str = "") -> UserError:
    return UserError("vproxy pki has no bundled cryptography for Python %s on %s%s: install "
                     "python3-cryptography, or run vproxy pki on another machine"
                     % (python, machine, why))


def _safe_names(z: zipfile.ZipFile) -> None:
    for name in z.namelist():
        parts = PurePosixPath(name).parts
        if name.startswith("/") or ".." in parts or "\\" in name:
            raise UserError("bundled wheel has an unsafe member %r" % name)


def _unpack(archive: str, members: Tuple[str, ...], final: Path) -> None:
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = Path(tempfile.mkdtemp(prefix=".%s.tmp-" % final.name, dir=str(parent)))  # 0700
    try:
        with zipfile.ZipFile(archive) as outer:
            for member in members:
                with outer.open(member) as raw, zipfile.ZipFile(raw) as wheel:
                    _safe_names(wheel)
                    wheel.extractall(str(tmp))
        (tmp / NATIVE_MARKER).write_text("\n".join(members) + "\n")
        try:
            os.rename(str(tmp), str(final))
        except OSError:
            if not (final / NATIVE_MARKER).is_file():  # not someone else winning the race
                raise
            shutil.rmtree(str(tmp), ignore_errors=True)
    except BaseException:
        shutil.rmtree(str(tmp), ignore_errors=True)
        raise


def ensure_cryptography() -> None:
    """Make `import cryptography` work, or raise a UserError that says why it cannot."""
    global _done
    if _done or importlib.util.find_spec("cryptography") is not None:
        _done = True
        return
    archive = _archive()
    native, min_glibc = _build_native()
    machine, python = target()
    if archive is None or not native:
        raise UserError("vproxy pki needs the 'cryptography' package",
                        hint="pip install cryptography")
    entry = native.get(machine, {}).get(python)
    if entry is None or sys.implementation.name != "cpython":
        raise _not_covered(machine, python if sys.implementation.name == "cpython"
                           else "%s (%s)" % (python, sys.implementation.name))
    glibc = _glibc()
    if glibc is None or glibc < min_glibc:
        raise _not_covered(machine, python, " with %s" % (
            "glibc %d.%d" % glibc if glibc else "a C library other than glibc"))
    key, members = entry
    final = cache_root() / key
    if not (final / NATIVE_MARKER).is_file():
        try:
            _unpack(archive, tuple(members), final)
        except OSError as e:
            raise UserError("cannot unpack vproxy pki's cryptography into %s: %s"
                            % (final, e.strerror or e),
                            hint="set XDG_CACHE_HOME to a writable directory") from None
    path = str(final)
    if path not in sys.path:
        sys.path.insert(0, path)
    importlib.invalidate_caches()
    try:
        import cryptography.hazmat.bindings._rust  # noqa: F401  (optional: the native part)
    except ImportError as e:
        raise UserError("the bundled cryptography in %s does not load on this machine: %s"
                        % (final, e), hint="install python3-cryptography") from None
    _done = True
