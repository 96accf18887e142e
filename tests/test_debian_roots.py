"""vproxy.pyz on bare hosts of the machine's own architecture (x86_64 in CI): Debian 11
(python3 3.9, the oldest we support), Debian 12 (python3 3.11) and Debian 13 (python3
3.13, the newest), each with python3 and nothing else. `vproxy pki` in these roots, and
the arm64 roots, are tested in test_pyz_pki.py.

Each host is a debootstrap'ed root (tests/support/debian_root.py) entered with chroot; it shares
the host's network namespace, so an agent inside listening on 127.0.0.1 is reached by a
client outside, and the other way round.

What these tests prove, on each:
- the root really is that Debian with that Python, and has no click of its own;
- the pyz runs there (`python3 vproxy.pyz --version`, and as `./vproxy.pyz` through its
  shebang), and every module it ships imports;
- build.py itself runs there and makes an archive with the same content;
- a real `vproxy bench` completes between an agent inside and a client on the host's
  Python outside, and in the other direction.

Skipped (with the reason) where the machine cannot make the roots: not root, no
debootstrap; under CI ($CI set) that is a failure instead (debian_root.root_for_test).
Making a root the first time takes a minute or two; it is cached.
"""

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List, NamedTuple, Sequence

import pytest

from support.debian_root import RootDir, popen_in_root, root_for_test, root_tempdir, run_in_root
from support.pyztools import build_pyz, session_pyz, snapshot_tree, wheel_dir, zip_build_hash

# the first test to use a Debian root builds it with debootstrap: minutes on a fresh
# machine (an emulated arm64 root: over ten), more than the suite's 300 s per test
pytestmark = [pytest.mark.timeout(1200), pytest.mark.debian_root, pytest.mark.slow]

READY_TIMEOUT = 60.0  # a loaded 2-core machine, Python 3.9 compiling the pyz's sources
BENCH_TIMEOUT = 180.0


class Bare(NamedTuple):
    release: str
    debian: str   # what /etc/debian_version starts with
    python: str   # what `python3 --version` says after "Python "


BARE_HOSTS = [
    pytest.param(Bare("bullseye", "11.", "3.9."), id="debian11-py3.9"),
    pytest.param(Bare("bookworm", "12.", "3.11."), id="debian12-py3.11"),
    pytest.param(Bare("trixie", "13.", "3.13."), id="debian13-py3.13"),
]


@pytest.fixture(scope="module", params=BARE_HOSTS)
def bare(request) -> Bare:
    return request.param


@pytest.fixture(scope="module")
def root(bare) -> Path:
    return root_for_test(bare.release)


@pytest.fixture(scope="module")
def inside(root) -> Iterator[RootDir]:
    """A scratch directory in the root holding the pyz under test."""
    with root_tempdir(root) as d:
        d.put(session_pyz())
        yield d


def run(root: Path, argv: Sequence[str], timeout: float = 120.0,
        **kwargs) -> "subprocess.CompletedProcess[str]":
    return run_in_root(root, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=timeout, **kwargs)


