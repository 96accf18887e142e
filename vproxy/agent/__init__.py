"""The agent (`vproxy serve`): the VM host side.

server (Agent: listeners, authorization, dispatch, audit), session (one client's
session), local (the unix socket, clients known by uid), acl, config, reload, metrics,
builtin (sink, source, echo), channels (the contracts: providers, channels,
identities, listeners as types), logs, sdnotify, memory, and qemu/ (the VM channels).
Only this package imports vproxy.agent.qemu; nothing here imports the client side.
"""
