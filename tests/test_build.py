"""build.py: dist/vproxy.pyz is one reproducible, self-contained file.

What these tests prove:
- two builds of the same tree are byte-for-byte identical, even from another directory
  and with other file timestamps; SOURCE_DATE_EPOCH changes the bytes, not the content;
- the archive holds no .pyc/__pycache__, every entry has the fixed timestamp and fixed
  mode, every source file of the package is in it, and BUILD_HASH matches its content;
- the pyz runs with `python3 -I -S` and an empty environment (so no site-packages: the
  vendored click and qemu.qmp are the ones used) and prints its version;
- build.py refuses sources that Python 3.9 cannot parse.
(That it runs on Debian 11, 12 and 13, Python 3.9, 3.11, 3.13: test_debian_roots.py.)
"""

import hashlib
import importlib.util
import os
import re
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from support.pyztools import REPO, build_pyz, session_pyz, snapshot_tree, zip_build_hash

pytestmark = pytest.mark.slow  # builds the .pyz

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def version_of_tree(top: Path) -> str:
    m = re.search(r'^__version__ = "([^"]+)"', (top / "vproxy/__init__.py").read_text(), re.M)
    assert m
    return m.group(1)


def test_two_builds_are_identical(tmp_path):
    a = snapshot_tree(tmp_path / "a")
    b = snapshot_tree(tmp_path / "elsewhere" / "b")
    for path in b.rglob("*"):  # other mtimes must not leak into the archive
        os.utime(str(path), (1234567890, 1234567890))
    build_pyz(tmp_path / "a.pyz", top=a)
    build_pyz(tmp_path / "b.pyz", top=b)
    build_pyz(tmp_path / "a2.pyz", top=a)
    assert sha256(tmp_path / "a.pyz") == sha256(tmp_path / "b.pyz") == sha256(tmp_path / "a2.pyz")


def test_source_date_epoch_sets_timestamps_not_content(tmp_path):
    top = snapshot_tree(tmp_path / "src")
    build_pyz(tmp_path / "plain.pyz", top=top)
    env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000")  # 2023-11-14 22:13:20 UTC
    build_pyz(tmp_path / "sde.pyz", top=top, env=env)
    with zipfile.ZipFile(str(tmp_path / "sde.pyz")) as z:
        assert {i.date_time for i in z.infolist()} == {(2023, 11, 14, 22, 13, 20)}
    assert zip_build_hash(tmp_path / "plain.pyz") == zip_build_hash(tmp_path / "sde.pyz")
    assert sha256(tmp_path / "plain.pyz") != sha256(tmp_path / "sde.pyz")


def test_archive_layout():
    pyz = session_pyz()
    assert pyz.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert os.stat(str(pyz)).st_mode & 0o777 == 0o755
    with zipfile.ZipFile(str(pyz)) as z:
        infos = z.infolist()
        names = [i.filename for i in infos]
        assert z.testzip() is None
    assert names == sorted(names)
    assert len(names) == len(set(names))
    bad = [n for n in names if n.endswith((".pyc", ".pyo")) or "__pycache__" in n]
    assert not bad, bad
    assert {i.date_time for i in infos} == {ZIP_EPOCH}
    for info in infos:
        mode = info.external_attr >> 16
        if info.is_dir():
            assert mode == stat.S_IFDIR | 0o755, info.filename
        else:
            assert mode == stat.S_IFREG | 0o644, info.filename
            # wheels (vproxy pki's cryptography) are zips already: stored as they are
            expected = zipfile.ZIP_STORED if info.filename.endswith(".whl") else zipfile.ZIP_DEFLATED
            assert info.compress_type == expected, info.filename
    for required in ("__main__.py", "vproxy/__init__.py", "vproxy/_build.py",
                     "click/__init__.py", "click/core.py", "qemu/", "qemu/qmp/__init__.py",
                     "qemu/qmp/qmp_client.py"):
        assert required in names, required
    assert not any(n.startswith("qemu/") and n.count("/") == 1 and not n.endswith("/")
                   for n in names), "qemu/ must stay a namespace package"
    assert any(n.startswith("click-") and n.endswith("LICENSE.txt") for n in names)
    assert any(n.startswith("qemu_qmp-") and "/licenses/" in n and not n.endswith("/")
               for n in names)
    # No build tree, test or cache files beyond the package and the vendored code.
    roots = {n.split("/")[0] for n in names}
    assert roots <= {"__main__.py", "vproxy", "click", "qemu", "tomli", "click-8.1.8.dist-info",
                     "qemu_qmp-0.0.6.dist-info", "tomli-2.0.1.dist-info", "_native"}, roots


