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

__all__ = [name for name in dir() if not name.startswith("_")]
