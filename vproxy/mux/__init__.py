"""The vproxy/1 multiplexing protocol, sans I/O: this package imports neither asyncio nor
ssl, does no I/O of its own and reads no clock (the caller passes the time in).

Bytes in through Connection.receive_data(), events out; actions queue frames that
Connection.data_to_send() returns. The wire format is in man/vproxy-protocol.7.
"""

from .connection import Config, Connection, StreamState
from .errors import (
    ErrorCode,
    FrameError,
    LocalProtocolError,
    ProtocolError,
    RefuseCode,
    RemoteProtocolError,
    ResetCode,
)
from .events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    GoAwayReceived,
    NoticeReceived,
    PingAcknowledged,
    StreamAccepted,
    StreamClosed,
    StreamEnded,
    StreamOpened,
    StreamRefused,
    StreamReset,
)
from .request import BadRequest, OpenRequest
from .frames import MAX_PAYLOAD, Frame, FrameDecoder, FrameType, Priority

ALPN = "vproxy/1"

# spelled out, not computed: a type checker reads this list to know what is exported
__all__ = [
    "ALPN", "BadRequest", "Config", "Connection", "ConnectionTerminated", "DataReceived",
    "ErrorCode", "Event", "Frame", "FrameDecoder", "FrameError", "FrameType",
    "GoAwayReceived", "LocalProtocolError", "MAX_PAYLOAD", "NoticeReceived", "OpenRequest",
    "PingAcknowledged", "Priority", "ProtocolError", "RefuseCode", "RemoteProtocolError",
    "ResetCode", "StreamAccepted", "StreamClosed", "StreamEnded", "StreamOpened",
    "StreamRefused", "StreamReset", "StreamState",
]
