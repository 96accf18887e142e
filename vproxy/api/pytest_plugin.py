"""pytest plugin: a managed vproxy console for a test (entry point "vproxy", group pytest11).

    def test_kernel_is_linux(vproxy_console):
        vproxy_console.login("root", prompt="root@web1:~# ")
        assert vproxy_console.run("uname -s") == "Linux"

    $ pytest --vproxy-host vmhost1:7443 --vproxy-vm web1 --vproxy-identity ci

Installed with vproxy, so pytest loads it by itself (``-p no:vproxy`` turns it off).
Options, each with an environment variable as its default:

    --vproxy-host HOST[:PORT]   VPROXY_HOST          the agent
    --vproxy-vm NAME            VPROXY_VM            the VM of vproxy_console
    --vproxy-console ID         VPROXY_CONSOLE       its console (default: the first)
    --vproxy-mode rw|force|ro   VPROXY_CONSOLE_MODE  (default rw)
    --vproxy-identity NAME      VPROXY_IDENTITY      a certificate from `vproxy pki`
    --vproxy-cert FILE          VPROXY_CERT          or a certificate,
    --vproxy-key FILE           VPROXY_KEY           its key,
    --vproxy-ca FILE            VPROXY_CA            and the CA
    --vproxy-log-dir DIR        VPROXY_LOG_DIR       where failed tests' console output goes
                                                     (default: vproxy-logs in pytest's basetemp)

Fixtures:

    vproxy_client           (session) a connected vproxy.api.Client;
    vproxy_console          a vproxy.api.Console on --vproxy-vm, closed after the test;
    vproxy_console_factory  open(vm=None, console=None, **kw) for more consoles, managed
                            the same way (kw as vproxy.api.Client.console).

A test using them is skipped, with the reason, when no agent (or VM) is configured.
When it fails, each of its consoles' output is written to LOG_DIR/<test>.<console>.log
and the last lines are shown in the failure report.

The module imports without pytest (it ships in vproxy.pyz, where pytest is absent):
then it defines nothing.
"""

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

try:
    import pytest
except ImportError:  # vproxy.pyz on a bare host: nothing to plug into
    pytest = None

#: option name -> (environment variable, metavar, help)
OPTIONS = {
    "host": ("VPROXY_HOST", "HOST[:PORT]", "agent address for the vproxy fixtures"),
    "vm": ("VPROXY_VM", "NAME", "VM whose console vproxy_console opens"),
    "console": ("VPROXY_CONSOLE", "ID", "console id (default: the VM's first console)"),
    "mode": ("VPROXY_CONSOLE_MODE", "MODE", "console mode: rw (default), force or ro"),
    "identity": ("VPROXY_IDENTITY", "NAME", "client certificate NAME made by `vproxy pki`"),
    "cert": ("VPROXY_CERT", "FILE", "client certificate (PEM)"),
    "key": ("VPROXY_KEY", "FILE", "its private key (PEM)"),
    "ca": ("VPROXY_CA", "FILE", "CA certificate that signed the agent's certificate"),
    "log-dir": ("VPROXY_LOG_DIR", "DIR", "directory for the console output of failed tests"),
}
TAIL_LINES = 40


def setting(config: Any, name: str) -> Optional[str]:
    """--vproxy-NAME, else its environment variable, else None."""
    value = config.getoption("vproxy_" + name.replace("-", "_"))
    if value:
        return value
    return os.environ.get(OPTIONS[name][0]) or None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:120] or "test"


class _Managed:
    """The consoles one test opened, for teardown and the failure report."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.consoles: List[Any] = []

    def save(self, nodeid: str) -> List[Dict[str, str]]:
        from .expect import describe_output  # lazy: pytest loads this plugin in every run

        out = []
        for console in self.consoles:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            path = self.log_dir / ("%s.%s.log" % (_safe(nodeid), _safe(console.name)))
            data = console.transcript
            path.write_bytes(data)
            tail = b"\n".join(data.split(b"\n")[-TAIL_LINES:])
            out.append({"title": "vproxy %s" % console.name,
                        "text": "%d bytes received, saved to %s; the last lines:\n%s\n"
                                % (len(data), path, describe_output(tail, limit=len(tail) or 1))})
        return out

    def close(self) -> None:
        for console in self.consoles:
            try:
                console.close()
            except Exception:  # noqa: BLE001 - teardown must close the others
                pass


if pytest is not None:

    def pytest_addoption(parser: Any) -> None:
        group = parser.getgroup("vproxy", "vproxy: consoles of remote QEMU VMs")
        for name, (env, metavar, text) in OPTIONS.items():
            group.addoption("--vproxy-" + name, dest="vproxy_" + name.replace("-", "_"),
                            default=None, metavar=metavar, help="%s [env: %s]" % (text, env))

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item: Any, call: Any) -> Any:
        outcome = yield
        report = outcome.get_result()
        managed = getattr(item, "_vproxy_managed", None)
        if managed is None or report.when not in ("setup", "call") or not report.failed:
            return
        for section in managed.save(item.nodeid):
            report.sections.append((section["title"], section["text"]))

    @pytest.fixture(scope="session")
    def vproxy_client(pytestconfig: Any) -> Any:
        """A vproxy.api.Client connected to --vproxy-host for the whole session."""
        from vproxy import api  # lazy: pytest loads this plugin in every run

        host = setting(pytestconfig, "host")
        if not host:
            pytest.skip("no vproxy agent configured: give --vproxy-host HOST[:PORT] or set VPROXY_HOST")
        client = api.connect(host, identity=setting(pytestconfig, "identity"),
                             cert=setting(pytestconfig, "cert"), key=setting(pytestconfig, "key"),
                             ca=setting(pytestconfig, "ca"))
        yield client
        client.close()

    @pytest.fixture
    def vproxy_console_factory(request: Any, pytestconfig: Any, tmp_path_factory: Any) -> Any:
        """open(vm=None, console=None, **kw) -> vproxy.api.Console, closed after the test."""
        log_dir = setting(pytestconfig, "log-dir")
        managed = _Managed(Path(log_dir) if log_dir else tmp_path_factory.getbasetemp() / "vproxy-logs")
        request.node._vproxy_managed = managed

        def open_console(vm: Optional[str] = None, console: Optional[str] = None, **kw: Any) -> Any:
            vm = vm or setting(pytestconfig, "vm")
            if not vm:
                pytest.skip("no VM configured for vproxy_console: give --vproxy-vm NAME or set VPROXY_VM")
            client = request.getfixturevalue("vproxy_client")
            kw.setdefault("mode", setting(pytestconfig, "mode") or "rw")
            con = client.console(vm, console or setting(pytestconfig, "console"), **kw)
            managed.consoles.append(con)
            return con

        yield open_console
        managed.close()

    @pytest.fixture
    def vproxy_console(vproxy_console_factory: Any) -> Any:
        """A vproxy.api.Console on --vproxy-vm (and --vproxy-console), closed after the
        test; its output is saved and shown when the test fails."""
        return vproxy_console_factory()
