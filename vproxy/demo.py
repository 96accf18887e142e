"""`vproxy demo`: the whole product on this machine in a few seconds, then gone.

What `run()` does, printing each step:

1. checks for QEMU (qemu-system-x86_64) and the Python package cryptography (for the
   throwaway certificates); when one is missing, one line says what to install;
2. makes a temporary directory and in it a throwaway CA (vproxy.security.pki) with a server
   certificate for the agent (localhost, 127.0.0.1) and a client certificate ("demo");
3. writes the boot-sector guest's disk (vproxy.guests.bootsector: upper-cases what it
   receives on COM1 and shows it on screen) and starts QEMU on it: TCG, 32 MiB, VGA
   with ``-vnc none``, COM1 on a null chardev the agent takes over, a QMP socket. QEMU
   gets PR_SET_PDEATHSIG, so it dies with this process even on SIGKILL;
4. starts an agent in this process on 127.0.0.1 (a free port): mutual TLS, that VM, an
   ACL granting "demo" everything, audit lines collected;
5. connects to it as "demo" with vproxy.api, over TLS like any remote client; attaches
   to the console, types a line and shows the guest's upper-cased echo; then a second,
   read-only viewer attaches with replay and gets that line from the agent's history;
6. takes a screenshot of the VM's display through the tunnel (RFB, vproxy.api) and
   writes it as PNG (kept: the one thing the demo leaves behind);
7. shows the VM as `vproxy ls` sees it, and the audit lines;
8. with keep_running, waits for Ctrl-C and says how to reach the VM with the CLI;
9. stops the agent, kills QEMU and removes the directory: after success, an error,
   Ctrl-C, SIGTERM or SIGHUP alike.

The boot-sector guest prints its banner about 0.15 s after QEMU starts, before the
agent has taken the console over, so the banner itself is not shown (QEMU's ``-S``
and a ``cont`` after the takeover would keep it; the demo does not need it).
"""

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from vproxy import api
from vproxy.agent.acl import Acl, Rule
from vproxy.agent.server import Agent, AgentConfig
from vproxy.api.expect import printable
from vproxy.errors import UserError, VproxyError
from vproxy.guests.bootsector import BANNER, build_boot_disk
from vproxy.security import pki

QEMU = "qemu-system-x86_64"
VM_NAME = "demo"
CLIENT_NAME = "demo"
TYPED = "hello from vproxy"
STEP_TIMEOUT = 30.0  # seconds for any one network step
_UNIX_PATH_MAX = 107


class Interrupted(BaseException):
    """A signal ended the demo (raised from the signal handler)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def check_prerequisites(qemu: str) -> str:
    """The QEMU binary's path; UserError (one line) if QEMU or cryptography is missing."""
    path = shutil.which(qemu)
    if path is None:
        raise UserError("vproxy demo needs QEMU, and %s was not found: install the package "
                        "qemu-system-x86 (e.g. sudo apt-get install qemu-system-x86)" % qemu)
    try:
        import cryptography  # noqa: F401  (optional: only to say it is missing)
    except ImportError:
        raise UserError("vproxy demo needs the Python package cryptography for its throwaway "
                        "certificates: install python3-cryptography (apt) or run "
                        "pip install cryptography") from None
    return path


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes  # optional: not on every platform

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux, or no libc: cleanup still kills it
        pass


class DemoVM:
    """QEMU running the boot-sector guest, with a QMP socket in *workdir*."""

    def __init__(self, qemu: str, workdir: Path):

        self.workdir = workdir
        disk = build_boot_disk(workdir / "bootsector.img")
        self.qmp_path = workdir / "demo.qmp"
        if len(os.fsencode(str(self.qmp_path))) > _UNIX_PATH_MAX:
            self._sock_dir: Optional[str] = tempfile.mkdtemp(prefix="vpd")
            self.qmp_path = Path(self._sock_dir) / "demo.qmp"
        else:
            self._sock_dir = None
        self.log_path = workdir / "qemu.log"
        self.command = [
            qemu, "-name", VM_NAME, "-nodefaults", "-no-user-config", "-display", "none",
            "-accel", "tcg", "-machine", "pc", "-m", "32",
            "-drive", "file=%s,format=raw,if=ide" % disk,
            "-chardev", "null,id=serial0", "-serial", "chardev:serial0",
            "-vga", "std", "-vnc", "none",
            "-qmp", "unix:%s,server=on,wait=off" % self.qmp_path,
            "-S",  # paused until the agent holds the console (resume_prelaunch): no byte lost
        ]
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 20.0) -> "subprocess.Popen[bytes]":
        with open(self.log_path, "wb") as log:
            self.proc = proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True,
                                                preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while not self.qmp_path.exists():
            if proc.poll() is not None:
                raise UserError("QEMU exited with status %s at start: %s" % (
                    proc.returncode, self.log_text().strip().replace("\n", " | ")))
            if time.monotonic() > deadline:
                raise UserError("QEMU's QMP socket did not appear within %.0f s" % timeout)
            time.sleep(0.01)
        return proc

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if self._sock_dir:
            shutil.rmtree(self._sock_dir, ignore_errors=True)


