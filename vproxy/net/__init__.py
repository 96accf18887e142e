"""The asyncio binding of the wire, used by both sides.

session (Session, Stream over the sans-IO vproxy.mux core), transport (TLS straight on a
non-blocking socket), address (host:port and listen addresses, unix socket files),
peercred (SO_PEERCRED), tcpinfo (TCP's own round trip). Imports vproxy.mux and
vproxy.security, never the agent, the client or the CLI.
"""
