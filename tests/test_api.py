"""The Python API (vproxy.api, vproxy.expect, the pytest plugin) against a real agent.

The agent runs as its own process (tests/support/agenttools.py) over mutual TLS and serves two
real VMs: "lin", the Linux test guest (TCG; fake login, prompt "root@vproxy-guest:~# ",
an echo loop on its virtio-serial port org.vproxy.echo0) and "web1", the boot-sector
guest (echoes upper-cased). What the tests prove:

- a CI-style test written only with the sync API logs into the Linux guest on its
  serial console and runs a command; the async API does the same;
- expect: literal and regex patterns, lists, before/after; a timeout names the pattern
  and shows the last output; read-only consoles refuse input with a clear error and
  hand over the writer role;
- guest channels (static and hotplugged), a VNC screenshot through the tunnel (our own
  RFB client), a local VNC listener that a real VNC client (vncdotool) uses;
- refusals, connection errors and the VPROXY_* environment defaults;
- the sync API works inside a running event loop and leaves no thread behind;
- the pytest plugin: options and environment, a managed console, output saved and
  shown when a test fails, a clear skip when nothing is configured.

Plus the I/O-free expect core (vproxy.expect.Expecter) on its own.
"""

import asyncio
import os
import re
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from support.agenttools import ENV, AgentProcess
from support.guests.linux_guest import SHELL_PROMPT
from support.vmtools import boot_sector_vm, linux_vm

import vproxy.api
from vproxy.errors import ChannelRefused, UserError, VproxyError
from vproxy.api.expect import AsyncExpect, Expecter, ExpectEOF, ExpectTimeout, LoginFailed, compile_pattern, printable
from vproxy.mux import RefuseCode

BOOT_TIMEOUT = 180  # a loaded 2-core machine boots the Linux guest in 6-20 s under TCG


class Lab:
    def __init__(self, agent, pki):
        self.agent = agent
        self.address = agent.address
        self.pki = pki
        self.tls = dict(cert=pki.alice.cert, key=pki.alice.key, ca=pki.ca)

    def connect(self, **kw):
        return vproxy.api.connect(self.address, **dict(self.tls, **kw))


@pytest.fixture(scope="module")
def lab(pki, tmp_path_factory):
    base = tmp_path_factory.mktemp("api")
    lin = linux_vm(base / "lin", name="lin")
    web1 = boot_sector_vm(base / "web1", name="web1")
    agent = None
    try:
        lin.start()
        web1.start()
        agent = AgentProcess(pki, base, [("lin", lin.qmp_path), ("web1", web1.qmp_path)], [
            {"identities": ["alice"], "vms": ["*"], "modes": ["force", "hotplug"]},
            {"identities": ["bob"], "vms": ["web1"], "channels": ["console"], "modes": ["ro"]},
        ])
        yield Lab(agent, pki)
    finally:
        if agent is not None:
            agent.stop()
        lin.terminate()
        web1.terminate()


# --------------------------------------------------------------------------- the CI test


@pytest.mark.qemu
@pytest.mark.slow
def test_ci_style_login_and_command_with_the_sync_api(lab):
    """What a CI job writes: connect, console, log in, run a command, check its output."""
    with vproxy.api.connect(lab.address, cert=lab.pki.alice.cert, key=lab.pki.alice.key,
                            ca=lab.pki.ca) as client:
        with client.console("lin", replay="all", timeout=BOOT_TIMEOUT) as console:
            console.login("root", prompt="root@vproxy-guest:~# ")
            assert console.run("echo $((6*7))") == "42"
            assert console.run("uname -s; echo second line") == "Linux\nsecond line"
            assert console.run("true") == ""
        assert b"42\r\n" in console.transcript


@pytest.mark.qemu
@pytest.mark.slow
def test_the_async_api_does_the_same(lab):
    async def main():
        async with await vproxy.api.connect_async(lab.address, **lab.tls) as client:
            async with await client.console("lin", timeout=BOOT_TIMEOUT) as console:
                # already logged in (the previous test): login() finds the shell prompt
                await console.login("root", prompt=SHELL_PROMPT)
                return await console.run("echo $((6*7)) $((2+3))")

    assert asyncio.run(main()) == "42 5"


