#!/usr/bin/env python3
"""Build dist/vproxy.pyz: one self-contained file that runs on the system python3 (3.9+).

The archive holds, at its root:
  __main__.py        runs vproxy.cli:main (refuses Python < 3.9 with a clear message)
  vproxy/            the package, sources only (no .pyc: one archive serves every Python)
  vproxy/_build.py   generated here: VERSION, BUILD_HASH, VENDORED (not in the source tree)
  click/, qemu/qmp/  the pure-Python runtime dependencies, taken from pinned wheels
  <dist>.dist-info/  their METADATA and license files, nothing else

  _native/<arch>/     cryptography's and cffi's manylinux wheels, stored as they are, for
                     `vproxy pki` only (see NATIVE below and vproxy/security/native.py)

zipapp puts the archive itself first on sys.path, so the vendored packages win over
whatever the host has installed. `cryptography` cannot ride in that path: native code
cannot be imported from a zip, and cffi's native module is built per Python version. So
its wheels go in as data (one abi3 cryptography wheel per architecture, one cffi wheel
per architecture and Python), and vproxy/security/native.py unpacks the set that matches the
running interpreter into a per-user cache on the first `vproxy pki`.

The output is byte-for-byte reproducible for a given source tree, wheel set and zlib:
entries are sorted, every timestamp is SOURCE_DATE_EPOCH (default 1980-01-01 00:00:00,
the earliest a zip can hold), permissions are fixed, and every file is deflated at level 9.
BUILD_HASH is the SHA-256 of the archive's content (names and bytes), independent of
compression.

Usage:
  python3 build.py                          # wheels downloaded once into .cache/wheels
  python3 build.py --wheels DIR             # offline: wheels from DIR only
  python3 build.py --download-wheels DIR    # fetch the pinned wheels into DIR, then stop
  python3 build.py --check-reproducible     # build twice, compare SHA-256s
  python3 build.py -o OUT.pyz

Standard library only; runs on Python 3.9+.
"""

import argparse
import ast
import hashlib
import io
import os
import pprint
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

TOP = Path(__file__).resolve().parent
PACKAGE = "vproxy"
DEFAULT_OUTPUT = TOP / "dist" / "vproxy.pyz"
DEFAULT_WHEEL_CACHE = TOP / ".cache" / "wheels"
SHEBANG = b"#!/usr/bin/env python3\n"
ZIP_EPOCH = 315532800  # 1980-01-01 00:00:00 UTC, the earliest time a zip entry can hold
COMPRESSION = zipfile.ZIP_DEFLATED
COMPRESSLEVEL = 9
PYPI_SIMPLE = "https://pypi.org/simple/"


class Wheel(NamedTuple):
    project: str            # name on PyPI
    version: str
    filename: str
    sha256: str
    packages: Tuple[str, ...]  # top-level paths taken from the wheel ("qemu/qmp" for the namespace)
    # only for NATIVE wheels: what `pip download` needs to find them for another machine
    arch: str = ""             # platform.machine() of the target: x86_64, aarch64
    abi: str = ""              # abi3, cp39...
    python: str = ""           # --python-version for pip (3.9.2: cryptography excludes 3.9.0/1)
    skip: Tuple[str, ...] = ()  # files of the wheel's packages left out of the archive


# The runtime dependencies. click 8.1.8 is the last click that supports Python 3.9.
VENDOR: Tuple[Wheel, ...] = (
    Wheel("click", "8.1.8", "click-8.1.8-py3-none-any.whl",
          "63c132bbbed01578a06712a2d1f497bb62d9c1c0d329b7903a866228027263b2", ("click",)),
    Wheel("qemu.qmp", "0.0.6", "qemu_qmp-0.0.6-py3-none-any.whl",
          "5d7c5af0e9de427696e3bf72e333965c3a697929f77f6b7ddc30c989fc7b539b", ("qemu/qmp",),
          # qemu.qmp's interactive tools (qmp-shell, qmp-tui): no vproxy code imports them,
          # the .pyz offers no way to start them, and qmp-tui needs urwid (13 KiB less)
          skip=("qemu/qmp/qmp_shell.py", "qemu/qmp/qmp_tui.py")),
    # the agent's config file is TOML; Python 3.11+ has tomllib, 3.9 and 3.10 use this
    Wheel("tomli", "2.0.1", "tomli-2.0.1-py3-none-any.whl",
          "939de3e7a6161af0c887ef91b7d41a53e7c5a1ca976325f429cb46ea9bc30ecc", ("tomli",)),
)


