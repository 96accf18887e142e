"""Test-side helpers to build dist/vproxy.pyz the way a person does (`python3 build.py`).

- `wheel_dir()`: the pinned wheels, downloaded once into ``$VPROXY_TEST_CACHE/wheels``
  (default cache: ``~/.cache/vproxy-tests``); later runs are offline.
- `build_pyz(output, top=REPO)`: runs build.py from the tree at `top` with those wheels.
- `session_pyz()`: one .pyz of this checkout, built once per test process into a
  temporary directory (removed at exit), so tests never touch dist/.
- `zip_build_hash(pyz)`: the BUILD_HASH written into an archive.
"""

import atexit
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
BUILD_PY = REPO / "build.py"

__all__ = ["REPO", "BUILD_PY", "wheel_dir", "build_pyz", "session_pyz", "zip_build_hash",
           "snapshot_tree"]


def _cache_dir() -> Path:
    env = os.environ.get("VPROXY_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vproxy-tests"


@functools.lru_cache(maxsize=None)
def wheel_dir() -> Path:
    """The directory of pinned wheels (downloaded on first use, verified each time)."""
    d = _cache_dir() / "wheels"
    subprocess.run([sys.executable, str(BUILD_PY), "--download-wheels", str(d), "-q"],
                   check=True, stdout=subprocess.DEVNULL, timeout=300)
    return d


def build_pyz(output: Path, top: Path = REPO, env: Optional[Dict[str, str]] = None,
              python: str = sys.executable) -> "subprocess.CompletedProcess[str]":
    """Run `top`/build.py offline with the cached wheels; raises if it fails."""
    proc = subprocess.run([python, str(top / "build.py"), "--wheels", str(wheel_dir()),
                           "-o", str(output), "-q"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=env, timeout=300)
    if proc.returncode != 0:
        raise AssertionError("build.py failed (exit %d):\n%s%s"
                             % (proc.returncode, proc.stdout, proc.stderr))
    return proc


_session_dir: Optional[str] = None


@functools.lru_cache(maxsize=None)
def session_pyz() -> Path:
    """This checkout's vproxy.pyz, built once per process."""
    global _session_dir
    _session_dir = tempfile.mkdtemp(prefix="vproxy-pyz-")
    atexit.register(shutil.rmtree, _session_dir, True)
    out = Path(_session_dir) / "vproxy.pyz"
    build_pyz(out)
    return out


def zip_build_hash(pyz: Path) -> str:
    with zipfile.ZipFile(str(pyz)) as z:
        text = z.read("vproxy/_build.py").decode()
    m = re.search(r'^BUILD_HASH = "([0-9a-f]{64})"', text, re.MULTILINE)
    assert m, text
    return m.group(1)


def snapshot_tree(dest: Path, extra: Sequence[str] = ()) -> Path:
    """Copy what build.py reads (build.py, pyproject.toml, vproxy/) to `dest`: a tree
    that does not change under a test while people edit the checkout."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("build.py", "pyproject.toml") + tuple(extra):
        shutil.copy2(str(REPO / name), str(dest / name))
    shutil.copytree(str(REPO / "vproxy"), str(dest / "vproxy"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest
