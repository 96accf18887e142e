"""`vproxy forward HOST "" sink|source|echo` and `Client.channel("", ...)`: the agent's
built-in channels through the paths users take, so any tool can measure a link.

No QEMU: a real agent process (`vproxy serve`, TLS, a config file with no VM), the real
`vproxy forward` process, plain sockets on the local side.
"""

import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from support.agenttools import ENV, AgentProcess

import vproxy.api


@pytest.fixture
def agent(pki, tmp_path):
    process = AgentProcess(pki, tmp_path, [], [])
    try:
        yield process
    finally:
        process.stop()


class Forward:
    """`vproxy forward ADDRESS "" CHANNEL` in a child process; `port` once it listens."""

    def __init__(self, pki, address, channel):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vproxy", "forward", address, "", channel, "--listen", "127.0.0.1:0",
             "--cert", pki.alice.cert, "--key", pki.alice.key, "--ca", pki.ca],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, text=True)
        line = self.proc.stdout.readline().strip()
        if not line:
            self.proc.kill()
            raise AssertionError("no address printed; stderr: %s" % self.proc.communicate()[1])
        self.port = int(line.rpartition(":")[2])

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=30)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


def read_to_eof(sock: socket.socket) -> bytes:
    parts = []
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)


def test_forward_to_the_built_in_echo_returns_every_byte_and_passes_the_half_close(pki, agent):
    fwd = Forward(pki, agent.address, "echo")
    try:
        payload = os.urandom(3 * 1024 * 1024 + 17)
        for _ in range(2):  # two local connections: two streams of one session
            sock = fwd.connect()

            def send(sock=sock) -> None:
                for i in range(0, len(payload), 100000):
                    sock.sendall(payload[i:i + 100000])
                sock.shutdown(socket.SHUT_WR)  # echo half-closes when we do

            sender = threading.Thread(target=send)
            sender.start()
            back = read_to_eof(sock)
            sender.join(30)
            sock.close()
            assert len(back) == len(payload) and back == payload
    finally:
        err = fwd.stop()
    assert "built-in channel echo" in err and "Traceback" not in err, err


def test_forward_to_the_built_in_sink_counts_and_source_sends(pki, agent):
    sink = Forward(pki, agent.address, "sink")
    source = Forward(pki, agent.address, "source")
    try:
        sock = sink.connect()
        sent = 0
        for size in (1, 65536, 1000000, 5):
            sock.sendall(b"x" * size)
            sent += size
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == str(sent).encode()  # the count, then the end
        sock.close()

        sock = source.connect()
        got = bytearray()
        while len(got) < 2 * 1024 * 1024:
            chunk = sock.recv(1 << 20)
            assert chunk, "the source ended early"
            got += chunk
        assert got.count(0) == len(got)
        sock.close()
    finally:
        sink.stop()
        source.stop()


def test_forward_with_no_vm_takes_only_a_built_in_channel():
    env = dict(ENV, PATH="/nonexistent")
    out = subprocess.run([sys.executable, "-m", "vproxy", "forward", "unix:/nonexistent.sock", "", "console"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2 and "not 'console'" in out.stderr and "sink, source, echo" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_api_opens_the_built_in_channels(pki, agent):
    with vproxy.api.connect(agent.address, cert=pki.alice.cert, key=pki.alice.key, ca=pki.ca) as client:
        with client.channel("", "echo") as echo:
            echo.write(b"ping\n")
            assert echo.read_until(b"ping\n") == b"ping\n"
        with client.channel("", "sink") as sink:
            sink.write(b"y" * 100000)
            sink.write_eof()  # the sink answers the count, then ends
            answer = b""
            while True:
                chunk = sink.read(timeout=30)
                if not chunk:
                    break
                answer += chunk
            assert answer == b"100000"
        with pytest.raises(ValueError):
            client.channel("", "console")