# `vproxy pki` only: cryptography and cffi for each target, kept whole as data in the
# archive under _native/<arch>/. cryptography 45.0.7 is the newest release whose abi3
# manylinux2014 wheels (glibc 2.17+: Debian 11's 2.31 included; OpenSSL bundled) need
# nothing but cffi; 46+ also wants typing-extensions on Python < 3.11.
NATIVE_ARCHES = ("x86_64", "aarch64")
NATIVE_PYTHONS = ("3.9", "3.11", "3.13")   # the system python3 of Debian 11, 12, 13
NATIVE_PLATFORM = "manylinux2014_%s"
NATIVE_GLIBC = (2, 17)

_CRYPTOGRAPHY_SHA256 = {
    "x86_64": "3994c809c17fc570c2af12c9b840d7cea85a9fd3e5c0e0491f4fa3c029216d59",
    "aarch64": "81823935e2f8d476707e85a78a405953a03ef7b7b4f55f93f7c2d9680e5e0691",
}
_CFFI_SHA256 = {
    ("x86_64", "3.9"): "61d028e90346df14fedc3d1e5441df818d095f3b87d286825dfcbd6459b7ef63",
    ("x86_64", "3.11"): "8941aaadaf67246224cee8c3803777eed332a19d909b47e29c9842ef1e79ac26",
    ("x86_64", "3.13"): "c8d3b5532fc71b7a77c09192b4a5a200ea992702734a2e9279a37f2478236f26",
    ("aarch64", "3.9"): "3f4d46d8b35698056ec29bca21546e1551a205058ae1a181d871e278b0b28165",
    ("aarch64", "3.11"): "730cacb21e1bdff3ce90babf007d0a0917cc3e6492f336c2f0134101e0944f93",
    ("aarch64", "3.13"): "d48a880098c96020b02d5a1f7d9251308510ce8858940e6fa99ece33f610838b",
}


def _native_wheels() -> Tuple[Wheel, ...]:
    out = []
    for arch in NATIVE_ARCHES:
        plat = "manylinux2014_{0}.manylinux_2_17_{0}".format(arch)
        out.append(Wheel("cryptography", "45.0.7",
                         "cryptography-45.0.7-cp37-abi3-%s.whl" % plat,
                         _CRYPTOGRAPHY_SHA256[arch], (), arch, "abi3", "3.9.2"))
        for py in NATIVE_PYTHONS:
            tag = "cp" + py.replace(".", "")
            out.append(Wheel("cffi", "2.0.0", "cffi-2.0.0-%s-%s-%s.whl" % (tag, tag, plat),
                             _CFFI_SHA256[(arch, py)], (), arch, tag, py))
    return tuple(out)


NATIVE: Tuple[Wheel, ...] = _native_wheels()
NATIVE_DIR = "_native"

# What never goes into the archive from the source tree.
_SKIP_DIRS = {"__pycache__"}
_SKIP_SUFFIXES = (".pyc", ".pyo", ".swp", ".swo", ".orig", ".rej", "~")
_LICENSE_RE = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE|AUTHORS)", re.IGNORECASE)


class BuildError(Exception):
    """Something the person running the build must fix; printed without a traceback."""


class BuildResult(NamedTuple):
    path: Path
    size: int
    sha256: str
    build_hash: str
    entries: int


# ---------------------------------------------------------------------------------------
# wheels


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _wheel_ok(path: Path, wheel: Wheel) -> bool:
    return path.is_file() and _sha256_file(path) == wheel.sha256


class _LinkParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: List[str] = []

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
        if tag == "a":
            for name, value in attrs:
                if name == "href" and value:
                    self.links.append(value)


def _fetch_with_urllib(wheel: Wheel, dest: Path) -> None:
    """Fallback for a python3 without pip: PyPI's simple index, then the file itself."""
    index_url = PYPI_SIMPLE + re.sub(r"[-_.]+", "-", wheel.project).lower() + "/"
    with urllib.request.urlopen(index_url, timeout=60) as r:
        parser = _LinkParser()
        parser.feed(r.read().decode("utf-8", "replace"))
    for link in parser.links:
        url = urllib.parse.urljoin(index_url, link)
        if PurePosixPath(urllib.parse.urlparse(url).path).name == wheel.filename:
            break
    else:
        raise BuildError("%s not listed at %s" % (wheel.filename, index_url))
    tmp = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url.split("#")[0], timeout=120) as r, tmp.open("wb") as f:
        shutil.copyfileobj(r, f)
    os.replace(tmp, dest)


