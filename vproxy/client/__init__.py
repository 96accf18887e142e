"""The client side: connecting to agents and using their channels from this machine.

connection (AgentClient, connect), local (over the agent's unix socket), config (the client's
hosts file), credentials, forward (local listeners bridged to streams), console (`vproxy
console`), terminal, vncviewer, bench. Nothing here imports the agent side.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    """`from vproxy.client import connect, AgentClient`, as docs/API.md documents, without
    making every `import vproxy.client.X` load asyncio and ssl (lazy: start-up time)."""
    if name in ("connect", "AgentClient"):
        from vproxy.client import connection  # lazy: asyncio and ssl on first use

        return getattr(connection, name)
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