# --------------------------------------------------------------------------- expect


@pytest.mark.qemu
@pytest.mark.slow
def test_expect_patterns_before_after_and_a_timeout_that_shows_the_output(lab):
    with lab.connect() as client, client.console("web1") as console:
        assert console.mode == "rw" and console.info["console"] == "serial0"
        console.sendline("abc hello xyz")
        m = console.expect([b"NEVER", re.compile(rb"H(EL)LO")])
        assert console.match_index == 1 and m.group(1) == b"EL"
        assert console.before == b"ABC " and console.after == b"HELLO"
        console.expect("XYZ\r\n")  # a str is literal too
        assert console.before == b" "
        console.sendline("tail")
        console.expect("TAIL")
        t0 = time.monotonic()
        with pytest.raises(ExpectTimeout) as info:
            console.expect([b"never printed", re.compile(r"nor\s+this")], timeout=0.5)
        assert 0.5 <= time.monotonic() - t0 < 5
        text = str(info.value)
        assert text.startswith("console serial0 of VM web1: waited 0.5 s for b'never printed' "
                               "or re.compile(b'nor\\\\s+this'); the last output seen:\n")
        assert "  | ABC HELLO XYZ\\r\n  | TAIL\\r\n  | " in text
        assert isinstance(info.value, TimeoutError) and isinstance(info.value, VproxyError)
        assert info.value.output.endswith(b"TAIL\r\n")
        # what was received after the match is still there for read()
        assert console.read(timeout=5) == b"\r\n"