ALL_WHEELS: Tuple[Wheel, ...] = VENDOR + NATIVE


def _pip_download(directory: Path, wheels: List[Wheel], quiet: bool) -> None:
    """`pip download` the pure wheels in one go, and each native wheel for its target."""
    base = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
            "--only-binary=:all:", "--no-deps", "-d", str(directory)]
    if quiet:
        base.insert(4, "-q")
    groups: Dict[Tuple[str, str, str], List[Wheel]] = {}
    for w in wheels:
        groups.setdefault((w.arch, w.abi, w.python), []).append(w)
    for (arch, abi, python), group in sorted(groups.items()):
        cmd = list(base)
        if arch:
            cmd += ["--platform", NATIVE_PLATFORM % arch, "--implementation", "cp",
                    "--python-version", python, "--abi", abi]
        pins = ["%s==%s" % (w.project, w.version) for w in group]
        if not quiet:
            print("build.py: " + " ".join(cmd + pins), file=sys.stderr)
        if subprocess.run(cmd + pins).returncode != 0:
            raise BuildError("pip download failed for " + " ".join(pins))


def download_wheels(directory: Path, quiet: bool = False) -> None:
    """Put every pinned wheel into `directory` (kept if already there and intact)."""
    directory.mkdir(parents=True, exist_ok=True)
    missing = [w for w in ALL_WHEELS if not _wheel_ok(directory / w.filename, w)]
    if not missing:
        return
    have_pip = subprocess.run([sys.executable, "-m", "pip", "--version"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    if have_pip:
        _pip_download(directory, missing, quiet)
    else:
        for w in missing:
            if not quiet:
                print("build.py: fetching %s from PyPI (no pip here)" % w.filename, file=sys.stderr)
            _fetch_with_urllib(w, directory / w.filename)
    for w in missing:
        path = directory / w.filename
        if not path.is_file():
            raise BuildError("%s did not arrive in %s" % (w.filename, directory))
        if not _wheel_ok(path, w):
            raise BuildError("%s has SHA-256 %s, expected %s" % (path, _sha256_file(path), w.sha256))


def _wheel_files(path: Path, wheel: Wheel) -> Dict[str, bytes]:
    """The files of `wheel` that go into the archive: its packages, METADATA, licenses."""
    if not _wheel_ok(path, wheel):
        if not path.is_file():
            raise BuildError("missing wheel %s (fetch it with: python3 build.py --download-wheels %s)"
                             % (path, path.parent))
        raise BuildError("%s has SHA-256 %s, expected %s" % (path, _sha256_file(path), wheel.sha256))
    out: Dict[str, bytes] = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            name = info.filename
            if info.is_dir():
                continue
            parts = PurePosixPath(name).parts
            if parts[0].endswith(".dist-info"):
                leaf = parts[-1]
                if leaf == "METADATA" and len(parts) == 2:
                    out[name] = z.read(info)
                elif _LICENSE_RE.match(leaf) or (len(parts) > 2 and parts[1] == "licenses"):
                    out[name] = z.read(info)
                continue
            if (any(name.startswith(p + "/") for p in wheel.packages) and _wanted(parts)
                    and name not in wheel.skip):
                out[name] = z.read(info)
    for p in wheel.packages:
        if not any(n.startswith(p + "/") for n in out):
            raise BuildError("%s has no %s/" % (path.name, p))
    return out


# ---------------------------------------------------------------------------------------
# sources


def _wanted(parts: Iterable[str]) -> bool:
    parts = list(parts)
    if any(p in _SKIP_DIRS or p.startswith(".") for p in parts):
        return False
    return not parts[-1].endswith(_SKIP_SUFFIXES)


def _package_files(top: Path) -> Dict[str, bytes]:
    root = top / PACKAGE
    if not (root / "__init__.py").is_file():
        raise BuildError("%s is not a package" % root)
    out: Dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(top).as_posix()
            if not _wanted(PurePosixPath(rel).parts) or not path.is_file():
                continue
            if rel == PACKAGE + "/_build.py":
                continue  # generated below; a stray copy in the tree must not win
            out[rel] = path.read_bytes()
    return out


def _check_syntax(files: Dict[str, bytes]) -> None:
    """Refuse sources that the oldest supported Python (3.9) cannot even parse."""
    problems = []
    for name, data in sorted(files.items()):
        if not name.endswith(".py"):
            continue
        try:
            ast.parse(data, filename=name, feature_version=(3, 9))
        except SyntaxError as e:
            problems.append("%s:%s: %s" % (name, e.lineno, e.msg))
    if problems:
        raise BuildError("not Python 3.9 syntax:\n  " + "\n  ".join(problems))


def _read_version(top: Path) -> str:
    init = (top / PACKAGE / "__init__.py").read_text(encoding="utf-8")
    m = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", init, re.MULTILINE)
    if not m:
        raise BuildError("no __version__ in %s/__init__.py" % PACKAGE)
    version = m.group(1)
    pyproject = top / "pyproject.toml"
    if pyproject.is_file():
        p = re.search(r"^version\s*=\s*['\"]([^'\"]+)['\"]", pyproject.read_text(encoding="utf-8"),
                      re.MULTILINE)
        if p and p.group(1) != version:
            raise BuildError("version mismatch: pyproject.toml says %s, %s/__init__.py says %s"
                             % (p.group(1), PACKAGE, version))
    return version


MAIN_PY = b'''\
# vproxy.pyz entry point, written by build.py.
import sys

if sys.version_info < (3, 9):
    sys.stderr.write("vproxy needs Python 3.9 or newer; this is Python %d.%d\\n"
                     % sys.version_info[:2])
    sys.exit(1)

from vproxy._version import answer_version_fast

answer_version_fast()  # before click is imported: start-up time

from vproxy.cli import entry  # vproxy's error handling: one line, never a traceback

entry()
'''


def content_hash(files: Dict[str, bytes]) -> str:
    """SHA-256 over the sorted (name, content) pairs: what BUILD_HASH is."""
    h = hashlib.sha256()
    for name in sorted(files):
        data = files[name]
        h.update(b"%d:%s\0%d:" % (len(name.encode()), name.encode(), len(data)))
        h.update(data)
    return h.hexdigest()


def _native_member(wheel: Wheel) -> str:
    return "%s/%s/%s" % (NATIVE_DIR, wheel.arch, wheel.filename)


def native_sets() -> Dict[str, Dict[str, Tuple[str, Tuple[str, ...]]]]:
    """{arch: {"3.9": (key, (archive member, ...))}}: what vproxy/security/native.py unpacks for
    each target. The key names the cache directory: a hash of the wheels' SHA-256s."""
    out: Dict[str, Dict[str, Tuple[str, Tuple[str, ...]]]] = {}
    for arch in NATIVE_ARCHES:
        crypto = [w for w in NATIVE if w.arch == arch and w.project == "cryptography"]
        for py in NATIVE_PYTHONS:
            cffi = [w for w in NATIVE if w.arch == arch and w.project == "cffi" and w.python == py]
            members = crypto + cffi
            key = hashlib.sha256("\n".join(sorted(w.sha256 for w in members)).encode())
            out.setdefault(arch, {})[py] = (key.hexdigest()[:32],
                                            tuple(_native_member(w) for w in members))
    return out


def _build_module(version: str, build_hash: str) -> bytes:
    vendored = ", ".join('"%s": "%s"' % (w.project, w.version) for w in VENDOR)
    native = pprint.pformat(native_sets(), width=96)
    return ('''\
"""Facts about this vproxy.pyz, written by build.py. Not in the source tree: there the
CLI reports a development build."""

VERSION = "%s"
BUILD_HASH = "%s"  # SHA-256 of the archive's contents other than this file
VENDORED = {%s}

# vproxy pki's cryptography, per platform.machine() and Python: (cache key, wheels)
NATIVE_GLIBC = %r
NATIVE = %s
''' % (version, build_hash, vendored, NATIVE_GLIBC, native)).encode()


def collect(top: Path, wheel_dir: Path) -> Dict[str, bytes]:
    """Every file of the archive, by its name in the archive."""
    files = _package_files(top)
    _check_syntax(files)
    version = _read_version(top)
    for wheel in VENDOR:
        for name, data in _wheel_files(wheel_dir / wheel.filename, wheel).items():
            if name in files:
                raise BuildError("%s is in both %s and %s" % (name, wheel.filename, PACKAGE))
            files[name] = data
    for wheel in NATIVE:
        path = wheel_dir / wheel.filename
        if not _wheel_ok(path, wheel):
            _wheel_files(path, wheel)  # raises the missing / wrong SHA-256 error
        files[_native_member(wheel)] = path.read_bytes()
    files["__main__.py"] = MAIN_PY
    build_hash = content_hash(files)
    files[PACKAGE + "/_build.py"] = _build_module(version, build_hash)
    return files


# ---------------------------------------------------------------------------------------
# the archive


def _date_time() -> Tuple[int, int, int, int, int, int]:
    epoch = ZIP_EPOCH
    sde = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if sde:
        try:
            epoch = max(int(sde), ZIP_EPOCH)
        except ValueError:
            raise BuildError("SOURCE_DATE_EPOCH must be an integer, not %r" % sde) from None
    return time.gmtime(epoch)[:6]


def _directories(names: Iterable[str]) -> List[str]:
    dirs = set()
    for name in names:
        parent = PurePosixPath(name).parent
        while str(parent) != ".":
            dirs.add(str(parent) + "/")
            parent = parent.parent
    return sorted(dirs)


def write_archive(files: Dict[str, bytes], output: Path) -> None:
    """Write `files` as a deterministic zipapp at `output` (atomically)."""
    date_time = _date_time()
    # Directory entries too: zipimport finds namespace packages (qemu/) by them.
    entries = [(d, None) for d in _directories(files)] + [(n, files[n]) for n in files]
    entries.sort(key=lambda e: e[0])
    buf = io.BytesIO()
    buf.write(SHEBANG)
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=date_time)
            info.create_system = 3  # Unix, so that external_attr means mode bits
            if data is None:
                info.external_attr = ((stat.S_IFDIR | 0o755) << 16) | 0x10
                info.compress_type = zipfile.ZIP_STORED
                z.writestr(info, b"")
            else:
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                # wheels are zips already: stored, deflating them again gains nothing
                method = zipfile.ZIP_STORED if name.endswith(".whl") else COMPRESSION
                info.compress_type = method
                z.writestr(info, data, compress_type=method, compresslevel=COMPRESSLEVEL)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + output.name + ".", dir=str(output.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.chmod(tmp, 0o755)
        os.replace(tmp, output)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def build(output: Path = DEFAULT_OUTPUT, wheel_dir: Optional[Path] = None, top: Path = TOP,
          quiet: bool = False) -> BuildResult:
    """Build the .pyz. Without `wheel_dir`, the pinned wheels are fetched once into
    .cache/wheels; with it, only that directory is used (offline)."""
    if wheel_dir is None:
        wheel_dir = DEFAULT_WHEEL_CACHE
        download_wheels(wheel_dir, quiet=quiet)
    files = collect(top, wheel_dir)
    write_archive(files, output)
    data = output.read_bytes()
    build_hash = re.search(rb'BUILD_HASH = "([0-9a-f]+)"', files[PACKAGE + "/_build.py"]).group(1)
    return BuildResult(output, len(data), hashlib.sha256(data).hexdigest(), build_hash.decode(),
                       len(files))


def _report(result: BuildResult) -> None:
    try:
        shown = result.path.relative_to(Path.cwd())
    except ValueError:
        shown = result.path
    print("%s  %d bytes (%.1f MiB)  sha256 %s  (build %s, %d files)"
          % (shown, result.size, result.size / 2**20, result.sha256, result.build_hash[:12],
             result.entries))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Build the single-file vproxy.pyz.")
    ap.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT,
                    help="where to write the archive (default: dist/vproxy.pyz)")
    ap.add_argument("--wheels", type=Path, metavar="DIR",
                    help="take the pinned wheels from DIR only (offline); default: download "
                         "them once into .cache/wheels")
    ap.add_argument("--download-wheels", type=Path, metavar="DIR",
                    help="download the pinned wheels into DIR and stop")
    ap.add_argument("--check-reproducible", action="store_true",
                    help="build twice in temporary directories and compare the results")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the result line")
    args = ap.parse_args(argv)
    try:
        if args.download_wheels:
            download_wheels(args.download_wheels, quiet=args.quiet)
            for w in ALL_WHEELS:
                print(args.download_wheels / w.filename)
            return 0
        wheel_dir = args.wheels
        if wheel_dir is None:
            download_wheels(DEFAULT_WHEEL_CACHE, quiet=args.quiet)
            wheel_dir = DEFAULT_WHEEL_CACHE
        if args.check_reproducible:
            digests = []
            for n in (1, 2):
                with tempfile.TemporaryDirectory(prefix="vproxy-build%d-" % n) as d:
                    digests.append(build(Path(d) / "vproxy.pyz", wheel_dir, quiet=args.quiet).sha256)
            if digests[0] != digests[1]:
                print("build.py: NOT reproducible: %s != %s" % tuple(digests), file=sys.stderr)
                return 1
            print("reproducible: sha256 %s" % digests[0])
        _report(build(args.output.resolve(), wheel_dir, quiet=args.quiet))
        return 0
    except BuildError as e:
        print("build.py: %s" % e, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
