"""A Debian root filesystem to run vproxy.pyz on a "bare host": the honest test that the
single file works on the system python3 of Debian 11, 12 and 13 (3.9, 3.11, 3.13), on
amd64 and (through qemu-user) arm64, with nothing else installed.

- `debian_root(release="bullseye", arch=None)` -> Path: made once with
  ``debootstrap --variant=minbase --include=python3,ca-certificates`` (a minute or two;
  an emulated arm64 root: ten minutes or more) and cached under
  ``$VPROXY_TEST_CACHE/roots/<release>-<arch>`` (default cache: ``~/.cache/vproxy-tests``).
  It is built in a temporary directory beside that path and renamed into place only once
  it works, under a file lock, so a half-made root is never used and two test sessions
  never build at once.
- `run_in_root(root, argv, **kw)` (like `subprocess.run`) and `popen_in_root(root, argv,
  **kw)` (like `subprocess.Popen`) run a command inside the root: `chroot` in a private
  mount namespace (``unshare --mount``) that has /proc and the host's /dev mounted; the
  mounts vanish with the namespace, so nothing is left to clean up even after a crash.
  The network namespace is the host's: a server inside listening on 127.0.0.1 is reached
  from outside, and the other way round. The environment inside is a minimal one
  (PATH, HOME, LANG) unless `env=` is given.
- `root_tempdir(root)`: a fresh directory under the root's /tmp, removed afterwards;
  `put(file)` copies a host file into it and returns the path as seen inside.

Needs root privileges (debootstrap, chroot). Without them, or without debootstrap, the
functions raise `RootUnavailable`. Tests get their roots through `root_for_test`, which
turns that into a skip with its reason, except under CI (``$CI`` set, e.g. ``CI=1``),
where it is a failure: there a skipped test must not pass for a tested host.
"""

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import pytest

__all__ = [
    "RootUnavailable",
    "RootDir",
    "default_cache_dir",
    "root_info",
    "debian_root",
    "in_ci",
    "root_for_test",
    "root_argv",
    "run_in_root",
    "popen_in_root",
    "RootPopen",
    "root_tempdir",
    "enable_foreign_arch",
]

DEFAULT_MIRROR = "http://deb.debian.org/debian"
INCLUDE = ("python3", "ca-certificates")
STAMP = ".vproxy-test-root.json"
ROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}
DEBOOTSTRAP_TIMEOUT = 20 * 60

PathLike = Union[str, "os.PathLike[str]"]


class RootUnavailable(Exception):
    """This machine cannot make or enter a Debian root (not root, no debootstrap...)."""


