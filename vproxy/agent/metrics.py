"""The agent's counters, and a tiny local HTTP endpoint for them (`serve --metrics`).

    GET /metrics   Prometheus text format (version 0.0.4)
    GET /status    one small JSON object: version, uptime, listeners, sessions, VMs

Rules kept here:
- Standard library only, no HTTP library: one request per connection, a bounded request
  head (8 KiB) read within 5 s, `Connection: close`. GET and HEAD only.
- Local by default and by force: loopback addresses or a unix socket. The endpoint has
  no authentication and /status names who is connected.
- Counting never fails an open or a session: the agent calls plain methods that only
  add to integers. Gauges (sessions, streams) are read from the agent when scraped.
- Bytes are stream payload bytes (what channels read and wrote), not TLS bytes.
"""

import asyncio
import json
import logging
import os
import sys
import time
import weakref
from typing import Any, Dict, List, Optional, Tuple

from vproxy import __version__
from vproxy.errors import UserError
from vproxy.mux import RefuseCode
from vproxy.net.address import clear_stale_socket, format_sockname, parse_listen

log = logging.getLogger("vproxy.metrics")

REQUEST_HEAD_LIMIT = 8192
REQUEST_TIMEOUT = 5.0
MAX_CONNECTIONS = 32
WATCH_INTERVAL = 2.0  # how often VMs found later (--vm-dir) get a QMP reconnect counter
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CHANNEL_KINDS = ("console", "channel", "vnc")  # always reported, 0 when none is open


class _QmpWatch:
    """A monitor owner (vproxy.agent.qemu.monitor.MonitorOwner, duck-typed so that this module
    does not import qemu.qmp) that counts QMP connections made after the first."""

    def __init__(self, metrics: "Metrics", connected: bool):
        self.metrics = metrics
        self.seen = connected

    async def on_connected(self, monitor: Any) -> None:
        if self.seen:
            self.metrics.qmp_reconnects += 1
        self.seen = True

    def on_event(self, event: Dict[str, Any]) -> None:
        pass

    def on_lost(self, reason: str) -> None:
        pass


