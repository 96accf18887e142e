"""The Python API on the client side: connect to an agent, open channels.

    async with await connect("vmhost:7443", cert=..., key=..., ca=...) as client:
        stream = await client.open("web1", "console")
        await stream.write(b"root\\n")
        print(await stream.read())
"""

import asyncio
import json
import logging
import ssl
from typing import Dict, List, Optional

from vproxy import mux
from vproxy.security import tls
from vproxy.net import transport
from vproxy.errors import SessionClosed, UserError
from vproxy.mux import OpenRequest, Priority
from vproxy.net.address import parse_address
from vproxy.net.session import Session, Stream

log = logging.getLogger("vproxy.client")

CONNECT_TIMEOUT = 10.0


class AgentClient:
    """A live session with one agent."""

    def __init__(self, session: Session, address: str):
        self.session = session
        self.address = address
        self._expiry: Optional[tls.ExpiryWatch] = None  # the agent certificate's end
        transport = session.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if ssl_object is not None and not session.closed.done():  # TLS, not the local socket
            self._watch_agent_certificate(ssl_object)

    def _watch_agent_certificate(self, ssl_object) -> None:
        """End the session when the agent's certificate expires (as the agent does with
        the client's): the handshake checked it, nothing checks it later."""
        not_after = tls.not_after(ssl_object)
        if not_after is None:
            log.warning("%s: cannot read the expiry of the agent's certificate", self.address)
            return
        self._expiry = tls.ExpiryWatch(asyncio.get_event_loop(), not_after,
                                       lambda: self._agent_certificate_expired(not_after))
        self.session.closed.add_done_callback(lambda _: self._stop_watching())

    def _stop_watching(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()  # it holds the session for up to a day
            self._expiry = None

    def _agent_certificate_expired(self, not_after: float) -> None:
        self._expiry = None
        if self.session.closed.done():
            return
        reason = "the agent's certificate %s" % tls.expiry_text(self.session.peer_identity,
                                                                 not_after)
        log.warning("%s: ending the session: %s", self.address, reason)
        self.session.close(reason)

    async def open(
        self,
        vm: str,
        channel: str,
        mode: str = "rw",
        options: Optional[Dict[str, str]] = None,
        priority: Optional[int] = None,
        timeout: float = 30.0,
    ) -> Stream:
        """Open a channel; raises vproxy.errors.ChannelRefused with the agent's reason."""
        if priority is None:
            priority = Priority.INTERACTIVE if channel.startswith("console") else Priority.BULK
        request = OpenRequest(vm, channel, mode, dict(options or {}))
        return await self.session.open(request, priority, timeout)

    async def list_vms(self) -> List[dict]:
        """The VMs this identity may open, with their channels (what `vproxy ls` shows)."""
        stream = await self.open("", "ls", "ro")
        parts = []
        while True:
            chunk = await stream.read()
            if not chunk:
                break
            parts.append(chunk)
        await stream.close()
        return json.loads(b"".join(parts))["vms"]

    async def ping(self) -> float:
        return await self.session.ping()

    async def close(self) -> None:
        self._stop_watching()
        self.session.close("client closed the session")
        await self.session.wait_closed()

    async def __aenter__(self) -> "AgentClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def connect(
    address: str,
    cert: str,
    key: str,
    ca: str,
    crl: Optional[str] = None,
    server_name: Optional[str] = None,
    timeout: float = CONNECT_TIMEOUT,
    config: Optional[mux.Config] = None,
) -> AgentClient:
    """Connect to an agent over mutual TLS. Errors are UserError with one clear sentence."""
    host, port = parse_address(address)
    context = tls.client_context(cert, key, ca, crl)
    try:
        tls_transport, session = await asyncio.wait_for(
            transport.create_connection(
                lambda: Session(client=True, config=config, name="session to %s" % address),
                host, port, context, server_name or host, handshake_timeout=timeout,
            ),
            timeout,
        )
    except asyncio.TimeoutError:
        raise UserError("no answer from the agent at %s within %.0f s" % (address, timeout),
                        hint="is `vproxy serve` running there, and the port open?") from None
    except ssl.SSLError as e:
        raise UserError("TLS with the agent at %s failed: %s" % (address, tls.describe_tls_error(e))) from None
    except OSError as e:
        raise UserError("cannot connect to the agent at %s: %s" % (address, e.strerror or e),
                        hint="is `vproxy serve` running there?") from None
    if session.closed.done():  # TLS 1.3: the agent's refusal may already have been read
        raise UserError("the agent at %s refused the session: %s" % (address, session.close_reason))
    ssl_object = tls_transport.get_extra_info("ssl_object")
    try:
        tls.check_alpn(ssl_object)
    except tls.AlpnMismatch as e:
        session.close(e.message)
        raise UserError("the agent at %s: %s" % (address, e.message)) from None
    session.peer_identity = tls.identity_of(ssl_object)
    # TLS 1.3 sends the server's verdict on our certificate after the handshake:
    # a ping round trip tells a refused certificate from a working session.
    try:
        await session.ping(timeout)
    except (SessionClosed, asyncio.TimeoutError, ConnectionError) as e:
        reason = session.close_reason or str(e)
        raise UserError("the agent at %s refused the session: %s" % (address, reason)) from None
    return AgentClient(session, address)
