"""Channels that need no QEMU: for checking a link and measuring the mux.

    sink    reads everything; when the client half-closes, answers with the byte
            count it received (decimal text) and closes
    source  writes `bytes` bytes (option, default unlimited until the client resets)
    echo    writes back everything it reads; half-closes when the client does

Who may open them is the agent's business (AgentConfig.builtin_channels).
"""

from typing import Any, Callable, Dict, List

from vproxy.errors import ChannelRefused
from vproxy.mux import OpenRequest, RefuseCode

from .channels import Channel, PeerIdentity

NAMES = ("sink", "source", "echo")
_BLOCK = b"\0" * (256 * 1024)


class _Builtin:
    def __init__(self, request: OpenRequest):
        self.request = request
        self.info: Dict[str, str] = {}


class Sink(_Builtin):
    async def run(self, stream) -> None:
        total = 0
        while True:
            chunk = await stream.read(1 << 20)
            if not chunk:
                break
            total += len(chunk)
        await stream.write(str(total).encode())
        await stream.close()


class Source(_Builtin):
    async def run(self, stream) -> None:
        left = int(self.request.options.get("bytes", "-1"))
        while left != 0:
            block = _BLOCK if left < 0 or left >= len(_BLOCK) else _BLOCK[:left]
            await stream.write(block)
            if left > 0:
                left -= len(block)
        await stream.close()


class Echo(_Builtin):
    async def run(self, stream) -> None:
        while True:
            chunk = await stream.read(1 << 20)
            if not chunk:
                break
            await stream.write(chunk)
        await stream.close()


class BuiltinProvider:
    """The provider of the built-in channels (requests with an empty VM name)."""

    _kinds: Dict[str, Callable[[OpenRequest], Channel]] = {
        "sink": Sink, "source": Source, "echo": Echo}

    async def open(self, request: OpenRequest, identity: PeerIdentity) -> Channel:
        kind = self._kinds.get(request.channel)
        if kind is None:
            raise ChannelRefused(
                RefuseCode.NO_SUCH_CHANNEL,
                "no built-in channel %r (there are: %s)" % (request.channel, ", ".join(NAMES)),
            )
        if request.channel == "source":
            try:
                int(request.options.get("bytes", "-1"))
            except ValueError:
                raise ChannelRefused(RefuseCode.BAD_REQUEST, "option bytes must be an integer") from None
        return kind(request)

    async def describe(self) -> List[Dict[str, Any]]:
        return []