class Metrics:
    """Counters of one agent. The agent calls these; render() and status() read them."""

    def __init__(self) -> None:
        self.started = time.time()
        self.opens = {"ok": 0, "refused": 0}
        self.refusals: Dict[str, int] = {}
        self.handshake_failures = 0
        self.bytes_done = {"in": 0, "out": 0}  # of streams that have ended
        self.qmp_reconnects = 0
        self.reloads = {"ok": 0, "failed": 0}
        self.last_reload: Dict[str, Any] = {}
        self._watched: "weakref.WeakSet[Any]" = weakref.WeakSet()  # VM monitors
        self._kinds: "set[str]" = set(CHANNEL_KINDS)

    # -- called by the agent ----------------------------------------------------------

    def opened(self) -> None:
        self.opens["ok"] += 1

    def refused(self, code: int) -> None:
        self.opens["refused"] += 1
        name = _refuse_name(code)
        self.refusals[name] = self.refusals.get(name, 0) + 1

    def handshake_failed(self) -> None:
        self.handshake_failures += 1

    def stream_ended(self, stream: Any) -> None:
        self.bytes_done["in"] += stream.bytes_in
        self.bytes_done["out"] += stream.bytes_out

    def reloaded(self, ok: bool, message: str) -> None:
        self.reloads["ok" if ok else "failed"] += 1
        self.last_reload = {"time": _iso(time.time()), "ok": ok, "message": message}

    def watch_vms(self, registry: Any) -> None:
        """Count QMP reconnects of every VM of the registry not watched yet."""
        if registry is None:
            return
        for vm in registry:
            monitor = vm.monitor
            if monitor in self._watched:
                continue
            self._watched.add(monitor)
            monitor.add_owner(_QmpWatch(self, monitor.connected))

    # -- reading ----------------------------------------------------------------------

    def render(self, agent: Any) -> str:
        """The Prometheus text exposition of this agent's state."""
        self.watch_vms(getattr(agent, "registry", None))
        streams = list(getattr(agent, "streams", ()))
        kinds = dict.fromkeys(self._kinds, 0)  # a kind once seen stays, at 0
        live_in = live_out = 0
        for stream in streams:
            kind = stream.request.channel.partition(":")[0] or "-"
            kinds[kind] = kinds.get(kind, 0) + 1
            self._kinds.add(kind)
            live_in += stream.bytes_in
            live_out += stream.bytes_out
        out: List[str] = []

        def metric(name: str, kind: str, help_text: str,
                   samples: List[Tuple[Dict[str, str], float]]) -> None:
            out.append("# HELP %s %s" % (name, help_text))
            out.append("# TYPE %s %s" % (name, kind))
            for labels, value in samples:
                out.append("%s%s %s" % (name, _labels(labels), _number(value)))

        metric("vproxy_build_info", "gauge", "Version of this agent (always 1).",
               [(build_info(), 1)])
        metric("vproxy_start_time_seconds", "gauge", "When the agent started (Unix time).",
               [({}, round(self.started, 3))])
        metric("vproxy_sessions", "gauge", "Live sessions (TLS and local).",
               [({}, len(getattr(agent, "sessions", ())))])
        metric("vproxy_streams", "gauge", "Open streams, by channel kind.",
               [({"kind": k}, n) for k, n in sorted(kinds.items())])
        metric("vproxy_bytes_total", "counter",
               "Stream payload bytes: in = from clients, out = to clients.",
               [({"direction": "in"}, self.bytes_done["in"] + live_in),
                ({"direction": "out"}, self.bytes_done["out"] + live_out)])
        metric("vproxy_opens_total", "counter", "Channel open requests answered, by result.",
               [({"result": r}, n) for r, n in sorted(self.opens.items())])
        metric("vproxy_refusals_total", "counter", "Refused open requests, by refusal code.",
               [({"code": c}, n) for c, n in sorted(self.refusals.items())])
        metric("vproxy_handshake_failures_total", "counter",
               "Connections refused during or right after the TLS handshake.",
               [({}, self.handshake_failures)])
        metric("vproxy_qmp_reconnects_total", "counter",
               "QMP connections to a VM made again after it was lost (QEMU restarted).",
               [({}, self.qmp_reconnects)])
        metric("vproxy_reloads_total", "counter", "Reloads (SIGHUP), by result.",
               [({"result": r}, n) for r, n in sorted(self.reloads.items())])
        return "\n".join(out) + "\n"

    def status(self, agent: Any) -> Dict[str, Any]:
        """A small JSON-able summary for humans and health checks."""
        self.watch_vms(getattr(agent, "registry", None))
        sessions = []
        for session in list(getattr(agent, "sessions", ())):
            sessions.append({"identity": str(session.peer_identity),
                             "name": session.name, "streams": session.stream_count})
        vms = []
        registry = getattr(agent, "registry", None)
        if registry is not None:
            vms = [{"vm": vm.name, "state": vm.state} for vm in registry]
        return {
            "version": build_info()["version"],
            "build": build_info()["build"],
            "pid": os.getpid(),
            "started": _iso(self.started),
            "uptime_seconds": round(time.time() - self.started, 3),
            "state": "draining" if getattr(agent, "draining", False) else "serving",
            "listening": list(getattr(agent, "addresses", [])),
            "sessions": sessions,
            "streams": len(getattr(agent, "streams", ())),
            "vms": vms,
            "last_reload": self.last_reload or None,
        }


def build_info() -> Dict[str, str]:
    try:
        from vproxy._build import BUILD_HASH  # optional: written into the .pyz by build.py
    except ImportError:
        BUILD_HASH = "dev"
    return {"version": __version__, "build": BUILD_HASH[:12],
            "python": sys.version.split()[0]}


def _refuse_name(code: int) -> str:
    try:
        return RefuseCode(code).name
    except ValueError:
        return str(code)


def _labels(labels: Dict[str, str]) -> str:
    if not labels:
        return ""
    return "{%s}" % ",".join('%s="%s"' % (k, str(v).replace("\\", "\\\\").replace('"', '\\"')
                                          .replace("\n", "\\n"))
                             for k, v in labels.items())


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return "%d" % value
    return repr(float(value))


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# --------------------------------------------------------------------------- endpoint

