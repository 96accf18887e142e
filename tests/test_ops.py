"""Operating the agent: graceful drain, sd_notify, the metrics endpoint, JSON logs and the
systemd unit. Each test runs the real thing: the agent process with real signals, a
real unix datagram socket as NOTIFY_SOCKET, HTTP over a real socket while traffic flows.
"""

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from vproxy.agent import logs as ops
from vproxy.agent.server import Agent, AgentConfig
from vproxy.client.connection import connect
from vproxy.errors import ChannelRefused, SessionClosed, UserError
from vproxy.agent.metrics import parse_metrics_address
from vproxy.mux import RefuseCode
from vproxy.agent.sdnotify import Notifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)
UNIT = os.path.join(ROOT, "contrib", "vproxy.service")


def serve(pki, *args, env=None):
    """`vproxy serve` on a free port; returns (process, address)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vproxy", "serve", "--listen", "127.0.0.1:0", "--cert", pki.server.cert,
         "--key", pki.server.key, "--ca", pki.ca, "--crl", pki.crl] + list(args),
        stderr=subprocess.PIPE, env=env or ENV, text=True)
    line = proc.stderr.readline()
    assert "listening on" in line, line + proc.stderr.read()
    match = re.search(r"listening on (127\.0\.0\.1:\d+)", line)
    return proc, match.group(1)


def run_then_wait(proc, coro):
    """Run coro (the client side, while the agent drains); then the agent's exit
    status. The agent is killed whatever happens."""
    try:
        result = asyncio.run(asyncio.wait_for(coro, 60))
        return result, proc.wait(10)
    finally:
        proc.kill()
        proc.wait()


def connect_as(pki, pair, address):
    return connect(address, pair.cert, pair.key, pki.ca, server_name="localhost", timeout=5)


# --------------------------------------------------------------------------- drain

def test_sigterm_drains_open_streams_refuses_new_ones_and_exits_when_done(pki):
    """An echo stream keeps working after SIGTERM; new opens are refused (GOING_AWAY);
    the agent exits as soon as the last stream is done, well before the drain timeout."""
    proc, address = serve(pki, "--drain-timeout", "30")

    async def main():
        client = await connect_as(pki, pki.alice, address)
        stream = await client.open("", "echo")
        await stream.write(b"before")
        assert await stream.read() == b"before"
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while client.session.remote_goaway is None:  # GOAWAY reaches us
            assert time.monotonic() < deadline, "no GOAWAY after SIGTERM"
            await client.ping()
        for chunk in (b"during", b"the", b"drain"):
            await stream.write(chunk)
            assert await asyncio.wait_for(stream.read(), 5) == chunk
        # a client that knows of the GOAWAY does not even ask
        with pytest.raises(SessionClosed) as info:
            await client.open("", "echo")
        assert "going away" in str(info.value)
        # one whose OPEN crossed the GOAWAY on the wire is refused with GOING_AWAY
        conn = client.session._conn
        seen, conn.remote_goaway = conn.remote_goaway, None
        try:
            with pytest.raises(ChannelRefused) as refused:
                await client.open("", "echo")
        finally:
            conn.remote_goaway = seen
        assert refused.value.code == RefuseCode.GOING_AWAY
        started = time.monotonic()
        await stream.close()
        assert await asyncio.wait_for(stream.read(), 5) == b""  # echo half-closes back
        await asyncio.wait_for(client.session.wait_closed(), 10)
        return time.monotonic() - started

    after_close, rc = run_then_wait(proc, main())
    assert rc == 0
    assert after_close < 5  # not the 30 s drain timeout
    assert "draining 1 session(s) for up to 30 s" in proc.stderr.read()


def test_the_drain_timeout_ends_streams_that_do_not_finish(pki):
    proc, address = serve(pki, "--drain-timeout", "1")

    async def main():
        client = await connect_as(pki, pki.alice, address)
        stream = await client.open("", "echo")
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        with pytest.raises(SessionClosed):
            while True:  # keep the stream busy: it never finishes by itself
                await stream.write(b"x")
                await asyncio.wait_for(stream.read(), 5)
        return time.monotonic() - started

    took, rc = run_then_wait(proc, main())
    assert rc == 0
    assert 0.8 < took < 4, took


def test_sighup_while_draining_is_ignored_and_a_second_sigterm_ends_the_drain(pki):
    proc, address = serve(pki, "--drain-timeout", "60")

    async def main():
        client = await connect_as(pki, pki.alice, address)
        stream = await client.open("", "echo")
        proc.send_signal(signal.SIGTERM)
        while client.session.remote_goaway is None:
            await client.ping()
        proc.send_signal(signal.SIGHUP)  # SIGHUP's default action would kill it
        await asyncio.sleep(0.3)
        assert proc.poll() is None
        await stream.write(b"still")
        assert await asyncio.wait_for(stream.read(), 5) == b"still"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(client.session.wait_closed(), 10)
        return time.monotonic() - started

    took, rc = run_then_wait(proc, main())
    assert rc == 0 and took < 5
    err = proc.stderr.read()
    assert "SIGHUP ignored: the agent is shutting down" in err
    assert "second signal: ending the drain now" in err


# --------------------------------------------------------------------------- sd_notify

class NotifySocket:
    """A unix datagram socket standing in for systemd's notification socket."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="vproxy-notify-")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(15)

    def next(self) -> dict:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n") if line)

    def close(self):
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_sd_notify_ready_reloading_and_stopping(pki, tmp_path):
    notify = NotifySocket()
    proc = None
    try:
        proc, address = serve(pki, env=dict(ENV, NOTIFY_SOCKET=notify.path))
        ready = notify.next()
        assert ready["READY"] == "1" and address in ready["STATUS"]
        before = time.clock_gettime(time.CLOCK_MONOTONIC)
        proc.send_signal(signal.SIGHUP)
        reloading = notify.next()
        assert reloading["RELOADING"] == "1"
        assert before <= int(reloading["MONOTONIC_USEC"]) / 1e6 <= time.clock_gettime(time.CLOCK_MONOTONIC)
        again = notify.next()
        assert again["READY"] == "1" and "reloaded" in again["STATUS"]
        proc.send_signal(signal.SIGTERM)
        stopping = notify.next()
        assert stopping["STOPPING"] == "1" and "draining 0 session(s)" in stopping["STATUS"]
        assert proc.wait(15) == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def test_sd_notify_abstract_socket_and_no_socket():
    name = "vproxy-test-%d" % os.getpid()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        notifier = Notifier("@" + name)
        assert notifier.status("one\nline")
        assert sock.recv(100) == b"STATUS=one line"
        notifier.close()
    finally:
        sock.close()
    assert not Notifier("").ready()  # no NOTIFY_SOCKET: nothing to do, no error
    assert not Notifier("/nonexistent/socket").ready()  # a broken one: no exception


