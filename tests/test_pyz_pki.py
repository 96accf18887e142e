"""`vproxy pki` from the .pyz with nothing installed: the cryptography and cffi wheels that
build.py bundles are unpacked on first use (vproxy/security/native.py).

What these tests prove:
- the archive holds one set (cryptography + cffi) per machine and Python it lists, each
  wheel stored whole;
- on the host's Python with no site-packages (`-I -S`), `pki init`, `pki issue server`,
  `pki issue client` and `pki show` work; the set is unpacked once, 0700, under
  $XDG_CACHE_HOME/vproxy/native/<key>/, and a second run does not unpack it again;
- a machine or Python with no set gets one clear line, no traceback;
- in the Debian 11 (3.9), 12 (3.11) and 13 (3.13) roots of the machine's own
  architecture (x86_64 in CI) with python3 and nothing else, the same four commands
  work, and the certificates they made carry a real `vproxy bench` between an agent
  inside and a client on the host;
- in Debian 11, 12 and 13 arm64 roots (qemu-user), `--version` shows that Debian's
  Python, and `pki init` (which unpacks the aarch64 cffi built for that Python) and
  `pki issue` work.

The roots come from debian_root.root_for_test: skipped where the machine cannot make
them, a failure under CI ($CI set).
"""

import os
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pytest

from support.debian_root import ROOT_ENV, popen_in_root, root_for_test, root_tempdir, run_in_root
from support.pyztools import session_pyz
from test_debian_roots import BENCH_TIMEOUT, agent, check_bench, free_port, host_env

# the first test to use a Debian root builds it with debootstrap: minutes on a fresh
# machine (an emulated arm64 root: over ten), more than the suite's 300 s per test
pytestmark = [pytest.mark.timeout(1200), pytest.mark.slow]

MARKER = ".vproxy-native-complete"
COVERED = {("x86_64", "3.9"), ("x86_64", "3.11"), ("x86_64", "3.13"),
           ("aarch64", "3.9"), ("aarch64", "3.11"), ("aarch64", "3.13")}


def native_table(pyz: Path) -> Dict:
    with zipfile.ZipFile(str(pyz)) as z:
        namespace: Dict = {}
        exec(z.read("vproxy/_build.py").decode(), namespace)
    return namespace["NATIVE"]


def test_archive_holds_a_set_per_target():
    pyz = session_pyz()
    table = native_table(pyz)
    assert {(m, py) for m, pys in table.items() for py in pys} == COVERED
    with zipfile.ZipFile(str(pyz)) as z:
        infos = {i.filename: i for i in z.infolist()}
        for machine, pys in table.items():
            for py, (key, members) in pys.items():
                assert len(key) == 32, key
                assert [m.split("/")[-1].split("-")[0] for m in members] == ["cryptography", "cffi"]
                tag = "cp" + py.replace(".", "")
                assert "-%s-%s-" % (tag, tag) in members[1], members
                for m in members:
                    assert m.startswith("_native/%s/" % machine) and m.endswith(machine + ".whl")
                    assert infos[m].compress_type == zipfile.ZIP_STORED, m
    keys = [k for pys in table.values() for k, _ in pys.values()]
    assert len(set(keys)) == len(keys)