def parse_metrics_address(text: str) -> Tuple[str, Any]:
    """"unix:/PATH" -> ("unix", path); "HOST:PORT", ":PORT" or "PORT" -> ("tcp", (host,
    port)) with host loopback (127.0.0.1 when left out). UserError for anything else.
    Parsed as any listen address (vproxy.net.address), then held to these forms."""
    text = text.strip()
    if text.startswith("unix:") and not text[5:]:
        raise UserError("--metrics unix:PATH needs a path")
    try:
        address = parse_listen(text)
    except UserError:
        address = None
    # a bare path is a unix socket for parse_listen; --metrics wants it spelled unix:PATH
    if address is None or (address.kind == "unix" and not text.startswith("unix:")):
        raise UserError("--metrics %r: expected HOST:PORT, PORT or unix:PATH" % text,
                        hint="e.g. --metrics 127.0.0.1:9750")
    if address.kind == "unix":
        return "unix", address.path
    if not address.is_loopback:
        raise UserError("--metrics %s: the metrics endpoint listens on loopback or a unix "
                        "socket only (it has no authentication)" % text,
                        hint="use 127.0.0.1:PORT or unix:PATH, and let a local "
                             "Prometheus agent or an SSH tunnel carry it further")
    return "tcp", (address.host, address.port)


class MetricsServer:
    """GET /metrics and /status of one agent, on loopback TCP or a unix socket."""

    def __init__(self, agent: Any, address: str):
        self.agent = agent
        self.kind, self.where = parse_metrics_address(address)
        self._server: Optional["asyncio.base_events.Server"] = None
        self._watcher: Optional[asyncio.Task] = None
        self._connections = 0

    @property
    def addresses(self) -> List[str]:
        if self._server is None:
            return []
        out = []
        for sock in self._server.sockets or ():
            name = sock.getsockname()
            out.append("unix:%s" % name if self.kind == "unix" else format_sockname(name))
        return out

    async def start(self) -> "MetricsServer":
        try:
            if self.kind == "unix":
                path = self.where
                clear_stale_socket(path, "--metrics unix:%s" % path, "another process listens there",
                                   "stop it, or give --metrics another path")
                self._server = await asyncio.start_unix_server(
                    self._handle, path, limit=REQUEST_HEAD_LIMIT)
            else:
                host, port = self.where
                self._server = await asyncio.start_server(
                    self._handle, host, port, limit=REQUEST_HEAD_LIMIT, reuse_address=True)
        except OSError as e:
            raise UserError("cannot listen for metrics on %s: %s"
                            % (self.where, e.strerror or e)) from None
        self._watcher = asyncio.ensure_future(self._watch())
        return self

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            if self.kind == "unix":
                try:
                    os.unlink(self.where)
                except OSError:
                    pass

    async def _watch(self) -> None:
        metrics = self.agent.metrics
        while True:
            try:
                metrics.watch_vms(getattr(self.agent, "registry", None))
            except Exception:  # never let bookkeeping kill the endpoint
                log.exception("watching VMs for QMP reconnects failed")
            await asyncio.sleep(WATCH_INTERVAL)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        try:
            if self._connections > MAX_CONNECTIONS:
                return
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            except (asyncio.LimitOverrunError, ValueError):
                await self._respond(writer, 431, "text/plain", b"request head too large\n")
                return
            except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                return
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                await self._respond(writer, 400, "text/plain", b"bad request\n")
                return
            method, target = parts[0], parts[1].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                await self._respond(writer, 405, "text/plain", b"GET or HEAD only\n",
                                    extra="Allow: GET, HEAD\r\n")
                return
            if target == "/metrics":
                body = self.agent.metrics.render(self.agent).encode()
                ctype = CONTENT_TYPE
            elif target == "/status":
                body = (json.dumps(self.agent.metrics.status(self.agent), indent=1) + "\n").encode()
                ctype = "application/json"
            elif target == "/":
                body = b"vproxy agent: /metrics (Prometheus), /status (JSON)\n"
                ctype = "text/plain; charset=utf-8"
            else:
                await self._respond(writer, 404, "text/plain", b"not found: try /metrics or /status\n")
                return
            await self._respond(writer, 200, ctype, body, head_only=(method == "HEAD"))
        except Exception:
            log.exception("metrics request failed")
        finally:
            self._connections -= 1
            writer.close()

    @staticmethod
    async def _respond(writer: asyncio.StreamWriter, status: int, ctype: str, body: bytes,
                       head_only: bool = False, extra: str = "") -> None:
        reasons = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                   431: "Request Header Fields Too Large"}
        head = ("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n%s\r\n"
                % (status, reasons[status], ctype, len(body), extra))
        writer.write(head.encode("latin-1") + (b"" if head_only else body))
        try:
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (asyncio.TimeoutError, ConnectionError):
            pass


__all__ = ["Metrics", "MetricsServer", "parse_metrics_address", "build_info"]