class _AuditCollector:
    """A logging handler keeping the agent's audit lines."""

    def __init__(self) -> None:
        class Handler(logging.Handler):
            def emit(inner, record: "logging.LogRecord") -> None:  # noqa: N805
                self.lines.append(record.getMessage())

        self.lines: List[str] = []
        self.handler = Handler()
        self.logger = logging.getLogger("vproxy.audit")
        self._saved = (self.logger.level, self.logger.propagate)

    def __enter__(self) -> "_AuditCollector":
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        return self

    def __exit__(self, *exc: Any) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.level, self.logger.propagate = self._saved


def _screenshot_path(wanted: Optional[str]) -> Path:
    if wanted:
        return Path(wanted).expanduser()
    path = Path.cwd() / "vproxy-demo.png"
    if os.access(str(Path.cwd()), os.W_OK):
        return path
    fd, name = tempfile.mkstemp(prefix="vproxy-demo-", suffix=".png")
    os.close(fd)
    return Path(name)


def _console_line(data: bytes) -> str:
    return printable(data.rstrip(b"\r\n"))


class Demo:
    def __init__(self, out: Callable[[str], None], qemu: str, screenshot: Optional[str],
                 keep_running: bool, cli_commands: Sequence[str]):
        self.out = out
        self.qemu = qemu
        self.screenshot = screenshot
        self.keep_running = keep_running
        self.cli_commands = set(cli_commands)
        self.workdir: Optional[Path] = None
        self.vm: Optional[DemoVM] = None
        self.files: Dict[str, str] = {}
        self.waiting = False  # in the keep_running wait: an interrupt is the normal end
        self.agent_started = False

    def step(self, name: str, text: str) -> None:
        self.out("  %-8s %s" % (name, text))

    def run(self) -> int:
        qemu = check_prerequisites(self.qemu)
        started = time.monotonic()
        self.workdir = Path(tempfile.mkdtemp(prefix="vproxy-demo-"))
        self.out("vproxy demo: a CA, an agent and a VM on this machine, in %s" % self.workdir)
        try:
            self._pki()
            self.vm = DemoVM(qemu, self.workdir)
            t = time.monotonic()
            proc = self.vm.start()
            self.step("vm", "%s pid %d (TCG, 32 MiB): the 512-byte boot-sector guest, "
                      "console on serial0, VGA display  %.2f s"
                      % (os.path.basename(qemu), proc.pid, time.monotonic() - t))
            with _AuditCollector() as audit:
                asyncio.run(self._session(audit))
            return 0
        except UserError:
            raise
        except VproxyError as e:
            raise UserError("the demo failed: %s" % e) from None
        except asyncio.TimeoutError:
            raise UserError("the demo failed: a step took longer than %.0f s" % STEP_TIMEOUT) from None
        except Interrupted as e:
            if self.waiting:
                return 0
            self.out("vproxy demo: interrupted (%s)" % signal.Signals(e.signum).name)
            return 128 + e.signum
        finally:
            self._cleanup(started)

    def _cleanup(self, started: float) -> None:
        saved = {}
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            saved[sig] = signal.signal(sig, signal.SIG_IGN)  # let the cleanup finish
        try:
            done = []
            if self.vm is not None:
                self.vm.kill()
                done.append("VM killed")
            if self.workdir is not None:
                shutil.rmtree(str(self.workdir), ignore_errors=True)
                done.append("%s removed" % self.workdir)
            if self.agent_started:
                done.insert(0, "agent stopped")
            self.out("done in %.1f s; cleaned up: %s" % (time.monotonic() - started,
                                                        ", ".join(done) or "nothing to do"))
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    def _pki(self) -> None:
        t = time.monotonic()
        d = self.workdir / "pki"  # type: ignore[operator]
        pki.init_ca(d, common_name="vproxy demo CA", days=1)
        server = pki.issue(d, "localhost", "server", dns_names=["localhost"],
                           ip_addresses=["127.0.0.1"], days=1)
        client = pki.issue(d, CLIENT_NAME, "client", days=1)
        self.files = {"ca": str(d / pki.CA_CERT), "crl": str(d / pki.CRL),
                      "server_cert": str(server[0]), "server_key": str(server[1]),
                      "cert": str(client[0]), "key": str(client[1])}
        self.step("pki", "a throwaway CA; certificates for the agent (localhost) and for "
                  "you (%s)  %.2f s" % (CLIENT_NAME, time.monotonic() - t))

    async def _session(self, audit: _AuditCollector) -> None:
        f = self.files
        config = AgentConfig(listen_host="127.0.0.1", listen_port=0, cert=f["server_cert"],
                             key=f["server_key"], ca=f["ca"], crl=f["crl"],
                             vms=[(VM_NAME, str(self.vm.qmp_path))],  # type: ignore[union-attr]
                             resume_prelaunch=True)
        agent = Agent(config, acl=Acl([Rule((CLIENT_NAME,), ("*",), ("*",), ("force", "hotplug"))]))
        await agent.start()
        self.agent_started = True
        try:
            address = agent.addresses[0]
            self.step("agent", "vproxy serve on %s: mutual TLS, VM %r over QMP, ACL: %s may "
                      "do everything" % (address, VM_NAME, CLIENT_NAME))
            client = await asyncio.wait_for(api.connect_async(
                address, cert=f["cert"], key=f["key"], ca=f["ca"], server_name="localhost"),
                STEP_TIMEOUT)
            try:
                await self._show(client, address)
                await client.close()
                await asyncio.sleep(0.05)  # the agent writes the audit lines as streams end
                for line in audit.lines:
                    self.step("audit", line)
                if self.keep_running:
                    await self._wait(address)
            finally:
                await client.close()
        finally:
            await agent.shutdown(drain_timeout=2.0)

    async def _show(self, client: Any, address: str) -> None:
        session = client.raw.session
        ssl_object = session.transport.get_extra_info("ssl_object")
        rtt = await client.ping()
        self.step("connect", "%s as %r to agent %r, ping %.2f ms" % (
            ssl_object.version() if ssl_object else "TLS", CLIENT_NAME,
            str(session.peer_identity), rtt * 1000))

        # replay="all": the guest's banner (kept from its first byte: -S and
        # resume_prelaunch) says it is listening. Typed before that, the first byte was
        # lost when a slow TCG boot on a busy machine set up its UART (which clears the
        # receive FIFO) after the byte had arrived.
        console = await client.console(VM_NAME, replay="all", timeout=STEP_TIMEOUT)
        try:
            self.step("console", "attached to %s as its writer (mode %s)" % (console.name, console.mode))
            await console.expect(BANNER)
            await console.sendline(TYPED)
            self.step("", "you typed:   %s" % TYPED)
            await console.expect(TYPED.upper().encode() + b"\r\n")
            self.step("", "guest echo:  %s" % _console_line(console.after))

            later = await client.console(VM_NAME, mode="ro", replay="all", timeout=STEP_TIMEOUT)
            async with later:
                await later.expect(TYPED.upper().encode())
                self.step("replay", "a second, read-only viewer attached afterwards and got %r "
                          "from the agent's history" % TYPED.upper())
        finally:
            await console.close()

        path = _screenshot_path(self.screenshot)
        t = time.monotonic()
        shot = await client.screenshot(VM_NAME, path, timeout=STEP_TIMEOUT)
        self.step("vnc", "screenshot %dx%d through the tunnel (RFB, %d colours) saved to %s  %.2f s"
                  % (shot.width, shot.height, shot.colours(), path, time.monotonic() - t))

        for vm in await client.list_vms():
            consoles = ", ".join("%s %s" % (c["id"], c["status"]) for c in vm.get("consoles", []))
            vnc = "vnc available" if vm.get("vnc", {}).get("available") else "no vnc"
            self.step("ls", "%s  %s  console %s  %s" % (vm["vm"], vm["state"], consoles or "-", vnc))

    async def _wait(self, address: str) -> None:
        f = self.files
        options = "--cert %s --key %s --ca %s" % (f["cert"], f["key"], f["ca"])
        self.step("running", "until you press Ctrl-C; meanwhile, from another terminal:")
        self.out("             vproxy ls %s %s" % (address, options))
        if "console" in self.cli_commands:
            self.out("             vproxy console %s %s %s" % (address, VM_NAME, options))
        if "vnc" in self.cli_commands:
            self.out("             vproxy vnc %s %s %s" % (address, VM_NAME, options))
        self.waiting = True
        await asyncio.Event().wait()


def run(*, qemu: str = QEMU, screenshot: Optional[str] = None, keep_running: bool = False,
        cli_commands: Sequence[str] = (), out: Optional[Callable[[str], None]] = None) -> int:
    """Run the demo; returns the exit status (0, or 128 + the signal that ended it).
    Raises UserError when a prerequisite is missing or a step fails."""
    if out is None:
        def out(text: str) -> None:
            print(text, flush=True)

    demo = Demo(out, qemu, screenshot, keep_running, cli_commands)

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    saved = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        saved[sig] = signal.signal(sig, interrupt)
    try:
        return demo.run()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