def pyz_run(argv: Sequence[str], cache: Path, timeout: float = 120.0):
    env = {"HOME": str(cache.parent), "XDG_CACHE_HOME": str(cache), "LANG": "C.UTF-8",
           "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run([sys.executable, "-I", "-S", str(session_pyz())] + list(argv), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout)


PKI_STEPS = [
    ["pki", "init", "--dir", "{d}"],
    ["pki", "issue", "server", "agent", "--dns", "localhost", "--ip", "127.0.0.1", "--dir", "{d}"],
    ["pki", "issue", "client", "alice", "--dir", "{d}"],
    ["pki", "show", "alice", "--dir", "{d}"],
]


def steps(pki_dir: str) -> List[List[str]]:
    return [[a.replace("{d}", pki_dir) for a in step] for step in PKI_STEPS]


def unpacked(cache: Path) -> List[Path]:
    root = cache / "vproxy" / "native"
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def test_pki_on_host_python_without_site_packages(tmp_path):
    if (os.uname().machine, "%d.%d" % sys.version_info[:2]) not in COVERED:
        pytest.skip("the host's Python %d.%d is not a bundled target" % sys.version_info[:2])
    cache = tmp_path / "cache"
    pki_dir = tmp_path / "pki"
    t0 = time.monotonic()
    for argv in steps(str(pki_dir)):
        out = pyz_run(argv, cache)
        assert out.returncode == 0, (argv, out.stdout, out.stderr)
    print("pki init + issue x2 + show from the pyz: %.2f s" % (time.monotonic() - t0))
    assert "alice" in out.stdout, out.stdout
    for name in ("ca.pem", "issued/agent.pem", "issued/alice.pem"):
        assert (pki_dir / name).read_text().startswith("-----BEGIN CERTIFICATE-----")
    dirs = unpacked(cache)
    assert len(dirs) == 1, dirs
    assert stat.S_IMODE(dirs[0].stat().st_mode) == 0o700
    assert list(dirs[0].glob("_cffi_backend.cpython-%d%d-*.so" % sys.version_info[:2]))
    marker = dirs[0] / MARKER
    before = marker.stat().st_mtime_ns, dirs[0].stat().st_ino
    out = pyz_run(["pki", "list", "--dir", str(pki_dir)], cache)
    assert out.returncode == 0, out.stderr
    assert (marker.stat().st_mtime_ns, dirs[0].stat().st_ino) == before, "unpacked again"
    assert unpacked(cache) == dirs


NOT_COVERED = r"""
import sys
sys.path.insert(0, sys.argv[1])
from vproxy.security import native as _native
from vproxy.errors import UserError

_native.target = lambda: ("riscv64", "3.12")
try:
    _native.ensure_cryptography()
except UserError as e:
    print(e.message)
else:
    print("no error")
"""


def test_target_not_covered_says_so_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-I", "-S", "-c", NOT_COVERED, str(session_pyz())],
                         env={"XDG_CACHE_HOME": str(tmp_path)}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ("vproxy pki has no bundled cryptography for Python 3.12 on riscv64: "
                          "install python3-cryptography, or run vproxy pki on another machine\n")
    assert not (tmp_path / "vproxy").exists()


# ---------------------------------------------------------------------------------------
# Debian 11, 12 and 13 roots with python3 only

# (release, the Python its python3 is, the pytest id)
RELEASES = [("bullseye", "3.9", "debian11-py3.9"),
            ("bookworm", "3.11", "debian12-py3.11"),
            ("trixie", "3.13", "debian13-py3.13")]


@pytest.fixture(scope="module", params=[r for r, _, _ in RELEASES],
                ids=[i for _, _, i in RELEASES])
def root(request) -> Path:
    return root_for_test(request.param)


@pytest.mark.debian_root
def test_pki_in_bare_root_then_bench(root):
    with root_tempdir(root) as d:
        pyz = d.put(session_pyz())
        env = dict(ROOT_ENV, XDG_CACHE_HOME=d.path("cache"))
        pki_dir = d.path("pki")
        t0 = time.monotonic()
        for i, argv in enumerate(steps(pki_dir)):
            t = time.monotonic()
            out = run_in_root(root, ["python3", pyz] + argv, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=180)
            assert out.returncode == 0, (argv, out.stdout, out.stderr)
            if i == 0:
                print("%s: first pki command (unpacks): %.2f s" % (root.name, time.monotonic() - t))
        print("%s: pki init + issue x2 + show: %.2f s" % (root.name, time.monotonic() - t0))
        assert "alice" in out.stdout, out.stdout
        dirs = unpacked(d.host / "cache")
        assert len(dirs) == 1, dirs
        before = (dirs[0] / MARKER).stat().st_mtime_ns
        out = run_in_root(root, ["python3", pyz, "pki", "list", "--dir", pki_dir], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert (dirs[0] / MARKER).stat().st_mtime_ns == before and unpacked(d.host / "cache") == dirs

        # the certificates made inside carry a bench: agent inside, client on the host
        port = free_port()
        (d.host / "agent.toml").write_text(
            'listen = "127.0.0.1:%d"\ncert = "%s/issued/agent.pem"\n'
            'key = "%s/issued/agent.key"\nca = "%s/ca.pem"\n' % (port, pki_dir, pki_dir, pki_dir))
        serve = ["python3", pyz, "serve", "--config", d.path("agent.toml")]
        host_pki = d.host / "pki"
        with agent(lambda argv, **kw: popen_in_root(root, argv, **kw), serve) as a:
            port = a.wait_ready()
            out = subprocess.run(
                [sys.executable, "-I", str(session_pyz()), "bench", "127.0.0.1:%d" % port,
                 "--cert", str(host_pki / "issued/alice.pem"),
                 "--key", str(host_pki / "issued/alice.key"),
                 "--ca", str(host_pki / "ca.pem"), "--seconds", "1", "--json"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                universal_newlines=True, timeout=BENCH_TIMEOUT, env=host_env())
            result = check_bench(out, a)
            print("%s: bench with certificates made inside: %s" % (root.name, result))


# ---------------------------------------------------------------------------------------
# aarch64: Debian 11, 12 and 13 arm64 roots run through qemu-user


@pytest.fixture(scope="module", params=RELEASES, ids=[i for _, _, i in RELEASES])
def arm64_root(request) -> Tuple[Path, str]:
    """(the root, the Python version its python3 is)."""
    release, python, _ = request.param
    return root_for_test(release, arch="arm64"), python


@pytest.mark.timeout(3000)  # each: building an emulated root takes 5 to 15 minutes
@pytest.mark.debian_root
def test_arm64_version_and_pki(arm64_root):
    """The same .pyz on that Debian's aarch64 Python (under qemu-user: slow, so just
    --version, then pki init, which unpacks the aarch64 set for that Python, and issue)."""
    root, python = arm64_root
    tag = python.replace(".", "")
    with root_tempdir(root) as d:
        pyz = d.put(session_pyz())
        env = dict(ROOT_ENV, XDG_CACHE_HOME=d.path("cache"))

        def run(argv: Sequence[str]) -> "subprocess.CompletedProcess[str]":
            t = time.monotonic()
            out = run_in_root(root, argv, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=600)
            print("%s: %s: %.1f s" % (root.name, " ".join(argv[2:4]), time.monotonic() - t))
            assert out.returncode == 0, (argv, out.stdout, out.stderr)
            return out

        arch = run_in_root(root, ["python3", "-c", "import platform; print(platform.machine())"],
                           env=env, stdout=subprocess.PIPE, universal_newlines=True, timeout=300)
        assert arch.stdout.strip() == "aarch64", arch.stdout
        out = run(["python3", pyz, "--version"])
        text = out.stdout + out.stderr
        assert "vproxy " in text and "Python %s." % python in text, text
        run(["python3", pyz, "pki", "init", "--dir", d.path("pki")])
        run(["python3", pyz, "pki", "issue", "client", "alice", "--dir", d.path("pki")])
        dirs = unpacked(d.host / "cache")
        assert len(dirs) == 1, dirs
        so = list(dirs[0].glob("_cffi_backend.cpython-%s-aarch64-*.so" % tag))
        assert so, sorted(p.name for p in dirs[0].iterdir())
        assert (d.host / "pki" / "issued" / "alice.pem").read_text().startswith("-----BEGIN")
