"""Two vproxy Sessions connected over a socketpair or over real mutual TLS."""

import asyncio
import socket
from contextlib import asynccontextmanager

from vproxy import mux
from vproxy.net.session import Session

TRANSPORTS = ["socketpair", "tls"]


@asynccontextmanager
async def session_pair(kind, pki, on_open=None, config=None, client_config=None):
    loop = asyncio.get_running_loop()
    servers = []
    if kind == "socketpair":
        a, b = socket.socketpair()
        _, server = await loop.create_connection(lambda: Session(False, config, on_open), sock=b)
        _, client = await loop.create_connection(lambda: Session(True, client_config or config), sock=a)
    else:
        accepted = loop.create_future()

        def factory():
            s = Session(False, config, on_open)
            if not accepted.done():
                accepted.set_result(s)
            return s

        srv = await loop.create_server(factory, "127.0.0.1", 0, ssl=pki.server_context())
        servers.append(srv)
        port = srv.sockets[0].getsockname()[1]
        _, client = await loop.create_connection(
            lambda: Session(True, client_config or config), "127.0.0.1", port,
            ssl=pki.client_context(pki.alice), server_hostname="localhost")
        server = await asyncio.wait_for(accepted, 5)
        await server.ready
    try:
        yield client, server
    finally:
        client.close()
        server.close()
        for srv in servers:
            srv.close()
            await srv.wait_closed()


async def echo_handler(stream):
    """Accept everything; echo, or refuse channel "nope", or reset channel "reset"."""
    if stream.request.channel == "nope":
        stream.refuse(mux.RefuseCode.NO_SUCH_CHANNEL, "no channel called nope")
        return
    stream.accept({"hello": "world"})
    if stream.request.channel == "reset":
        stream.reset(mux.ResetCode.CHANNEL_GONE, "VM web1 went away")
        return
    if stream.request.channel == "notice":
        stream.notify({"event": "writer-changed", "writer": "bob"})
    if stream.request.channel == "stall":
        await asyncio.sleep(3600)  # never reads
    while True:
        chunk = await stream.read()
        if not chunk:
            break
        await stream.write(chunk)
    await stream.close()
