"""Codes carried on the wire and the core's exceptions.

    ProtocolError            a violation of the vproxy/1 protocol (code: ErrorCode)
     +-- RemoteProtocolError the peer sent something invalid; the session ends with GOAWAY
     |    +-- FrameError     bytes that do not decode as a frame
     +-- LocalProtocolError  this side misused the API (e.g. sent on a closed stream)

The rule (after HTTP/2): a fault that breaks the shared state of the session is a
RemoteProtocolError and ends the session with a GOAWAY naming it; a fault that concerns
one stream only resets that stream with a ResetCode and the session lives on.
"""

from enum import IntEnum


class ErrorCode(IntEnum):
    """Why a session ends: carried in GOAWAY."""

    NO_ERROR = 0  # graceful shutdown
    PROTOCOL_ERROR = 1  # a frame that is not allowed where it came
    FRAME_SIZE_ERROR = 2  # a frame longer than the maximum, or a payload of the wrong size
    FLOW_CONTROL_ERROR = 3  # data beyond the granted window, or a window overflow
    STREAM_LIMIT = 4  # (unused in GOAWAY; kept for symmetry with RefuseCode)
    KEEPALIVE_TIMEOUT = 5  # the peer stopped answering pings
    INTERNAL_ERROR = 6  # a bug on the sender's side
    SHUTDOWN = 7  # the agent is going down (after drain)
    OVERLOADED = 8  # the peer sends requests (PING, OPEN) and does not read the answers


class RefuseCode(IntEnum):
    """Why an OPEN was refused: carried in REFUSE, together with a human message."""

    NO_SUCH_VM = 1
    NO_SUCH_CHANNEL = 2
    FORBIDDEN = 3
    BUSY = 4
    UNAVAILABLE = 5
    BAD_REQUEST = 6
    TOO_MANY_STREAMS = 7
    GOING_AWAY = 8
    INTERNAL = 9


class ResetCode(IntEnum):
    """Why a stream was reset: carried in RESET."""

    CANCEL = 0  # the sender is no longer interested
    STREAM_CLOSED = 1  # a frame arrived for a half-closed direction
    FLOW_CONTROL = 2  # (reserved)
    CHANNEL_GONE = 3  # the VM or channel behind the stream went away
    READ_ONLY = 4  # input sent on a read-only stream
    INTERNAL = 5  # a failure of the sender


class ProtocolError(Exception):
    """A violation of the vproxy/1 protocol."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol."""


class FrameError(RemoteProtocolError):
    """Bytes that do not decode as a valid frame."""


class LocalProtocolError(ProtocolError):
    """This side used the core in a way the protocol does not allow."""
