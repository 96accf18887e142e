"""--vm-dir scanning: a directory whose entries did not change is not scanned again.

An idle agent serving 1,000 VMs from a directory would otherwise stat 1,000 sockets a
second, its only work while idle. No QEMU here: stale sockets (nobody listening) are
VMs that are found, never connect, and are dropped when their socket goes.
"""

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from support.aio import run
from vproxy.agent.qemu import vms
from vproxy.agent.qemu.vms import VMRegistry


def stale_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


@pytest.fixture
def qdir():
    d = Path(tempfile.mkdtemp(prefix="vmd"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def age(directory: Path, seconds: float = 10.0) -> None:
    """Make the directory's mtime old enough to be trusted (see VMRegistry.rescan)."""
    then = time.time() - seconds
    os.utime(directory, (then, then))


def test_an_unchanged_directory_is_not_scanned_again(qdir, monkeypatch):
    stale_socket(qdir / "a.qmp")
    age(qdir)
    calls = []
    real_scan = vms._scan

    def counting_scan(directory):
        calls.append(directory)
        return real_scan(directory)

    monkeypatch.setattr(vms, "_scan", counting_scan)

    async def main():
        registry = VMRegistry([], str(qdir), scan_interval=3600)
        await registry.start()
        try:
            assert registry.names() == ["a"] and len(calls) == 1
            await registry.rescan()
            await registry.rescan()
            assert len(calls) == 1, "nothing changed: no scan"
            stale_socket(qdir / "b.qmp")  # the mtime moves, and is too recent to trust
            await registry.rescan()
            assert registry.names() == ["a", "b"] and len(calls) == 2
            await registry.rescan()
            assert len(calls) == 3, "a change less than 2 s old is scanned again"
            age(qdir, 5)
            await registry.rescan()
            await registry.rescan()
            assert len(calls) == 4
            (qdir / "a.qmp").unlink()  # a socket goes: its VM (never connected) is dropped
            age(qdir, 4)
            await registry.rescan()
            assert registry.names() == ["b"] and len(calls) == 5
            await registry.rescan()
            assert len(calls) == 5
            # The VM list changed beside the scan (a reload): the directory is looked at again.
            await registry.reconfigure([("b", str(qdir / "b.qmp"))])  # b is configured now
            assert registry.get("b").source == "config"
            await registry.reconfigure([])  # and gone: the directory's b must come back
            assert registry.names() == []
            await registry.rescan()
            assert registry.names() == ["b"] and registry.get("b").source == "dir"
            assert len(calls) == 6
        finally:
            await registry.stop()

    run(main())