def test_root_is_the_debian_and_python_we_want(root, bare):
    out = run(root, ["python3", "--version"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Python " + bare.python), out.stdout
    assert (root / "etc/debian_version").read_text().startswith(bare.debian)
    # Bare: no pip, no third-party packages that could stand in for the vendored ones.
    out = run(root, ["python3", "-c", "import click"])
    assert out.returncode != 0 and "No module named 'click'" in out.stderr


def test_pyz_version(root, inside, bare):
    pyz = inside.path("vproxy.pyz")
    out = run(root, ["python3", pyz, "--version"])
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout + out.stderr
    assert re.search(r"vproxy \d+\.\d+\.\d+", text), text
    if "Python" in text:
        assert "Python " + bare.python in text, text
    m = re.search(r"build ([0-9a-f]{6,64})", text)
    if m:
        assert zip_build_hash(session_pyz()).startswith(m.group(1)), text
    # As a person runs it: the file itself, through its shebang (/usr/bin/env python3).
    direct = run(root, ["./vproxy.pyz", "--version"], cwd=str(inside.inside))
    assert direct.returncode == 0, direct.stdout + direct.stderr
    assert direct.stdout == out.stdout


IMPORT_ALL = r"""
import importlib, pkgutil, sys
sys.path.insert(0, sys.argv[1])
import vproxy, qemu.qmp, click

failed = []
names = [m.name for m in pkgutil.walk_packages(vproxy.__path__, "vproxy.")
         if not m.name.endswith(".__main__")]  # that one runs the CLI
for name in names:
    try:
        importlib.import_module(name)
    except ImportError as e:
        if getattr(e, "name", None) != "cryptography" and "cryptography" not in str(e):
            failed.append("%s: %r" % (name, e))
    except BaseException as e:
        failed.append("%s: %r" % (name, e))
print("%d modules" % len(names))
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_shipped_module_imports(root, inside):
    """Catches what --version does not load: 3.10+ syntax or typing evaluated at import
    (`X | Y` in a dataclass field, `list[int]` in a NamedTuple...) anywhere in vproxy.
    Only a missing `cryptography` is allowed (not shipped; `vproxy pki` says so)."""
    out = run(root, ["python3", "-I", "-S", "-c", IMPORT_ALL, inside.path("vproxy.pyz")])
    assert out.returncode == 0, out.stdout + out.stderr
    assert int(out.stdout.split()[0]) >= 10, out.stdout  # it did walk the package


def test_build_py_runs_there(root, tmp_path):
    """build.py is standard library only and runs on 3.9, 3.11 and 3.13; the content it
    packs (BUILD_HASH) is the same whichever Python builds it."""
    src = snapshot_tree(tmp_path / "src")
    build_pyz(tmp_path / "host.pyz", top=src)
    with root_tempdir(root) as d:
        snapshot_tree(d.host / "src")
        (d.host / "wheels").mkdir()
        for whl in wheel_dir().glob("*.whl"):
            d.put(whl, "wheels/" + whl.name)
        out = run(root, ["python3", "src/build.py", "--wheels", "wheels", "-o", "out.pyz"],
                  cwd=str(d.inside))
        assert out.returncode == 0, out.stdout + out.stderr
        assert zip_build_hash(d.host / "out.pyz") == zip_build_hash(tmp_path / "host.pyz")
        # The bytes also match when both zlibs deflate alike (they do for Debian 11's 1.2.11
        # and Debian 12's 1.2.13); report rather than fail if some zlib differs.
        if (d.host / "out.pyz").read_bytes() != (tmp_path / "host.pyz").read_bytes():
            pytest.xfail("same content, different deflate output (zlib versions differ)")


# ---------------------------------------------------------------------------------------
# a real agent and a real bench across the chroot boundary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    """A `vproxy serve` process whose stderr is collected in a thread."""

    def __init__(self, proc: "subprocess.Popen[str]") -> None:
        self.proc = proc
        self.lines: List[str] = []
        self.ready = threading.Event()
        self.port = 0
        self.killed = False  # it ignored SIGTERM and needed SIGKILL
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if m and not self.ready.is_set():
                self.port = int(m.group(1))
                self.ready.set()
        self.ready.set()  # EOF: it died

    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self) -> int:
        self.ready.wait(READY_TIMEOUT)
        if not self.port:
            state = "exited %s" % self.proc.poll() if self.proc.poll() is not None else "hangs"
            raise AssertionError("agent not ready after %.0f s (%s); its stderr:\n%s"
                                 % (READY_TIMEOUT, state, self.output()))
        return self.port

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.proc.kill()
                self.proc.wait(5)
        self._thread.join(5)


@contextlib.contextmanager
def agent(popen, argv: Sequence[str]) -> Iterator[Agent]:
    a = Agent(popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, universal_newlines=True))
    try:
        yield a
    finally:
        a.stop()


def host_env() -> dict:
    """The host's environment without VPROXY_* settings that could change what runs."""
    return {k: v for k, v in os.environ.items() if not k.startswith("VPROXY_")}


def check_bench(out: "subprocess.CompletedProcess[str]", agent_: Agent) -> dict:
    detail = ("bench exit %d\nstdout:\n%s\nstderr:\n%s\nagent stderr:\n%s"
              % (out.returncode, out.stdout, out.stderr, agent_.output()))
    assert out.returncode == 0, detail
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert lines, detail
    result = json.loads(lines[-1])
    for key in ("upload_mbps", "download_mbps", "rtt_p50_us", "rtt_p99_us", "streams_ok"):
        assert key in result, (key, result)
    assert result["upload_mbps"] > 0 and result["download_mbps"] > 0, result
    assert 0 < result["rtt_p50_us"] <= result["rtt_p99_us"], result
    assert result["streams_ok"] > 0, result
    if "streams" in result:
        assert result["streams_ok"] == result["streams"], result
    return result


def test_bench_agent_inside_client_on_host(root, inside, pki, bare):
    """The agent runs inside, on the bare host's Python; the client is the host's."""
    ca = inside.put(pki.ca, "ca.pem")
    cert = inside.put(pki.server.cert, "server.pem")
    key = inside.put(pki.server.key, "server.key")
    port = free_port()
    # the agent reads a TOML config file: the vendored tomli on 3.9, tomllib on 3.11+
    (inside.host / "agent.toml").write_text(
        'listen = "127.0.0.1:%d"\ncert = "%s"\nkey = "%s"\nca = "%s"\n' % (port, cert, key, ca))
    serve = ["python3", inside.path("vproxy.pyz"), "serve", "--config", inside.path("agent.toml")]
    with agent(lambda argv, **kw: popen_in_root(root, argv, **kw), serve) as a:
        port = a.wait_ready()
        t0 = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-I", str(session_pyz()), "bench", "127.0.0.1:%d" % port,
             "--cert", pki.alice.cert, "--key", pki.alice.key, "--ca", pki.ca,
             "--seconds", "1", "--json"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, timeout=BENCH_TIMEOUT, env=host_env())
        result = check_bench(out, a)
        print("agent in %s <- client on host: %s (%.1f s)"
              % (bare.release, result, time.monotonic() - t0))
    assert not a.killed, "the agent in the root ignored SIGTERM:\n" + a.output()


def test_bench_agent_on_host_client_inside(root, inside, pki, bare):
    """The other way round: the agent is the host's Python, the client runs inside."""
    ca = inside.put(pki.ca, "ca.pem")
    cert = inside.put(pki.alice.cert, "alice.pem")
    key = inside.put(pki.alice.key, "alice.key")
    port = free_port()
    serve = [sys.executable, "-I", str(session_pyz()), "serve", "--listen",
             "127.0.0.1:%d" % port, "--cert", pki.server.cert, "--key", pki.server.key,
             "--ca", pki.ca]
    with agent(lambda argv, **kw: subprocess.Popen(argv, env=host_env(), **kw), serve) as a:
        port = a.wait_ready()
        t0 = time.monotonic()
        out = run(root, ["python3", inside.path("vproxy.pyz"), "bench", "127.0.0.1:%d" % port,
                         "--cert", cert, "--key", key, "--ca", ca, "--seconds", "1", "--json"],
                  timeout=BENCH_TIMEOUT, stdin=subprocess.DEVNULL)
        result = check_bench(out, a)
        print("agent on host <- client in %s: %s (%.1f s)"
              % (bare.release, result, time.monotonic() - t0))
    assert not a.killed, "the agent ignored SIGTERM:\n" + a.output()
