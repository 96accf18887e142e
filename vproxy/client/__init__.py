"""The client side: connecting to agents and using their channels from this machine.

connection (Client, connect), local (over the agent's unix socket), config (the client's
hosts file), credentials, forward (local listeners bridged to streams), console (`vproxy
console`), terminal, vncviewer, bench. Nothing here imports the agent side.
"""
