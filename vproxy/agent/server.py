"""`vproxy serve`: accept mTLS sessions, authorize each open, hand it to a provider.

The agent owns no channel logic itself: built-in channels (sink, source, echo) come
from vproxy.agent.builtin, VM channels from vproxy.agent.qemu. For each open it writes one audit
line: identity, VM, channel, mode, result, bytes each way, duration.
"""

import asyncio
import json
import logging
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from . import memory
from vproxy import mux
from vproxy.security import tls
from vproxy.net import transport
from . import reload as reloading
from .acl import BUILTIN_POLICIES
from .builtin import NAMES, BuiltinProvider
from vproxy.errors import ChannelRefused, SessionClosed, StreamResetError, UserError
from .channels import Channel, ChannelProvider, Listener, PeerIdentity
from .metrics import Metrics, MetricsServer
from .reload import stale_session_reason
from vproxy.mux import OpenRequest, RefuseCode
from vproxy.net.address import format_sockname
from vproxy.net.session import Stream
from vproxy.security.crl import Trust
from .session import AgentSession
from .local import start_local_server

if TYPE_CHECKING:  # imported when needed: an agent without VMs loads no QEMU code
    from .qemu.vms import VMRegistry

log = logging.getLogger("vproxy.agent")
audit_log = logging.getLogger("vproxy.audit")

HANDSHAKE_TIMEOUT = 5.0  # a TLS handshake that takes longer is dropped
RELEASE_DELAY = 15.0  # idle this long after the last session ended: memory.release().
# Not at once: clients that reconnect right away would make every drop to zero
# sessions pay for a trim (40-65 ms of a blocked loop after 1,000 sessions).


@dataclass
class AgentConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 7443
    cert: str = ""
    key: str = ""
    ca: str = ""
    crl: Optional[str] = None
    mux_config: Optional[mux.Config] = None
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    vms: List[Tuple[str, str]] = field(default_factory=list)  # (name, QMP socket path)
    vm_dir: Optional[str] = None  # every socket NAME.qmp in it is VM NAME
    console_ring: int = 1 << 20  # bytes of history per console
    console_log_dir: Optional[str] = None
    local_socket: Optional[str] = None  # also listen here, clients known by uid (localmode)
    drain_timeout: float = 10.0  # on shutdown: how long open streams may finish
    metrics: Optional[str] = None  # serve /metrics and /status here (vproxy.agent.metrics)
    max_sessions: int = 4096  # more concurrent sessions are ended at once with a reason
    max_sessions_per_identity: Optional[int] = None  # the same, per identity (None: no limit)
    max_sessions_per_address: Optional[int] = None  # the same, per source IP (not local ones)
    builtin_channels: str = "everyone"  # who may open sink/source/echo: BUILTIN_POLICIES
    resume_prelaunch: bool = False  # `cont` a VM found in prelaunch (-S) after the takeover
    qmp: str = "exclusive"  # QMP mode of every VM: "exclusive" or "shared" (vproxy.agent.qemu.monitor)
    adopt: Tuple[str, ...] = ("pty", "socket")  # chardevs made by others that consoles and guest channels adopt
    # per configured VM (by name), its own qmp_mode and adopt over the two above
    vm_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)


