"""A client over the agent's unix socket (local mode): no TLS, no certificate.

The agent knows this client by its uid (SO_PEERCRED); see vproxy.agent.local.
"""

import asyncio
from typing import Any, Optional

from vproxy.client.connection import AgentClient
from vproxy.errors import SessionClosed, UserError
from vproxy.net.peercred import peer_identity
from vproxy.net.session import Session


async def connect_local(path: str, timeout: float = 10.0, config: Any = None,
                        server_name: Optional[str] = None):
    """A vproxy.client.AgentClient over the agent's unix socket: no TLS, no certificate."""
    address = "unix:%s" % path
    loop = asyncio.get_event_loop()
    try:
        transport, session = await asyncio.wait_for(
            loop.create_unix_connection(
                lambda: Session(client=True, config=config, name="session to %s" % address), path),
            timeout)
    except asyncio.TimeoutError:
        raise UserError("no answer from the agent at %s within %.0f s" % (address, timeout)) from None
    except FileNotFoundError:
        raise UserError("no agent socket at %s" % path,
                        hint="is `vproxy serve --local-socket %s` running?" % path) from None
    except ConnectionRefusedError:
        raise UserError("nothing listens on %s (a stale socket file?)" % path,
                        hint="is `vproxy serve --local-socket %s` running?" % path) from None
    except OSError as e:
        raise UserError("cannot connect to the agent at %s: %s" % (address, e.strerror or e)) from None
    try:
        session.peer_identity = peer_identity(transport.get_extra_info("socket"))
    except (OSError, UserError):
        pass
    try:
        await session.ping(timeout)
    except (SessionClosed, asyncio.TimeoutError, ConnectionError) as e:
        reason = session.close_reason or str(e) or "no answer"
        raise UserError("the agent at %s refused the session: %s" % (address, reason)) from None
    return AgentClient(session, address)
