"""What `vproxy vnc` and `vproxy forward` share: the session to the agent that comes
back after a drop, the early VM check, the wait for Ctrl-C, and where to listen.

This module imports asyncio (and, through the client, ssl): the command modules import
it inside their functions, so that --help stays fast.
"""

import asyncio
import signal
from typing import Callable, Optional

import click

from vproxy.errors import ChannelRefused, SessionClosed, UserError
from vproxy.net.address import check_listen_safety, parse_listen


def say(text: str) -> None:
    """A progress line on stderr ("vproxy: ..."); stdout carries only the address."""
    click.echo("vproxy: %s" % text, err=True)


class Link:
    """The session to the agent; a new one is made when a stream is wanted and the
    old one has ended (the agent restarted, the network dropped)."""

    def __init__(self, target):
        self.target = target
        self.client = None
        self._lock = asyncio.Lock()

    async def get(self):
        async with self._lock:
            if self.client is None or self.client.session.closed.done():
                if self.client is not None:
                    say("the session to %s ended (%s); connecting again"
                        % (self.target.name, self.client.session.close_reason))
                self.client = await self.target.connect()
            return self.client

    def opener(self, vm: str, channel: str, mode: str) -> Callable:
        async def open_stream():
            client = await self.get()
            return await client.open(vm, channel, mode)

        return open_stream

    async def close(self) -> None:
        if self.client is not None and not self.client.session.closed.done():
            await self.client.close()


async def check_vm(client, vm: str, host: str) -> None:
    """Fail early, before listening, if the agent shows this identity no such VM."""
    try:
        vms = await client.list_vms()
    except (SessionClosed, ChannelRefused) as e:
        raise UserError("listing the VMs of %s failed: %s" % (host, e)) from None
    if vm not in [v.get("vm") for v in vms]:
        raise UserError("%s has no VM %r that you may open" % (host, vm),
                        hint="vproxy ls %s shows the VMs you may open" % host)


def _resolve(future: "asyncio.Future[None]") -> None:
    if not future.done():
        future.set_result(None)


async def until_signal(also: Optional[asyncio.Future] = None) -> None:
    """Wait for SIGINT or SIGTERM (or `also` to finish)."""
    loop = asyncio.get_event_loop()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _resolve, stop)
    try:
        waiting = [stop] + ([also] if also is not None else [])
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def listen_address(listen: str, unsafe: bool):
    """--listen and --unsafe-listen -> the address to listen on, or a UserError."""
    address = parse_listen(listen)
    check_listen_safety(address, unsafe)
    return address
