"""`vproxy serve` as a child process, the way a user runs it: a config file, real TLS.

    agent = AgentProcess(pki, tmp_path, [("web1", vm.qmp_path)],
                         [{"identities": ["alice"], "vms": ["*"], "modes": ["force"]}])
    ...  agent.address is "127.0.0.1:PORT"
    agent.stop()

The agent's stderr is read by a thread into `stderr_lines` (and tmp_path/agent.stderr)
so the pipe never fills; it works as a context manager. Also `write_agent_config()`
and `read_until()` for the tests that drive agents themselves.
"""

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, PYTHONPATH=ROOT)


def write_agent_config(path, pki, vms, allow, extra=(), listen="127.0.0.1:0"):
    """An agent config file: listen (default: a free loopback port) with pki's server
    certificate, `extra` lines, then a [[vm]] per (name, qmp) and an [[allow]] per dict."""
    lines = ['listen = "%s"' % listen, 'cert = "%s"' % pki.server.cert, 'key = "%s"' % pki.server.key,
             'ca = "%s"' % pki.ca, 'crl = "%s"' % pki.crl] + list(extra)
    for name, qmp in vms:
        lines += ["[[vm]]", 'name = "%s"' % name, 'qmp = "%s"' % qmp]
    for rule in allow:
        lines += ["[[allow]]"] + ["%s = %s" % (k, json.dumps(v)) for k, v in rule.items()]
    path.write_text("\n".join(lines) + "\n")


async def read_until(stream, needle: bytes, timeout=30.0, data=b"") -> bytes:
    """Read a stream until `needle` has come; everything read (after `data`)."""
    deadline = time.monotonic() + timeout
    while needle not in data:
        left = deadline - time.monotonic()
        assert left > 0, "timed out waiting for %r; got %r" % (needle, data[-300:])
        chunk = await asyncio.wait_for(stream.read(), left)
        assert chunk, "EOF waiting for %r; got %r" % (needle, data[-300:])
        data += chunk
    return data


class AgentProcess:
    """`vproxy serve --config FILE [ARGS]` in a child process; `address` once it listens."""

    def __init__(self, pki, tmp_path, vms, allow, extra_lines=(), args=()):
        self.audit = tmp_path / "audit.log"
        config = tmp_path / "agent.toml"
        write_agent_config(config, pki, vms, allow,
                           ['audit_log = "%s"' % self.audit] + list(extra_lines))
        self.proc = subprocess.Popen([sys.executable, "-m", "vproxy", "serve", "--config", str(config)]
                                     + [str(a) for a in args],
                                     stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, text=True)
        line = self.proc.stderr.readline()
        if "listening on" not in line:
            self.proc.kill()
            raise AssertionError("the agent did not start: " + line + self.proc.stderr.read())
        self.address = line.split("listening on ")[1].strip()
        self.stderr_lines: List[str] = []
        self.stderr_path = tmp_path / "agent.stderr"  # kept for a post-mortem
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self):
        with open(self.stderr_path, "a") as copy:
            for line in self.proc.stderr:
                self.stderr_lines.append(line.rstrip("\n"))
                copy.write(line)
                copy.flush()

    def audit_lines(self):
        return self.audit.read_text().splitlines() if self.audit.exists() else []

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
