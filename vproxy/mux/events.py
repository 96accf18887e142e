"""Events: what Connection.receive_data() and handle_timer() report to the I/O layer."""

from dataclasses import dataclass, field
from typing import Dict


class Event:
    """Base class of everything the core reports."""


@dataclass(frozen=True)
class StreamOpened(Event):
    """The peer asks to open a stream; answer with accept() or refuse()."""

    stream_id: int
    fields: Dict[str, str] = field(hash=False)
    priority: int = 0


@dataclass(frozen=True)
class StreamAccepted(Event):
    stream_id: int
    info: Dict[str, str] = field(hash=False)


@dataclass(frozen=True)
class StreamRefused(Event):
    stream_id: int
    code: int
    message: str


@dataclass(frozen=True)
class DataReceived(Event):
    """Bytes for a stream. Call acknowledge() once the application consumed them."""

    stream_id: int
    data: bytes


@dataclass(frozen=True)
class StreamEnded(Event):
    """The peer half-closed: it will send no more data on this stream."""

    stream_id: int


@dataclass(frozen=True)
class StreamReset(Event):
    """The stream is gone. remote: the peer reset it; otherwise this side did, for a
    stream error the peer made (a RESET naming it is already queued)."""

    stream_id: int
    code: int
    message: str
    remote: bool = True


@dataclass(frozen=True)
class StreamClosed(Event):
    """Both directions are finished (or the stream was reset/refused): forget it."""

    stream_id: int


@dataclass(frozen=True)
class NoticeReceived(Event):
    stream_id: int
    fields: Dict[str, str] = field(hash=False)


@dataclass(frozen=True)
class PingAcknowledged(Event):
    rtt: float  # seconds


@dataclass(frozen=True)
class GoAwayReceived(Event):
    """The peer opens no more streams and processed ours up to last_stream_id."""

    last_stream_id: int
    code: int
    message: str


@dataclass(frozen=True)
class ConnectionTerminated(Event):
    """This side ended the session (a protocol violation or a dead peer); a GOAWAY
    naming the reason is queued. Send what data_to_send() gives, then close."""

    code: int
    message: str
