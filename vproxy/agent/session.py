"""One client's session on the agent: admission (limits, ALPN, identity), expiry, dispatch.

A session admitted here hands every stream its client opens to its Agent
(Agent.serve_stream); the agent authorizes it and finds the channel.
"""

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple, cast

from vproxy import mux
from vproxy.net.address import format_sockname
from vproxy.net.session import Session, Stream
from vproxy.security import tls

if TYPE_CHECKING:
    from vproxy.agent.server import Agent

log = logging.getLogger("vproxy.agent")


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
            cast(asyncio.Transport, transport).abort()
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
        return format_sockname(peer)

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
        self._expiry_timer = tls.ExpiryWatch(self.loop, self._not_after, self._expired)

    def _expired(self) -> None:
        self._expiry_timer = None
        if self.closed.done() or self._not_after is None:
            return
        self.end("your certificate %s" % tls.expiry_text(self.peer_identity, self._not_after))


def _uncount(counts: Dict[Any, int], key: Any) -> None:
    """One session of `key` less; a key with none left goes (the dict stays small)."""
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


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