def test_a_failed_reload_tells_systemd_it_is_ready_again(pki, tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('listen = "127.0.0.1:0"\n')
    notify = NotifySocket()
    proc = None
    try:
        proc, _ = serve(pki, "--config", str(config), env=dict(ENV, NOTIFY_SOCKET=notify.path))
        assert notify.next()["READY"] == "1"
        config.write_text("[[allow]]\nidentities = 7\n")
        proc.send_signal(signal.SIGHUP)
        assert notify.next()["RELOADING"] == "1"
        again = notify.next()
        assert again["READY"] == "1" and "reload failed" in again["STATUS"]
        line = proc.stderr.readline()
        assert line.startswith("vproxy: reload failed, keeping the previous settings: ")
        assert str(config) in line and "identities" in line
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(15)
        notify.close()


# --------------------------------------------------------------------------- metrics

def scrape(address: str, path: str = "/metrics", method: str = "GET") -> tuple:
    """(status, headers, body) of one HTTP request, over TCP or unix:PATH."""
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address[5:])
    else:
        host, port = address.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
    sock.settimeout(5)
    with sock:
        sock.sendall(("%s %s HTTP/1.1\r\nHost: x\r\n\r\n" % (method, path)).encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert int(headers["Content-Length"]) == (len(body) if method != "HEAD" else int(headers["Content-Length"]))
    return int(lines[0].split()[1]), headers, body.decode()


def samples(text: str) -> dict:
    """{'name{labels}': value} of a Prometheus text exposition (checking its syntax)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"# (HELP|TYPE) vproxy_[a-z_]+ ", line), line
            continue
        match = re.match(r'^(vproxy_[a-z_]+(?:\{[a-z_]+="[^"]*"(?:,[a-z_]+="[^"]*")*\})?) (\S+)$', line)
        assert match, "not a sample line: %r" % line
        out[match.group(1)] = float(match.group(2))
    return out


async def scrape_async(address, path="/metrics"):
    return await asyncio.get_event_loop().run_in_executor(None, scrape, address, path)


@pytest.mark.parametrize("where", ["tcp", "unix"])
def test_metrics_and_status_while_traffic_flows(pki, tmp_path, where):
    listen = "127.0.0.1:0" if where == "tcp" else "unix:%s" % (tmp_path / "metrics.sock")

    async def main():
        agent = Agent(AgentConfig(listen_port=0, cert=pki.server.cert, key=pki.server.key,
                                  ca=pki.ca, crl=pki.crl, metrics=listen))
        await agent.start()
        address = agent.metrics_server.addresses[0]
        first = samples((await scrape_async(address))[2])
        assert first["vproxy_sessions"] == 0 and first['vproxy_opens_total{result="ok"}'] == 0

        client = await connect_as(pki, pki.alice, agent.addresses[0])
        streams = [await client.open("", "echo") for _ in range(3)]
        sink = await client.open("", "sink")
        for refused in (("web1", "console"), ("", "nonsense")):
            with pytest.raises(ChannelRefused):
                await client.open(*refused)
        with pytest.raises(UserError):  # a refused certificate
            await connect_as(pki, pki.revoked, agent.addresses[0])

        # bulk data into the sink while we scrape
        block = b"\0" * 65536

        async def pump():
            for _ in range(64):
                await sink.write(block)

        pumping = asyncio.ensure_future(pump())
        during = []
        while not pumping.done():
            during.append(samples((await scrape_async(address))[2]))
            await asyncio.sleep(0.01)
        await pumping
        for s in streams:
            await s.write(b"hello")
            assert await s.read() == b"hello"
        now = samples((await scrape_async(address))[2])
        assert now["vproxy_sessions"] == 1
        assert now['vproxy_streams{kind="echo"}'] == 3 and now['vproxy_streams{kind="sink"}'] == 1
        assert now['vproxy_streams{kind="console"}'] == 0
        assert now['vproxy_opens_total{result="ok"}'] == 4
        assert now['vproxy_opens_total{result="refused"}'] == 2
        assert now['vproxy_refusals_total{code="FORBIDDEN"}'] == 1
        assert now['vproxy_refusals_total{code="NO_SUCH_CHANNEL"}'] == 1
        assert now["vproxy_handshake_failures_total"] == 1
        assert now['vproxy_bytes_total{direction="in"}'] >= 64 * 65536 + 15
        assert now['vproxy_bytes_total{direction="out"}'] >= 15
        assert now["vproxy_qmp_reconnects_total"] == 0
        assert any(k.startswith("vproxy_build_info{") for k in now)
        ins = [d['vproxy_bytes_total{direction="in"}'] for d in during] + [now['vproxy_bytes_total{direction="in"}']]
        assert ins == sorted(ins)  # a counter never goes back

        status, headers, body = await scrape_async(address, "/status")
        assert status == 200 and headers["Content-Type"] == "application/json"
        info = json.loads(body)
        assert info["state"] == "serving" and info["streams"] == 4
        assert [s["identity"] for s in info["sessions"]] == ["alice"]

        # bytes of ended streams stay counted
        for s in streams:
            await s.close()
            assert await s.read() == b""
        await sink.close()
        await sink.read()
        await asyncio.sleep(0.1)
        after = samples((await scrape_async(address))[2])
        assert after['vproxy_streams{kind="echo"}'] == 0
        assert after['vproxy_bytes_total{direction="in"}'] >= now['vproxy_bytes_total{direction="in"}']
        await client.close()
        await agent.shutdown(drain_timeout=1)
        if where == "unix":
            assert not os.path.exists(address[5:])  # removed on shutdown

    asyncio.run(asyncio.wait_for(main(), 60))


def test_the_metrics_endpoint_answers_only_what_it_knows(pki):
    async def main():
        agent = Agent(AgentConfig(listen_port=0, cert=pki.server.cert, key=pki.server.key,
                                  ca=pki.ca, metrics="127.0.0.1:0"))
        await agent.start()
        address = agent.metrics_server.addresses[0]
        loop = asyncio.get_event_loop()
        assert (await scrape_async(address, "/nope"))[0] == 404
        status, headers, body = await loop.run_in_executor(None, scrape, address, "/metrics", "HEAD")
        assert status == 200 and body == "" and int(headers["Content-Length"]) > 100
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert (await loop.run_in_executor(None, scrape, address, "/metrics", "POST"))[0] == 405

        def huge_head():
            host, port = address.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
                return sock.recv(100)
        assert b" 431 " in await loop.run_in_executor(None, huge_head)

        def silent():  # a client that says nothing is dropped after the request timeout
            host, port = address.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                started = time.monotonic()
                assert sock.recv(100) == b""
                return time.monotonic() - started
        assert 4 < await loop.run_in_executor(None, silent) < 8
        await agent.shutdown(drain_timeout=0)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_the_metrics_address_is_local_only():
    assert parse_metrics_address("9750") == ("tcp", ("127.0.0.1", 9750))
    assert parse_metrics_address(":9750") == ("tcp", ("127.0.0.1", 9750))
    assert parse_metrics_address("127.0.0.2:1") == ("tcp", ("127.0.0.2", 1))
    assert parse_metrics_address("[::1]:9750") == ("tcp", ("::1", 9750))
    assert parse_metrics_address("localhost:9750") == ("tcp", ("localhost", 9750))
    assert parse_metrics_address("unix:/run/m.sock") == ("unix", "/run/m.sock")
    for bad in ("0.0.0.0:9750", "[::]:9750", "10.1.2.3:9750", "example.com:9750", "x", "1:99999",
                "unix:"):
        with pytest.raises(UserError):
            parse_metrics_address(bad)


def test_metrics_refuses_to_replace_a_file_that_is_not_a_socket(pki, tmp_path):
    precious = tmp_path / "precious"
    precious.write_text("keep me")

    async def main():
        agent = Agent(AgentConfig(listen_port=0, cert=pki.server.cert, key=pki.server.key,
                                  ca=pki.ca, metrics="unix:%s" % precious))
        with pytest.raises(UserError) as info:
            await agent.start()
        assert "not a socket" in info.value.message
        await agent.shutdown(drain_timeout=0)

    asyncio.run(asyncio.wait_for(main(), 30))
    assert precious.read_text() == "keep me"


@pytest.mark.qemu
@pytest.mark.slow
def test_qmp_reconnects_are_counted(pki, tmp_path):
    """A real QEMU killed and started again on the same QMP socket: one reconnect."""
    from support.vmtools import boot_sector_vm

    vm = boot_sector_vm(tmp_path / "vm", name="web1", vnc=False)
    vm.start()

    async def main():
        agent = Agent(AgentConfig(listen_port=0, cert=pki.server.cert, key=pki.server.key,
                                  ca=pki.ca, vms=[("web1", str(vm.qmp_path))], metrics="127.0.0.1:0"))
        await agent.start()
        address = agent.metrics_server.addresses[0]
        registry_vm = agent.registry.get("web1")

        async def wait_for(condition, what):
            deadline = time.monotonic() + 30
            while not condition():
                assert time.monotonic() < deadline, what
                await asyncio.sleep(0.05)

        await wait_for(lambda: registry_vm.monitor.ready, "QMP never connected")
        assert samples((await scrape_async(address))[2])["vproxy_qmp_reconnects_total"] == 0
        vm.kill()
        vm.wait(10)
        await wait_for(lambda: not registry_vm.monitor.connected, "the loss was not noticed")
        vm.proc = None
        vm.start()
        await wait_for(lambda: registry_vm.monitor.ready, "QMP did not come back")
        assert samples((await scrape_async(address))[2])["vproxy_qmp_reconnects_total"] == 1
        status = json.loads((await scrape_async(address, "/status"))[2])
        assert status["vms"] == [{"vm": "web1", "state": registry_vm.state}]
        await agent.shutdown(drain_timeout=0)

    try:
        asyncio.run(asyncio.wait_for(main(), 90))
    finally:
        vm.terminate()


# --------------------------------------------------------------------------- JSON logs

def test_json_logs_one_object_per_line_with_audit_fields(pki, tmp_path):
    audit = tmp_path / "audit.log"
    proc, address = serve(pki, "--log-format", "json", "--audit-log", str(audit))
    try:
        async def main():
            client = await connect_as(pki, pki.alice, address)
            with pytest.raises(ChannelRefused):
                await client.open('web"1 \u00fc', "console")  # an awkward VM name
            await client.close()
            with pytest.raises(UserError):
                await connect_as(pki, pki.revoked, address)

        asyncio.run(asyncio.wait_for(main(), 30))
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
    finally:
        proc.terminate()
        rc = proc.wait(15)
    assert rc == 0
    stderr = proc.stderr.read().splitlines()
    records = [json.loads(line) for line in stderr]  # every line is one JSON object
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record)
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", record["time"])
    messages = [r["message"] for r in records]
    assert any("refused connection from 127.0.0.1" in m and "revoked" in m for m in messages)
    assert any(m.startswith("reloaded") for m in messages)
    assert any(m.startswith("shutting down") for m in messages)
    lines = audit.read_text().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["logger"] == "vproxy.audit" and entry["identity"] == "alice"
    assert entry["vm"] == 'web"1 \u00fc' and entry["channel"] == "console" and entry["mode"] == "rw"
    assert entry["result"].startswith("refused: ") and entry["bytes_in"] == 0


def test_json_formatter_fields_and_exceptions():
    formatter = ops.JsonFormatter()
    record = logging.LogRecord("vproxy.audit", logging.INFO, __file__, 1, "a %s", ("b",), None)
    record.fields = {"identity": "alice", "message": "not the message"}
    out = json.loads(formatter.format(record))
    assert out["message"] == "a b" and out["identity"] == "alice"
    assert out["field_message"] == "not the message" and out["level"] == "info"
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = formatter.format(record)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exception"]


# --------------------------------------------------------------------------- systemd unit

def unit_settings() -> dict:
    settings = {}
    for line in Path(UNIT).read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_systemd_unit_has_its_hardening():
    s = unit_settings()
    assert s["Type"] == ["notify"] and s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                       ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
                       ("CapabilityBoundingSet", "CAP_DAC_OVERRIDE")]:
        assert s[key] == [value], key
    assert "@system-service" in s["SystemCallFilter"]
    assert "/var/log/vproxy" in s["ReadWritePaths"][0]
    assert float(s["TimeoutStopSec"][0].rstrip("s")) > 10  # longer than the default drain


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_unit(tmp_path):
    """`systemd-analyze verify` checks every directive. ExecStart must name an existing
    binary for it, so the copy it checks runs this Python instead of /usr/local/bin."""
    unit = tmp_path / "vproxy.service"
    unit.write_text(Path(UNIT).read_text().replace("/usr/local/bin/vproxy", sys.executable))
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                              capture_output=True, text=True, timeout=60)
    if security.returncode == 0 or "Overall exposure" in security.stdout:
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
        assert match and float(match.group(1)) <= 2.5, security.stdout[-2000:]
