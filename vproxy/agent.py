"""`vproxy serve`: accept mTLS sessions, authorize each open, hand it to a provider.

The agent owns no channel logic itself: built-in channels (sink, source, echo) come
from vproxy.builtin, VM channels from vproxy.qemu. For each open it writes one audit
line: identity, VM, channel, mode, result, bytes each way, duration.
"""

import asyncio
import logging
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from . import memory, mux, tls, transport
from .acl import BUILTIN_POLICIES
from .errors import ChannelRefused, SessionClosed, StreamReset
from .metrics import Metrics
from .mux import RefuseCode
from .session import Session, Stream

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
    metrics: Optional[str] = None  # serve /metrics and /status here (vproxy.metrics)
    max_sessions: int = 4096  # more concurrent sessions are ended at once with a reason
    max_sessions_per_identity: Optional[int] = None  # the same, per identity (None: no limit)
    max_sessions_per_address: Optional[int] = None  # the same, per source IP (not local ones)
    builtin_channels: str = "everyone"  # who may open sink/source/echo: BUILTIN_POLICIES
    resume_prelaunch: bool = False  # `cont` a VM found in prelaunch (-S) after the takeover


class AgentSession(Session):
    """A Session whose peer identity comes from its TLS client certificate."""

    def __init__(self, agent: "Agent"):
        super().__init__(client=False, config=agent.config.mux_config,
                         on_open=self._dispatch, name="session")
        self.agent = agent
        self._identity_key: Any = None
        self._address_key: Optional[str] = None  # the peer's IP; None on the local socket
        self._not_after: Optional[float] = None  # the client certificate's, epoch seconds
        self._expiry_timer: Optional[tls.ExpiryWatch] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        peer = transport.get_extra_info("peername")
        try:
            if ssl_object is not None:
                tls.check_alpn(ssl_object)
                self.peer_identity = tls.identity_of(ssl_object)
                self.agent.judge_late_handshake(ssl_object)
        except tls.TlsError as e:
            log.warning("refused connection from %s: %s", peer, e)
            self.agent.metrics.handshake_failed()
            transport.abort()
            return
        self.name = "session %s from %s" % (self.peer_identity, self.peer_label(peer))
        agent = self.agent
        limit = agent.config.max_sessions
        per_identity = agent.config.max_sessions_per_identity
        per_address = agent.config.max_sessions_per_address
        key = _identity_key(self.peer_identity)
        address = _address_key(peer)
        if len(agent.sessions) >= limit:
            self._refuse("too many sessions: this agent serves at most %d at once" % limit,
                         transport)
            return
        if per_identity is not None and agent.sessions_per_identity.get(key, 0) >= per_identity:
            self._refuse("too many sessions for %s: this agent serves at most %d at once "
                         "per identity" % (self.peer_identity, per_identity), transport)
            return
        if (per_address is not None and address is not None
                and agent.sessions_per_address.get(address, 0) >= per_address):
            self._refuse("too many sessions from %s: this agent serves at most %d at once "
                         "per source address" % (address, per_address), transport)
            return
        log.info("%s: connected", self.name)
        agent.sessions.add(self)
        agent.sessions_per_identity[key] = agent.sessions_per_identity.get(key, 0) + 1
        self._identity_key = key
        if address is not None:
            agent.sessions_per_address[address] = agent.sessions_per_address.get(address, 0) + 1
            self._address_key = address
        self.closed.add_done_callback(lambda _: self._gone())
        super().connection_made(transport)
        if ssl_object is not None:
            self._watch_expiry(ssl_object)

    def _refuse(self, message: str, transport: asyncio.BaseTransport) -> None:
        """Too many sessions: GOAWAY OVERLOADED with message, then close."""
        super().connection_made(transport)
        log.warning("%s: refused: %s", self.name, message)
        self._conn.goaway(mux.ErrorCode.OVERLOADED, message)
        self.close(message)

    def peer_label(self, peer) -> str:
        return _addr(peer)

    def _gone(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()  # it holds the session for up to a day
            self._expiry_timer = None
        self.agent.sessions.discard(self)
        _uncount(self.agent.sessions_per_identity, self._identity_key)
        if self._address_key is not None:
            _uncount(self.agent.sessions_per_address, self._address_key)
        if not self.agent.sessions:
            self.agent.idle()
        log.info("%s: closed: %s", self.name, self.close_reason)

    async def _dispatch(self, stream: Stream) -> None:
        await self.agent.serve_stream(self, stream)

    def end(self, message: str) -> None:
        """End the session now (not a drain): GOAWAY SHUTDOWN with message, then close."""
        log.warning("%s: ending the session: %s", self.name, message)
        self._conn.goaway(mux.ErrorCode.SHUTDOWN, message)
        self.close(message)

    # -- the end of the peer's certificate -----------------------------------------------

    def _watch_expiry(self, ssl_object) -> None:
        """End the session when the client certificate it was admitted with expires."""
        self._not_after = tls.not_after(ssl_object)
        if self._not_after is None:
            log.warning("%s: cannot read the expiry of the peer's certificate", self.name)
            return
        self._expiry_timer = tls.ExpiryWatch(self._loop, self._not_after, self._expired)

    def _expired(self) -> None:
        self._expiry_timer = None
        if self.closed.done():
            return
        self.end("your certificate %s" % tls.expiry_text(self.peer_identity, self._not_after))


class Agent:
    def __init__(self, config: AgentConfig, providers: Optional[dict] = None, acl: Any = None):
        """providers: maps "" (built-ins) and "vm" to provider objects."""
        if config.builtin_channels not in BUILTIN_POLICIES:
            raise ValueError("builtin_channels must be one of %s, not %r"
                             % (", ".join(BUILTIN_POLICIES), config.builtin_channels))
        self.config = config
        from .builtin import BuiltinProvider

        self.providers = {"": BuiltinProvider()}
        self.providers.update(providers or {})
        self.acl = acl
        self.registry = None  # vproxy.qemu.vms.VMRegistry, when VMs are configured
        self.sessions: "set[AgentSession]" = set()
        self.sessions_per_identity: Dict[Any, int] = {}  # live sessions of each identity
        self.sessions_per_address: Dict[str, int] = {}  # live TLS sessions of each source IP
        self.streams: "set[Stream]" = set()  # accepted and not yet ended (reload, metrics)
        self.metrics = Metrics()
        self.metrics_server = None  # vproxy.metrics.MetricsServer, with config.metrics
        self.draining = False
        self._servers: List[transport.Server] = []
        self._ssl: Optional[ssl.SSLContext] = None
        self._trust = None  # vproxy.crl.Trust after a reload: judges late handshakes
        self._reload_lock: Optional[asyncio.Lock] = None
        self._release_timer: Optional[asyncio.TimerHandle] = None

    @property
    def addresses(self) -> List[str]:
        out = []
        for server in self._servers:
            for sock in server.sockets:
                if sock.family == getattr(socket, "AF_UNIX", None):
                    out.append("unix:%s" % sock.getsockname())
                else:
                    out.append(_addr(sock.getsockname()))
        return out

    async def start(self) -> None:
        c = self.config
        if c.cert or not c.local_socket:  # local mode alone needs no certificate
            self._ssl = tls.server_context(c.cert, c.key, c.ca, c.crl)
        if (c.vms or c.vm_dir) and "vm" not in self.providers:
            from .qemu.provider import QemuProvider
            from .qemu.vms import VMRegistry

            self.registry = VMRegistry(c.vms, c.vm_dir, ring_size=c.console_ring,
                                       log_dir=c.console_log_dir,
                                       resume_prelaunch=c.resume_prelaunch)
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
            from .localmode import start_local_server

            self._servers.append(await start_local_server(self, c.local_socket))
        self.metrics.watch_vms(self.registry)
        if c.metrics:
            from .metrics import MetricsServer

            self.metrics_server = await MetricsServer(self, c.metrics).start()

    def idle(self) -> None:
        """The last session ended: if the agent is still without sessions after
        RELEASE_DELAY, give the heap of the burst back to the OS (vproxy.memory)."""
        if self._release_timer is None:
            self._release_timer = asyncio.get_event_loop().call_later(RELEASE_DELAY, self._release)

    def _release(self) -> None:
        self._release_timer = None
        if not self.sessions:
            memory.release()

    def _handshake_failed(self, peer, exc: BaseException) -> None:
        self.metrics.handshake_failed()
        log.warning("refused connection from %s: %s", _addr(peer), tls.describe_tls_error(exc))

    def judge_late_handshake(self, ssl_object) -> None:
        """A handshake that began before a reload finished with the old SSLContext:
        raise TlsError if the reloaded CA or CRL would have refused it."""
        if self._trust is not None and ssl_object.context is not self._ssl:
            from .reload import stale_session_reason

            why = stale_session_reason(ssl_object, self._trust)
            if why is not None:
                raise tls.TlsError(why)

    async def reload(self, settings):
        """Apply new settings (a vproxy.reload.Settings, or a callable returning one)
        without dropping sessions that are still allowed. Raises UserError and keeps
        the previous settings if anything is wrong; returns a vproxy.reload.Outcome."""
        from . import reload as reloading
        from .errors import UserError

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

    async def listing(self, identity) -> List[dict]:
        """What `vproxy ls` shows this identity: the VMs the ACL lets it open anything on."""
        provider = self.providers.get("vm")
        if provider is None:
            return []
        vms = await provider.describe()
        if self.acl is None:
            return []
        visible = set(self.acl.visible_vms(identity, [vm["vm"] for vm in vms]))
        return [vm for vm in vms if vm["vm"] in visible]

    async def serve_stream(self, session: AgentSession, stream: Stream) -> None:
        request = stream.request
        identity = session.peer_identity
        started = time.monotonic()
        result = "ok"
        try:
            if not request.vm and request.channel == "ls":
                channel = ListingChannel(await self.listing(identity))
                stream.accept(channel.info)
                self.metrics.opened()
                await channel.run(stream)
                return
            acl = self.acl
            if request.vm:  # before anything else: say nothing about VMs to strangers
                self._authorize(identity, request)
            else:
                self._authorize_builtin(identity, request)
            provider = self.providers.get("" if not request.vm else "vm")
            if provider is None:
                raise ChannelRefused(RefuseCode.NO_SUCH_VM,
                                     "this agent serves no VMs (no QEMU configured)")
            channel = await provider.open(request, identity)
            if self.acl is not acl:  # reloaded meanwhile: ask the new ACL
                if request.vm:
                    self._authorize(identity, request)
                else:
                    self._authorize_builtin(identity, request)
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
        except (StreamReset, SessionClosed) as e:
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

    def _authorize(self, identity, request) -> None:
        if self.acl is None:
            raise ChannelRefused(RefuseCode.FORBIDDEN,
                                 "%s may not open %s: this agent has no ACL" % (identity, request.describe()))
        self.acl.check(identity, request)

    def _authorize_builtin(self, identity, request) -> None:
        """builtin_channels: raise ChannelRefused(FORBIDDEN) if `identity` may not open
        the built-in channel of `request` (names that are no built-in channel pass: the
        provider says there is no such channel)."""
        from .builtin import NAMES

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
            extra={"fields": {  # for --log-format json (vproxy.ops)
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
        import json

        await stream.write(json.dumps({"vms": self.vms}).encode())
        await stream.close()


def _uncount(counts: Dict[Any, int], key: Any) -> None:
    """One session of `key` less; a key with none left goes (the dict stays small)."""
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def _quote(text: str) -> str:
    """Audit fields are space-separated: keep hostile names on one line, unambiguous."""
    if text and all(33 <= ord(c) < 127 and c not in '"\\' for c in text):
        return text
    return '"%s"' % text.encode("unicode_escape").decode("ascii").replace('"', '\\"')


def _identity_key(identity) -> Tuple[str, str]:
    """Sessions of one identity, for max_sessions_per_identity: as audit lines name it
    (a certificate's CN or first SAN; a local uid), never mixing TLS and local peers."""
    return (type(identity).__name__, str(identity))


def _address_key(peer) -> Optional[str]:
    """Sessions from one source address, for max_sessions_per_address: the peer's IP as
    the socket gives it (an IPv4 client of a dual-stack listener is ::ffff:a.b.c.d, the
    same each time); None for a peer without one (the local unix socket)."""
    if isinstance(peer, tuple) and peer and isinstance(peer[0], str) and peer[0]:
        return peer[0]
    return None


def _addr(sockname) -> str:
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        host = sockname[0]
        return ("[%s]:%d" if ":" in host else "%s:%d") % (host, sockname[1])
    return str(sockname)