@pytest.mark.qemu
@pytest.mark.slow
def test_read_only_consoles_refuse_input_and_the_writer_role_is_handed_over(lab):
    with lab.connect() as client:
        writer = client.console("web1")
        waiting = client.console("web1")  # rw, but someone else writes: read-only for now
        spy = client.console("web1", mode="ro")
        assert writer.mode == "rw" and waiting.mode == "ro" and waiting.writer == "alice"
        t0 = time.monotonic()
        with pytest.raises(vproxy.api.ConsoleReadOnly, match="read-only for you: alice is the writer"):
            waiting.sendline("dropped")
        assert time.monotonic() - t0 >= vproxy.api.WRITER_GRACE  # it waited for the role first
        with pytest.raises(vproxy.api.ConsoleReadOnly, match="opened read-only"):
            spy.send(b"x")
        writer.sendline("one")
        for console in (writer, waiting, spy):
            console.expect("ONE")
        writer.close()
        waiting.wait_for_writer(timeout=10)
        assert waiting.mode == "rw"
        waiting.sendline("two")
        spy.expect("TWO")
        assert any(n.get("event") == "writer-changed" for n in waiting.notices)
        waiting.sendline("last words")
        waiting.close()  # what was written still reaches the guest
        spy.expect("LAST WORDS")
        spy.close()
        deadline = time.monotonic() + 0.5  # closing lets go at once (no linger)
        while client.list_vms()[1]["consoles"][0]["viewers"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.list_vms()[1]["consoles"][0]["viewers"] == []


# --------------------------------------------------------------------------- channels, VNC


@pytest.mark.qemu
@pytest.mark.slow
def test_guest_channels_static_and_hotplugged(lab):
    with lab.connect() as client:
        with client.channel("lin", "org.vproxy.echo0", wait=BOOT_TIMEOUT) as channel:
            channel.sendline("ping")
            channel.expect(b"ping\n")
        with client.channel("lin", "org.vproxy.echo.api", hotplug=True, wait=BOOT_TIMEOUT) as hot:
            payload = os.urandom(256 * 1024)
            hot.write(payload)
            got = b""
            while len(got) < len(payload):
                got += hot.read(timeout=60)
            assert got == payload


@pytest.mark.qemu
@pytest.mark.slow
def test_vnc_screenshot_listener_and_raw_stream(lab, tmp_path):
    from PIL import Image

    with lab.connect() as client:
        with client.console("web1") as console:  # something on the screen
            console.sendline("on screen")
            console.expect("ON SCREEN")
        shot = client.screenshot("web1", tmp_path / "screen.png")
        assert (shot.width, shot.height) == (720, 400) and "web1" in shot.name
        assert shot.colours() >= 2
        image = Image.open(tmp_path / "screen.png")
        assert image.size == (720, 400) and image.mode == "RGB"
        assert image.tobytes() == shot.rgb
        r, g, b = image.getpixel((700, 390))  # the guest's blue background (VGA's 6-bit 0x2A)
        assert r == g == 0 and b > 0x80
        assert (0xFF, 0xFF, 0xFF) in [c for _, c in image.crop((0, 0, 300, 16)).getcolors()]  # banner

        with client.listen("web1", "vnc") as listener:
            assert listener.host == "127.0.0.1" and listener.port > 0
            out = subprocess.run([sys.executable, "-m", "vncdotool.command", "-s",
                                  "%s::%d" % (listener.host, listener.port), "capture",
                                  str(tmp_path / "viewer.png")], capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr
            assert listener.connections == 1
        assert Image.open(tmp_path / "viewer.png").size == (720, 400)

        with client.vnc("web1") as rfb:
            assert rfb.read_until(b"\n", timeout=10) == b"RFB 003.008\n"


# --------------------------------------------------------------------------- errors, env


@pytest.mark.qemu
@pytest.mark.slow
def test_refusals_and_connection_errors(lab, tmp_path):
    with lab.connect() as client:
        with pytest.raises(ChannelRefused) as info:
            client.console("nope", wait=0)
        assert info.value.code == RefuseCode.NO_SUCH_VM
        t0 = time.monotonic()
        with pytest.raises(ChannelRefused):
            client.console("nope", wait=1.0)  # retried for a second, then raised
        assert 0.9 < time.monotonic() - t0 < 10
        with pytest.raises(ChannelRefused) as info:
            client.channel("web1", "org.example.missing", wait=0)
        assert info.value.code == RefuseCode.NO_SUCH_CHANNEL
        assert {vm["vm"] for vm in client.list_vms()} == {"lin", "web1"}
    with vproxy.api.connect(lab.address, cert=lab.pki.bob.cert, key=lab.pki.bob.key, ca=lab.pki.ca) as bob:
        with pytest.raises(ChannelRefused) as info:
            bob.console("web1", mode="rw", wait=5)  # FORBIDDEN is not retried
        assert info.value.code == RefuseCode.FORBIDDEN
        assert "bob may not open console of VM web1" in info.value.message
    with pytest.raises(UserError, match="no such file"):
        vproxy.api.connect(lab.address, cert=str(tmp_path / "missing.pem"), key=lab.pki.alice.key,
                           ca=lab.pki.ca)
    with pytest.raises(UserError, match="cannot connect to the agent at 127.0.0.1:1"):
        vproxy.api.connect("127.0.0.1:1", **lab.tls)
    with pytest.raises(UserError, match="refused the session|TLS"):
        vproxy.api.connect(lab.address, cert=lab.pki.revoked.cert, key=lab.pki.revoked.key, ca=lab.pki.ca)


@pytest.mark.qemu
@pytest.mark.slow
def test_connect_takes_its_defaults_from_the_environment(lab, monkeypatch, tmp_path):
    for name in ("VPROXY_IDENTITY", "VPROXY_CRL", "VPROXY_PKI_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VPROXY_HOST", lab.address)
    monkeypatch.setenv("VPROXY_CERT", lab.pki.alice.cert)
    monkeypatch.setenv("VPROXY_KEY", lab.pki.alice.key)
    monkeypatch.setenv("VPROXY_CA", lab.pki.ca)
    with vproxy.api.connect() as client:
        assert client.address == lab.address and client.ping() < 5
    # an identity from a PKI directory (the CA's own dir holds issued/alice.*)
    for name in ("VPROXY_CERT", "VPROXY_KEY", "VPROXY_CA"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("VPROXY_PKI_DIR", str(lab.pki.dir))
    with vproxy.api.connect(identity="alice") as client:
        assert client.list_vms()
    with pytest.raises(UserError, match="no certificate for identity 'carol'"):
        vproxy.api.connect(identity="carol")
    monkeypatch.delenv("VPROXY_HOST")
    with pytest.raises(UserError, match="no agent address"):
        vproxy.api.connect(identity="alice")


@pytest.mark.qemu
@pytest.mark.slow
def test_connect_reads_the_client_config_file(lab, monkeypatch, tmp_path):
    """As the CLI: a host named in the client config file, its certificate, and the
    CRL of [defaults] (checked: a missing one is named)."""
    for name in ("VPROXY_HOST", "VPROXY_IDENTITY", "VPROXY_CERT", "VPROXY_KEY", "VPROXY_CA",
                 "VPROXY_CRL", "VPROXY_PKI_DIR"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "client.toml"
    entry = '[hosts.lab]\naddress = "%s"\ncert = "%s"\nkey = "%s"\nca = "%s"\n' % (
        lab.address, lab.pki.alice.cert, lab.pki.alice.key, lab.pki.ca)
    config.write_text('[defaults]\ncrl = "%s"\n%s' % (lab.pki.crl, entry))
    monkeypatch.setenv("VPROXY_CLIENT_CONFIG", str(config))
    with vproxy.api.connect("lab") as client:
        assert client.address == lab.address
        assert {vm["vm"] for vm in client.list_vms()} == {"lin", "web1"}
    config.write_text('[defaults]\ncrl = "%s"\n%s' % (tmp_path / "gone.pem", entry))
    with pytest.raises(UserError, match="CRL .*gone.pem: no such file"):
        vproxy.api.connect("lab")


@pytest.mark.qemu
@pytest.mark.slow
def test_the_sync_api_inside_a_running_loop_and_no_thread_left_behind(lab):
    def api_threads():
        return [t for t in threading.enumerate() if t.name == "vproxy-api"]

    before = len(api_threads())

    async def inside():  # e.g. a test using pytest-asyncio calling a sync helper
        with lab.connect() as client:
            with client.console("web1") as console:
                console.sendline("from a loop")
                console.expect("FROM A LOOP")
            assert len(api_threads()) == before + 1
        return True

    assert asyncio.run(inside())
    assert len(api_threads()) == before
    client = lab.connect()
    client.close()
    client.close()  # twice is harmless
    with pytest.raises(VproxyError, match="closed"):
        client.list_vms()


# --------------------------------------------------------------------------- pytest plugin


PLUGIN_TESTS = '''
import pytest

def test_passes(vproxy_console):
    assert vproxy_console.name == "console serial0 of VM web1"
    vproxy_console.sendline("plugin ok")
    vproxy_console.expect("PLUGIN OK")

def test_fails(vproxy_console):
    vproxy_console.sendline("before the failure")
    vproxy_console.expect("BEFORE THE FAILURE")
    assert False, "deliberately"

def test_factory(vproxy_console_factory, vproxy_client):
    spy = vproxy_console_factory(mode="ro", replay="all")
    spy.expect("PLUGIN OK")
    assert [vm["vm"] for vm in vproxy_client.list_vms()] == ["lin", "web1"]
'''


def _plugin_args():
    from test_docs_examples import plugin_args

    return plugin_args()


@pytest.mark.qemu
@pytest.mark.slow
def test_the_pytest_plugin_manages_a_console_and_keeps_its_output_on_failure(lab, tmp_path):
    (tmp_path / "test_ci.py").write_text(textwrap.dedent(PLUGIN_TESTS))
    logs = tmp_path / "logs"
    env = {k: v for k, v in ENV.items() if not k.startswith("VPROXY_")}
    env.update(VPROXY_CERT=lab.pki.alice.cert, VPROXY_KEY=lab.pki.alice.key, VPROXY_VM="web1")
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA"] + _plugin_args() + [
        "test_ci.py", "--vproxy-host", lab.address, "--vproxy-ca", lab.pki.ca,
        "--vproxy-log-dir", str(logs)]
    out = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=180)
    assert "1 failed, 2 passed" in out.stdout, out.stdout + out.stderr
    report = out.stdout
    assert "vproxy console serial0 of VM web1" in report
    saved = list(logs.glob("*.log"))
    assert len(saved) == 1, saved  # only the failed test's console
    assert saved[0].name.endswith("test_ci.py_test_fails.console_serial0_of_VM_web1.log")
    assert b"BEFORE THE FAILURE" in saved[0].read_bytes()
    assert "saved to %s" % saved[0] in report
    assert "  | BEFORE THE FAILURE" in report  # (the CR LF after it may not be read yet)

    # nothing configured: skipped, with the reason
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs"]
                         + _plugin_args() + ["test_ci.py"],
                         cwd=str(tmp_path), env={k: v for k, v in ENV.items() if not k.startswith("VPROXY_")},
                         capture_output=True, text=True, timeout=120)
    assert "3 skipped" in out.stdout, out.stdout + out.stderr
    assert "no vproxy agent configured: give --vproxy-host" in out.stdout


def test_the_plugin_is_registered_as_a_pytest11_entry_point():
    import pathlib

    pyproject = (pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert re.search(r'\[project\.entry-points\.pytest11\]\s*\nvproxy = "vproxy\.api\.pytest_plugin"', pyproject)


def test_the_plugin_module_imports_without_pytest():
    code = ("import sys; sys.modules['pytest'] = None; import vproxy.api.pytest_plugin as p; "
            "assert p.pytest is None and not hasattr(p, 'vproxy_console'); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


# --------------------------------------------------------------------------- the expect core


def test_expecter_core_without_io():
    x = Expecter("demo")
    x.feed(b"boot...\r\nlogin: ")
    assert x.search(x.compile([b"# ", re.compile(rb"login: $")])) is not None
    assert x.match_index == 1 and x.before == b"boot...\r\n" and x.buffer == b""
    x.feed(b"root\r\n# \x1b[6n")
    assert x.search_last(x.compile([b"# ", b"login: "])).group(0) == b"# "  # ESC [6n may follow
    x.feed(b"# then more")
    assert x.search_last(x.compile(b"# ")) is None  # the prompt is not at the end
    assert compile_pattern("a.b").search(b"axb") is None  # str is literal
    assert compile_pattern(re.compile("a.b")).search(b"axb")  # a str regex works on bytes
    with pytest.raises(TypeError):
        compile_pattern(42)  # type: ignore[arg-type]
    assert printable(b"ok\r\n\x1b[1m\xff\t\\") == "ok\\r\n\\e[1m\\xff\\t\\\\"
    assert x.transcript == b"boot...\r\nlogin: root\r\n# \x1b[6n# then more"


class _Pipe:
    """An async stream double for AsyncExpect: scripted replies to each write."""

    def __init__(self, script):
        self.script = list(script)  # [(expected write, reply)]
        self.queue = asyncio.Queue()
        self.written = []

    async def read(self, n=65536):
        return await self.queue.get()

    async def write(self, data):
        self.written.append(data)
        if self.script and self.script[0][0] == data:
            self.queue.put_nowait(self.script.pop(0)[1])


def test_login_retries_when_the_prompt_comes_straight_back_and_fails_clearly():
    async def main():
        # Enter pressed while booting answered the first prompt with an empty name
        pipe = _Pipe([(b"\r", b"\r\nlogin: "), (b"root\r", b"root\r\nlogin: "),
                      (b"root\r", b"root\r\nPassword: "), (b"secret\r", b"\r\n$ ")])
        console = AsyncExpect(pipe, name="console x", newline="\r", timeout=5)
        await console.login("root", "secret", nudge=0.05)
        assert pipe.written == [b"\r", b"root\r", b"root\r", b"secret\r"]
        assert console.prompt is not None

        pipe = _Pipe([(b"\r", b"login: "), (b"root\r", b"root\r\nPassword: ")])
        console = AsyncExpect(pipe, name="console y", newline="\r", timeout=5)
        with pytest.raises(LoginFailed, match="wants a password"):
            await console.login("root", nudge=0.05)

        pipe = _Pipe([])
        console = AsyncExpect(pipe, name="console z", timeout=5)
        pipe.queue.put_nowait(b"bye")
        pipe.queue.put_nowait(b"")
        with pytest.raises(ExpectEOF, match="console z: the stream ended before b'never'"):
            await console.expect(b"never")
        assert not console.eof and await console.read() == b"bye"  # unmatched output stays
        assert console.eof and await console.read() == b""

    asyncio.run(main())