def default_cache_dir() -> Path:
    """``$VPROXY_TEST_CACHE``, or ``~/.cache/vproxy-tests``."""
    env = os.environ.get("VPROXY_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vproxy-tests"


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise RootUnavailable("%s is not installed" % name)
    return path


def _require_root() -> None:
    if os.geteuid() != 0:
        raise RootUnavailable("needs root privileges (debootstrap, chroot)")


def _host_arch() -> str:
    try:
        out = subprocess.run(["dpkg", "--print-architecture"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, universal_newlines=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)


def _mounts_under(path: Path) -> List[str]:
    """Mount points at or below `path`, deepest first."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].replace("\\040", " ")
            if mnt == prefix or mnt.startswith(prefix + "/"):
                found.append(mnt)
    return sorted(found, key=len, reverse=True)


def _remove_tree(path: Path) -> None:
    """Remove a (possibly half-made) root: unmount what debootstrap left mounted first,
    so that rmtree never walks into the host's /proc or /dev."""
    for mnt in _mounts_under(path):
        subprocess.run(["umount", "-l", mnt], stderr=subprocess.DEVNULL)
    if _mounts_under(path):
        raise RuntimeError("cannot unmount everything under %s; remove it by hand" % path)
    shutil.rmtree(str(path), ignore_errors=True)


def _probe_python(root: Path) -> str:
    out = subprocess.run([_tool("chroot"), str(root), "python3", "--version"], env=ROOT_ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True, timeout=60)
    if out.returncode != 0 or not out.stdout.startswith("Python "):
        raise RuntimeError("python3 in %s does not run: %s" % (root, out.stdout.strip()))
    return out.stdout.split()[1]


_QEMU_NAMES = {"arm64": "aarch64", "armhf": "arm", "riscv64": "riscv64", "ppc64el": "ppc64le",
               "s390x": "s390x", "i386": "i386"}
BINFMT = Path("/proc/sys/fs/binfmt_misc")


def enable_foreign_arch(arch: str) -> None:
    """Make the kernel run `arch` binaries through qemu-user (for a foreign root): mount
    binfmt_misc if needed and enable the qemu-user-static handler. Needs the Debian
    packages qemu-user-static and binfmt-support; raises RootUnavailable without them."""
    _require_root()
    if arch == _host_arch():
        return
    qemu = _QEMU_NAMES.get(arch, arch)
    handler = BINFMT / ("qemu-" + qemu)
    if handler.is_file() and handler.read_text().startswith("enabled"):
        return
    _tool("qemu-%s-static" % qemu)
    update = _tool("update-binfmts")
    if not (BINFMT / "register").exists():
        subprocess.run([_tool("mount"), "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)],
                       stderr=subprocess.DEVNULL)
    subprocess.run([update, "--enable", "qemu-" + qemu], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    if not (handler.is_file() and handler.read_text().startswith("enabled")):
        raise RootUnavailable("cannot enable the qemu-%s binfmt handler" % qemu)


def debian_root(release: str = "bullseye", cache_dir: Optional[PathLike] = None,
                arch: Optional[str] = None, mirror: Optional[str] = None) -> Path:
    """The cached Debian `release` root for `arch` (default: the host's), made if needed.

    `mirror` defaults to ``$VPROXY_DEBIAN_MIRROR`` or deb.debian.org. A foreign `arch`
    (arm64 on an x86_64 host) runs under qemu-user: `enable_foreign_arch` sets up its
    binfmt handler, and needs qemu-user-static and binfmt-support installed.
    """
    _require_root()
    arch = arch or _host_arch()
    mirror = mirror or os.environ.get("VPROXY_DEBIAN_MIRROR") or DEFAULT_MIRROR
    enable_foreign_arch(arch)
    base = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "roots"
    base.mkdir(parents=True, exist_ok=True)
    name = "%s-%s" % (release, arch)
    final = base / name
    with open(str(base / (".%s.lock" % name)), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent session builds; we wait for it
        if (final / STAMP).is_file():
            return final
        debootstrap = _tool("debootstrap")
        _tool("chroot")
        for stale in base.glob(".%s.tmp-*" % name):  # left by a build that was killed
            _remove_tree(stale)
        if final.exists():  # no stamp: not ours, or broken; never use it
            _remove_tree(final)
        tmp = Path(tempfile.mkdtemp(prefix=".%s.tmp-" % name, dir=str(base)))
        log = base / (".%s.log" % name)
        cmd = [debootstrap, "--variant=minbase", "--include=" + ",".join(INCLUDE)]
        if arch != _host_arch():
            cmd.append("--arch=" + arch)
        cmd += [release, str(tmp), mirror]
        started = time.monotonic()
        try:
            with log.open("w") as f:
                f.write(" ".join(cmd) + "\n")
                f.flush()
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                                    timeout=DEBOOTSTRAP_TIMEOUT).returncode
            if rc != 0:
                tail = log.read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError("debootstrap %s failed (exit %d); end of %s:\n%s"
                                   % (release, rc, log, "\n".join(tail)))
            for deb in (tmp / "var/cache/apt/archives").glob("*.deb"):
                deb.unlink()  # 40 MB nobody needs
            if not (tmp / "etc/hosts").exists():
                (tmp / "etc/hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost\n")
            version = _probe_python(tmp)
            stamp = {"release": release, "arch": arch, "mirror": mirror, "python": version,
                     "include": list(INCLUDE), "seconds": round(time.monotonic() - started, 1),
                     "made": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (tmp / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
            os.chmod(str(tmp), 0o755)  # mkdtemp made it 0700
            os.rename(str(tmp), str(final))
        except BaseException:
            _remove_tree(tmp)
            raise
        return final


def in_ci() -> bool:
    """Whether this run is CI: ``$CI`` is set to anything but "", "0" or "false"."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def root_for_test(release: str, arch: Optional[str] = None) -> Path:
    """`debian_root(release, arch=arch)` for a test or fixture. When this machine cannot
    make the root (`RootUnavailable`: not root, no debootstrap, no qemu-user...) the test
    is skipped with the reason -- but under CI (`in_ci`) it fails: CI must run every
    root it claims to test. Other errors (debootstrap itself failing) always fail."""
    try:
        return debian_root(release, arch=arch)
    except RootUnavailable as e:
        what = "no Debian %s %s root: %s" % (release, arch or _host_arch(), e)
    if in_ci():
        pytest.fail(what + " (CI is set: a root that cannot be made fails, not skips)",
                    pytrace=False)
    pytest.skip(what)


def root_info(root: PathLike) -> Dict[str, Any]:
    """What `debian_root` recorded when it made `root` (release, arch, python, seconds)."""
    return json.loads((Path(root) / STAMP).read_text())


_UNSHARE_OK: Optional[bool] = None


def _unshare_works() -> bool:
    global _UNSHARE_OK
    if _UNSHARE_OK is None:
        try:
            _UNSHARE_OK = subprocess.run(
                [_tool("unshare"), "--mount", "--fork", "--kill-child=SIGTERM", "true"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, timeout=30).returncode == 0
        except (RootUnavailable, OSError, subprocess.TimeoutExpired):
            _UNSHARE_OK = False
    return _UNSHARE_OK


_ENTER = r'''
mount=$1 chroot=$2 root=$3; shift 3
"$mount" -t proc proc "$root/proc" && "$mount" --rbind /dev "$root/dev" || exit 125
exec "$chroot" "$root" "$@"
'''


def root_argv(root: PathLike, argv: Sequence[str], cwd: Optional[str] = None) -> List[str]:
    """The host command line that runs `argv` inside `root` (in directory `cwd` there).

    With a private mount namespace when the host allows one (/proc and /dev mounted
    inside, gone when the command ends); plain chroot otherwise.
    """
    _require_root()
    root = str(Path(root).resolve())
    inner = list(argv)
    if cwd is not None:
        inner = ["/bin/sh", "-c", 'cd "$0" && exec "$@"', str(cwd)] + inner
    if _unshare_works():
        # --kill-child: if the unshare process is killed, the command inside gets SIGTERM
        return [_tool("unshare"), "--mount", "--fork", "--kill-child=SIGTERM", "--",
                "/bin/sh", "-c", _ENTER, "enter-root", _tool("mount"), _tool("chroot"),
                root] + inner
    return [_tool("chroot"), root] + inner


def _root_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    if kwargs.get("env") is None:
        kwargs["env"] = dict(ROOT_ENV)
    kwargs["start_new_session"] = True  # RootPopen signals the whole group
    return kwargs


class RootPopen(subprocess.Popen):
    """A Popen whose signals (terminate, kill, send_signal) reach the command inside the
    root: they go to its whole process group. (unshare ignores SIGTERM while it waits for
    its child, so signalling only the pid we started would not.)"""

    def send_signal(self, sig: int) -> None:
        self.poll()
        if self.returncode is None:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass


def popen_in_root(root: PathLike, argv: Sequence[str], cwd: Optional[str] = None,
                  **kwargs: Any) -> RootPopen:
    """`subprocess.Popen(argv, **kwargs)` inside `root`; `cwd` is a path inside the root.
    The command runs in a new session; `terminate()`/`kill()` reach it."""
    return RootPopen(root_argv(root, argv, cwd), **_root_kwargs(kwargs))


def run_in_root(root: PathLike, argv: Sequence[str], cwd: Optional[str] = None,
                input: Any = None, timeout: Optional[float] = None, check: bool = False,
                **kwargs: Any) -> "subprocess.CompletedProcess[Any]":
    """`subprocess.run(argv, ...)` inside `root`; `cwd` is a path inside the root. On a
    timeout the command inside is killed too, then TimeoutExpired is raised."""
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    if kwargs.pop("capture_output", False):
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    with popen_in_root(root, argv, cwd, **kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        except BaseException:
            proc.kill()
            raise
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if check:
        result.check_returncode()
    return result


class RootDir:
    """A directory inside a root, seen from the host (`host`) and from inside (`inside`)."""

    def __init__(self, host: Path, inside: PurePosixPath) -> None:
        self.host = host
        self.inside = inside

    def path(self, name: str) -> str:
        """`name` in this directory, as a path inside the root."""
        return str(self.inside / name)

    def put(self, src: PathLike, name: Optional[str] = None) -> str:
        """Copy the host file `src` here (mode kept); its path inside the root."""
        name = name or Path(src).name
        shutil.copy2(str(src), str(self.host / name))
        return self.path(name)

    def __repr__(self) -> str:
        return "RootDir(%s)" % self.host


@contextlib.contextmanager
def root_tempdir(root: PathLike, prefix: str = "vproxy-test-") -> Iterator[RootDir]:
    """A new directory under `root`/tmp, removed on exit."""
    tmp_host = Path(root) / "tmp"
    host = Path(tempfile.mkdtemp(prefix=prefix, dir=str(tmp_host)))
    os.chmod(str(host), 0o755)
    try:
        yield RootDir(host, PurePosixPath("/tmp") / host.name)
    finally:
        shutil.rmtree(str(host), ignore_errors=True)