class Agent:
    def __init__(self, config: AgentConfig,
                 providers: Optional[Dict[str, ChannelProvider]] = None, acl: Any = None):
        """providers: maps "" (built-ins) and "vm" to provider objects."""
        if config.builtin_channels not in BUILTIN_POLICIES:
            raise ValueError("builtin_channels must be one of %s, not %r"
                             % (", ".join(BUILTIN_POLICIES), config.builtin_channels))
        self.config = config
        self.providers: Dict[str, ChannelProvider] = {"": BuiltinProvider()}
        self.providers.update(providers or {})
        self.acl = acl
        self.registry: Optional[VMRegistry] = None  # when VMs are configured
        self.sessions: "set[AgentSession]" = set()
        self.sessions_per_identity: Dict[Any, int] = {}  # live sessions of each identity
        self.sessions_per_address: Dict[str, int] = {}  # live TLS sessions of each source IP
        self.streams: "set[Stream]" = set()  # accepted and not yet ended (reload, metrics)
        self.metrics = Metrics()
        self.metrics_server: Optional[MetricsServer] = None  # with config.metrics
        self.draining = False
        self._servers: List[Listener] = []
        self._ssl: Optional[ssl.SSLContext] = None
        self._trust: Optional[Trust] = None  # after a reload: judges late handshakes
        self._reload_lock: Optional[asyncio.Lock] = None
        self._release_timer: Optional[asyncio.TimerHandle] = None

    @property
    def listeners(self) -> List[Listener]:
        """What the agent listens on: its TLS server, its local socket."""
        return list(self._servers)

    @property
    def uses_tls(self) -> bool:
        """True unless the agent listens on its local socket alone."""
        return self._ssl is not None

    def use_tls(self, context: ssl.SSLContext, trust: Optional[Trust]) -> None:
        """New handshakes get `context` from now on (reload); a handshake that began
        before finishes with the old one and is judged by `trust` (the new CA and
        CRL) when it arrives (judge_late_handshake)."""
        self._ssl = context
        self._trust = trust
        for server in self._servers:
            if isinstance(server, transport.Server):
                server.set_context(context)

    @property
    def addresses(self) -> List[str]:
        out = []
        for server in self._servers:
            for sock in server.sockets:
                if sock.family == getattr(socket, "AF_UNIX", None):
                    out.append("unix:%s" % sock.getsockname())
                else:
                    out.append(format_sockname(sock.getsockname()))
        return out

    async def start(self) -> None:
        c = self.config
        if c.cert or not c.local_socket:  # local mode alone needs no certificate
            self._ssl = tls.server_context(c.cert, c.key, c.ca, c.crl)
        if (c.vms or c.vm_dir) and "vm" not in self.providers:
            # lazy: qemu.qmp only when the agent serves VMs
            from vproxy.agent.qemu.provider import QemuProvider
            from vproxy.agent.qemu.vms import VMRegistry

            self.registry = VMRegistry(c.vms, c.vm_dir, ring_size=c.console_ring,
                                       log_dir=c.console_log_dir,
                                       resume_prelaunch=c.resume_prelaunch, qmp_mode=c.qmp,
                                       adopt=c.adopt, vm_options=c.vm_options)
            await self.registry.start()
            self.providers["vm"] = QemuProvider(self.registry)
        if self._ssl is not None:
            server = await transport.start_server(
                lambda: AgentSession(self), c.listen_host, c.listen_port, self._ssl,
                handshake_timeout=c.handshake_timeout,
                on_handshake_error=self._handshake_failed,
            )
            self._servers.append(server)
        if c.local_socket:
            self._servers.append(await start_local_server(self, c.local_socket))
        self.metrics.watch_vms(self.registry)
        if c.metrics:
            self.metrics_server = await MetricsServer(self, c.metrics).start()

    def idle(self) -> None:
        """The last session ended: if the agent is still without sessions after
        RELEASE_DELAY, give the heap of the burst back to the OS (vproxy.agent.memory)."""
        if self._release_timer is None:
            self._release_timer = asyncio.get_event_loop().call_later(RELEASE_DELAY, self._release)

    def _release(self) -> None:
        self._release_timer = None
        if not self.sessions:
            memory.release()

    def _handshake_failed(self, peer, exc: BaseException) -> None:
        self.metrics.handshake_failed()
        log.warning("refused connection from %s: %s", format_sockname(peer), tls.describe_tls_error(exc))

    def judge_late_handshake(self, ssl_object) -> None:
        """A handshake that began before a reload finished with the old SSLContext:
        raise TlsError if the reloaded CA or CRL would have refused it."""
        if self._trust is not None and ssl_object.context is not self._ssl:
            why = stale_session_reason(ssl_object, self._trust)
            if why is not None:
                raise tls.TlsError(why)

    async def reload(self, settings):
        """Apply new settings (a vproxy.agent.reload.Settings, or a callable returning one)
        without dropping sessions that are still allowed. Raises UserError and keeps
        the previous settings if anything is wrong; returns a vproxy.agent.reload.Outcome."""
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            try:
                prepared = reloading.prepare(self, settings() if callable(settings) else settings)
            except UserError as e:
                self.metrics.reloaded(False, e.message)
                raise
            outcome = await reloading.apply(self, prepared)
            self.metrics.reloaded(True, outcome.summary())
            return outcome

    async def shutdown(self, message: str = "the agent is shutting down",
                       drain_timeout: Optional[float] = None) -> None:
        """Stop listening, send GOAWAY to every session, let open streams drain (for
        config.drain_timeout seconds unless drain_timeout is given)."""
        if drain_timeout is None:
            drain_timeout = self.config.drain_timeout
        self.draining = True
        for server in self._servers:
            server.close()
        sessions = list(self.sessions)
        if sessions:
            await asyncio.gather(*(s.goaway(message, drain_timeout) for s in sessions),
                                 return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        if self.registry is not None:
            await self.registry.stop()
        if self.metrics_server is not None:
            await self.metrics_server.close()

    async def listing(self, identity: PeerIdentity) -> List[Dict[str, Any]]:
        """What `vproxy ls` shows this identity: the VMs the ACL lets it open anything on."""
        provider = self.providers.get("vm")
        if provider is None:
            return []
        vms = await provider.describe()
        if self.acl is None:
            return []
        visible = set(self.acl.visible_vms(identity, [vm["vm"] for vm in vms],
                                           {vm["vm"]: vm.get("aliases", ()) for vm in vms}))
        return [vm for vm in vms if vm["vm"] in visible]

    async def serve_stream(self, session: AgentSession, stream: Stream) -> None:
        request = stream.request
        identity: PeerIdentity = session.peer_identity
        started = time.monotonic()
        result = "ok"
        try:
            if not request.vm and request.channel == "ls":
                channel: Channel = ListingChannel(await self.listing(identity))
                stream.accept(channel.info)
                self.metrics.opened()
                await channel.run(stream)
                return
            acl = self.acl
            if request.vm and self.registry is not None:  # web1 may be known as 100 for now
                await self.registry.wait_named(request.vm)
            vm_names = self.vm_names(request.vm)
            if request.vm:  # before anything else: say nothing about VMs to strangers
                self._authorize(identity, request)
            else:
                self.authorize_builtin(identity, request)
            provider = self.providers.get("" if not request.vm else "vm")
            if provider is None:
                raise ChannelRefused(RefuseCode.NO_SUCH_VM,
                                     "this agent serves no VMs (no QEMU configured)")
            channel = await provider.open(request, identity)
            # reloaded meanwhile, or the name now means another VM: ask again
            if self.acl is not acl or self.vm_names(request.vm) != vm_names:
                if request.vm:
                    self._authorize(identity, request)
                else:
                    self.authorize_builtin(identity, request)
        except ChannelRefused as e:
            result = "refused: %s" % e.message
            stream.refuse(e.code, e.message)
            self.metrics.refused(e.code)
            self._audit(identity, request, result, stream, started)
            return
        stream.accept(channel.info)
        self.metrics.opened()
        self.streams.add(stream)
        try:
            await channel.run(stream)
            if stream.error is not None:  # the channel reset it, e.g. QEMU went away
                result = "ended: %s" % stream.error
        except (StreamResetError, SessionClosed) as e:
            result = "ended: %s" % e
        except asyncio.CancelledError:
            result = "ended: session closed"
            raise
        finally:
            if not stream.closed and not stream.local_ended:
                stream.reset(mux.ResetCode.CANCEL, "channel ended")
            self.streams.discard(stream)
            self.metrics.stream_ended(stream)
            self._audit(identity, request, result, stream, started)

    def vm_names(self, vm: str) -> Tuple[str, ...]:
        """Every name of the VM a request for *vm* opens (its name and aliases): the
        ACL matches its rules against all of them (vproxy.agent.acl)."""
        if not vm or self.registry is None:
            return (vm,)
        return self.registry.names_of(vm)

    def _authorize(self, identity: PeerIdentity, request: OpenRequest) -> None:
        if self.acl is None:
            raise ChannelRefused(RefuseCode.FORBIDDEN,
                                 "%s may not open %s: this agent has no ACL" % (identity, request.describe()))
        self.acl.check(identity, request, self.vm_names(request.vm))

    def authorize_builtin(self, identity: PeerIdentity, request: OpenRequest) -> None:
        """builtin_channels: raise ChannelRefused(FORBIDDEN) if `identity` may not open
        the built-in channel of `request` (names that are no built-in channel pass: the
        provider says there is no such channel)."""
        policy = self.config.builtin_channels
        if policy == "everyone" or request.channel not in NAMES:
            return
        if policy == "acl":
            if self.acl is not None and self.acl.allows_bench(identity, request.channel):
                return
            why = 'builtin_channels = acl and no [[allow]] grants "bench"'
        else:
            why = "builtin_channels = %s" % policy
        raise ChannelRefused(RefuseCode.FORBIDDEN, "built-in channel %s is not open to %s on "
                             "this agent (%s)" % (request.channel, identity, why))

    def _audit(self, identity, request, result, stream: Stream, started: float) -> None:
        # built-in channels (bench traffic) are not access to a VM: debug level only,
        # but a refusal is worth a line like any other
        level = logging.INFO if request.vm or result.startswith("refused") else logging.DEBUG
        duration = time.monotonic() - started
        audit_log.log(level,
            "identity=%s vm=%s channel=%s mode=%s result=%r in=%d out=%d duration=%.3f",
            _quote(str(identity)), _quote(request.vm or "-"), _quote(request.channel), request.mode,
            result, stream.bytes_in, stream.bytes_out, duration,
            extra={"fields": {  # for --log-format json (vproxy.agent.logs)
                "identity": str(identity), "vm": request.vm, "channel": request.channel,
                "mode": request.mode, "result": result, "bytes_in": stream.bytes_in,
                "bytes_out": stream.bytes_out, "duration": round(duration, 3)}},
        )


class ListingChannel:
    """The built-in channel "ls": one JSON document describing the VMs, then EOF."""

    def __init__(self, vms: List[dict]):
        self.vms = vms
        self.info = {"format": "json"}

    async def run(self, stream: Stream) -> None:
        await stream.write(json.dumps({"vms": self.vms}).encode())
        await stream.close()


def _quote(text: str) -> str:
    """Audit fields are space-separated: keep hostile names on one line, unambiguous."""
    if text and all(33 <= ord(c) < 127 and c not in '"\\' for c in text):
        return text
    return '"%s"' % text.encode("unicode_escape").decode("ascii").replace('"', '\\"')