def test_every_package_file_is_in_the_archive(tmp_path):
    top = snapshot_tree(tmp_path / "src")
    build_pyz(tmp_path / "v.pyz", top=top)
    with zipfile.ZipFile(str(tmp_path / "v.pyz")) as z:
        names = set(z.namelist())
        for path in sorted((top / "vproxy").rglob("*")):
            rel = path.relative_to(top).as_posix()
            if path.is_dir() or "__pycache__" in rel or rel.endswith(".pyc"):
                continue
            assert rel in names, rel
            assert z.read(rel) == path.read_bytes(), rel
        build_module = z.read("vproxy/_build.py").decode()
    assert 'VERSION = "%s"' % version_of_tree(top) in build_module
    assert '"click": "8.1.8"' in build_module


def test_build_hash_is_the_content_hash():
    spec = importlib.util.spec_from_file_location("vproxy_build_py", str(REPO / "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    pyz = session_pyz()
    with zipfile.ZipFile(str(pyz)) as z:
        files = {i.filename: z.read(i) for i in z.infolist()
                 if not i.is_dir() and i.filename != "vproxy/_build.py"}
    assert build.content_hash(files) == zip_build_hash(pyz)


def test_vendored_packages_come_from_the_archive():
    pyz = session_pyz()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import click, qemu.qmp; "
            "print(click.__file__); print(qemu.qmp.__file__); print(click.__version__)")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(pyz)], env={},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, timeout=60)
    assert out.returncode == 0, out.stderr
    click_file, qmp_file, click_version = out.stdout.split()
    assert click_file.startswith(str(pyz) + os.sep)
    assert qmp_file.startswith(str(pyz) + os.sep)
    assert click_version == "8.1.8"


def test_pyz_version_without_site_packages():
    """`python3 -I -S vproxy.pyz --version` with an empty environment: no site-packages,
    no PYTHONPATH, so everything it imports comes from the archive."""
    pyz = session_pyz()
    out = subprocess.run([sys.executable, "-I", "-S", str(pyz), "--version"], env={},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout + out.stderr
    assert "vproxy %s" % version_of_tree(REPO) in text, text
    if "build" in text:  # "vproxy 0.1.0 (build abc123...)": the hash of this archive
        m = re.search(r"build ([0-9a-f]{6,64})", text)
        assert m and zip_build_hash(pyz).startswith(m.group(1)), text


def test_pyz_reports_user_errors_in_one_line():
    """Inside the .pyz too, a user error is one line and exit 2, never a traceback."""
    out = subprocess.run([sys.executable, "-I", "-S", str(session_pyz()), "bench", "localhost:1",
                          "--cert", "/nonexistent.pem", "--key", "/nonexistent.key",
                          "--ca", "/nonexistent-ca.pem"], env={}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("vproxy: error: ") and "Traceback" not in out.stderr, out.stderr


def test_refuses_syntax_python39_cannot_parse(tmp_path):
    top = snapshot_tree(tmp_path / "src")
    (top / "vproxy" / "_new_syntax.py").write_text(
        "def f(x):\n    match x:\n        case 1:\n            return 2\n")
    with pytest.raises(AssertionError, match=r"not Python 3\.9 syntax"):
        build_pyz(tmp_path / "v.pyz", top=top)
    assert not (tmp_path / "v.pyz").exists()


def test_wheels_dir_is_the_only_source_offline(tmp_path):
    """--wheels DIR builds from DIR alone (air-gapped sites): a wheel missing there is a
    one-line error naming it and the command that fetches it, and nothing is downloaded."""
    empty = tmp_path / "wheels"
    empty.mkdir()
    out = subprocess.run([sys.executable, str(REPO / "build.py"), "--wheels", str(empty),
                          "-o", str(tmp_path / "v.pyz")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert out.stderr.startswith("build.py: missing wheel %s/" % empty), out.stderr
    assert "--download-wheels %s" % empty in out.stderr and "Traceback" not in out.stderr
    assert list(empty.iterdir()) == [] and not (tmp_path / "v.pyz").exists()
