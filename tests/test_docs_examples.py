"""docs/API.md's examples, run as they stand against a real agent and real VMs.

Every ```python block runs as a script in its own process, in a directory holding the
client certificate the examples name (alice.pem, alice.key, ca.pem), with the agent's
real address put in place of "vmhost1:7443". A python block whose first line is
"# test_NAME.py" is a pytest file instead: it is written there, and the ```sh block
that runs `pytest` runs it (through the installed pytest plugin). The agent serves
"web1" (the boot-sector guest) and "lin" (the Linux test guest), like the page says.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.agenttools import ENV, AgentProcess
from support.vmtools import boot_sector_vm, linux_vm

DOC = Path(__file__).resolve().parent.parent / "docs" / "API.md"
PLACEHOLDER = "vmhost1:7443"


def blocks(text):
    """(info string, code) of every fenced block, in order."""
    return [(m.group(1).strip(), m.group(2))
            for m in re.finditer(r"^```([^\n]*)\n(.*?)^```\s*$", text, re.M | re.S)]


def plugin_args():
    """-p vproxy.api.pytest_plugin unless the installed package already registers it."""
    try:
        from importlib.metadata import entry_points

        eps = entry_points()
        group = eps.select(group="pytest11") if hasattr(eps, "select") else eps.get("pytest11", [])
        if any(ep.value == "vproxy.api.pytest_plugin" for ep in group):
            return []
    except Exception:  # noqa: BLE001
        pass
    return ["-p", "vproxy.api.pytest_plugin"]


@pytest.fixture(scope="module")
def lab(pki, tmp_path_factory):
    base = tmp_path_factory.mktemp("docs")
    lin = linux_vm(base / "lin", name="lin")
    web1 = boot_sector_vm(base / "web1", name="web1")
    work = base / "work"
    work.mkdir()
    shutil.copy(pki.alice.cert, work / "alice.pem")
    shutil.copy(pki.alice.key, work / "alice.key")
    shutil.copy(pki.ca, work / "ca.pem")
    agent = None
    try:
        lin.start()
        web1.start()
        agent = AgentProcess(pki, base, [("lin", lin.qmp_path), ("web1", web1.qmp_path)],
                             [{"identities": ["alice"], "vms": ["*"], "modes": ["force", "hotplug"]}])
        yield agent, work
    finally:
        if agent is not None:
            agent.stop()
        lin.terminate()
        web1.terminate()


def test_the_page_has_examples_of_everything():
    text = DOC.read_text()
    code = "\n".join(c for info, c in blocks(text) if info == "python")
    for needle in ("vproxy.api.connect(", "connect_async(", ".console(", ".login(", ".run(",
                   ".expect(", "ExpectTimeout", ".channel(", ".screenshot(", ".listen(", ".vnc(",
                   "def test_", "vproxy_console"):
        assert needle in code, "docs/API.md has no example using %s" % needle


@pytest.mark.qemu
@pytest.mark.slow
def test_every_example_in_docs_api_md_runs(lab):
    agent, work = lab
    ran = []
    for info, code in blocks(DOC.read_text()):
        code = code.replace(PLACEHOLDER, agent.address)
        first = code.splitlines()[0] if code.strip() else ""
        if info == "python" and re.match(r"# (test_\w+\.py)$", first):
            (work / first[2:]).write_text(code)
            continue
        if info == "python":
            out = subprocess.run([sys.executable, "-c", code], cwd=str(work), env=ENV,
                                 capture_output=True, text=True, timeout=240)
            assert out.returncode == 0, "example failed:\n%s\n--- stdout:\n%s\n--- stderr:\n%s" % (
                code, out.stdout, out.stderr)
            ran.append((code, out.stdout))
        elif info == "sh" and code.startswith("pytest "):
            args = shlex.split(code)[1:]
            env = {k: v for k, v in ENV.items() if not k.startswith("VPROXY_")}
            out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
                                 + plugin_args() + args, cwd=str(work), env=env,
                                 capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, "the documented pytest run failed:\n%s\n%s" % (
                out.stdout, out.stderr)
            assert re.search(r"\b2 passed\b", out.stdout), out.stdout
            ran.append((code, out.stdout))
    assert len(ran) >= 7, "only %d examples ran" % len(ran)
    outputs = "\n".join(stdout for _, stdout in ran)
    # what the examples print is what the page says they print
    assert "web1 running ['serial0']" in outputs
    assert "console serial0 of VM web1: waited 0.5 s for b'never printed'; the last output seen:" in outputs
    assert "  | HELLO\\r" in outputs
    assert "720 400" in outputs
    assert re.search(r"^42$", outputs, re.M)
    assert os.path.exists(work / "screen.png")
