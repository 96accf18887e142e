"""The vproxy/1 frame codec: bytes <-> Frame objects, nothing else.

Every frame is a 9-byte header followed by a payload (man/vproxy-protocol.7):

    length u24 | type u8 | flags u8 | stream id u32      (big-endian)

Payload layouts per type are encoded and decoded here and only here, so the
connection logic never touches struct offsets.
"""

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Dict, List, Optional, Tuple

from .errors import FrameError, ErrorCode

HEADER = struct.Struct(">I B I")  # (length << 8 | type), flags, stream id
HEADER_SIZE = 9
MAX_PAYLOAD = 65536  # no frame payload may be longer (FRAME_SIZE_ERROR)
MAX_STREAM_ID = 0x7FFFFFFF
MAX_WINDOW = 0x7FFFFFFF

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_OPEN_HEAD = struct.Struct(">I B")  # initial window, priority
_GOAWAY_HEAD = struct.Struct(">I H")  # last stream id, code


class FrameType(IntEnum):
    DATA = 0x0
    OPEN = 0x1
    ACCEPT = 0x2
    REFUSE = 0x3
    WINDOW = 0x4
    RESET = 0x5
    PING = 0x6
    GOAWAY = 0x7
    NOTICE = 0x8


class Flag:
    END_STREAM = 0x1  # DATA: the sender will send no more on this stream
    ACK = 0x1  # PING: this is the answer


class Priority(IntEnum):
    INTERACTIVE = 0  # consoles: sent before any bulk stream
    BULK = 1  # VNC, disks, bench: share what is left


SESSION_FRAMES = (FrameType.PING, FrameType.GOAWAY)


@dataclass(frozen=True)
class Frame:
    type: FrameType
    stream_id: int
    flags: int = 0
    # decoded payload fields; which ones are set depends on type
    data: bytes = b""  # DATA payload, PING opaque bytes
    window: int = 0  # OPEN / ACCEPT initial window, WINDOW increment
    priority: int = 0  # OPEN
    fields: Tuple[Tuple[str, str], ...] = ()  # OPEN request, ACCEPT info, NOTICE
    code: int = 0  # REFUSE / RESET / GOAWAY
    message: str = ""  # REFUSE / RESET / GOAWAY
    last_stream_id: int = 0  # GOAWAY

    def field_dict(self) -> Dict[str, str]:
        return dict(self.fields)


# -- encoding -------------------------------------------------------------------------


def header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    return HEADER.pack((length << 8) | ftype, flags, stream_id)


def encode_fields(fields: Dict[str, str]) -> bytes:
    """A field list: u8 count, then per field u8 key length, key, u16 value length, value."""
    if len(fields) > 255:
        raise ValueError("at most 255 fields")
    out = [bytes([len(fields)])]
    for key, value in fields.items():
        k = key.encode("utf-8")
        v = value.encode("utf-8")
        if not 0 < len(k) < 256 or len(v) > 0xFFFF:
            raise ValueError("field %r is too long" % key)
        out += [bytes([len(k)]), k, _U16.pack(len(v)), v]
    return b"".join(out)


def _frame(ftype: int, stream_id: int, payload: bytes, flags: int = 0) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload of %d bytes exceeds %d" % (len(payload), MAX_PAYLOAD))
    return header(len(payload), ftype, flags, stream_id) + payload


def encode_data(stream_id: int, data: bytes, end_stream: bool = False) -> bytes:
    return _frame(FrameType.DATA, stream_id, data, Flag.END_STREAM if end_stream else 0)


def encode_open(stream_id: int, window: int, priority: int, fields: Dict[str, str]) -> bytes:
    payload = _OPEN_HEAD.pack(window, priority) + encode_fields(fields)
    return _frame(FrameType.OPEN, stream_id, payload)


def encode_accept(stream_id: int, window: int, fields: Dict[str, str]) -> bytes:
    return _frame(FrameType.ACCEPT, stream_id, _U32.pack(window) + encode_fields(fields))


def _coded(code: int, message: str) -> bytes:
    text = message.encode("utf-8")[: MAX_PAYLOAD - 16]
    return _U16.pack(code) + text


def encode_refuse(stream_id: int, code: int, message: str) -> bytes:
    return _frame(FrameType.REFUSE, stream_id, _coded(code, message))


def encode_reset(stream_id: int, code: int, message: str) -> bytes:
    return _frame(FrameType.RESET, stream_id, _coded(code, message))


def encode_window(stream_id: int, increment: int) -> bytes:
    return _frame(FrameType.WINDOW, stream_id, _U32.pack(increment))


def encode_ping(opaque: bytes, ack: bool = False) -> bytes:
    return _frame(FrameType.PING, 0, opaque, Flag.ACK if ack else 0)


def encode_goaway(last_stream_id: int, code: int, message: str) -> bytes:
    text = message.encode("utf-8")[: MAX_PAYLOAD - 16]
    return _frame(FrameType.GOAWAY, 0, _GOAWAY_HEAD.pack(last_stream_id, code) + text)


def encode_notice(stream_id: int, fields: Dict[str, str]) -> bytes:
    return _frame(FrameType.NOTICE, stream_id, encode_fields(fields))


def encode(frame: Frame) -> bytes:
    """Encode any Frame (used by tests and the protocol examples)."""
    t = frame.type
    if t == FrameType.DATA:
        return encode_data(frame.stream_id, frame.data, bool(frame.flags & Flag.END_STREAM))
    if t == FrameType.OPEN:
        return encode_open(frame.stream_id, frame.window, frame.priority, dict(frame.fields))
    if t == FrameType.ACCEPT:
        return encode_accept(frame.stream_id, frame.window, dict(frame.fields))
    if t == FrameType.REFUSE:
        return encode_refuse(frame.stream_id, frame.code, frame.message)
    if t == FrameType.RESET:
        return encode_reset(frame.stream_id, frame.code, frame.message)
    if t == FrameType.WINDOW:
        return encode_window(frame.stream_id, frame.window)
    if t == FrameType.PING:
        return encode_ping(frame.data, bool(frame.flags & Flag.ACK))
    if t == FrameType.GOAWAY:
        return encode_goaway(frame.last_stream_id, frame.code, frame.message)
    return encode_notice(frame.stream_id, dict(frame.fields))


# -- decoding -------------------------------------------------------------------------


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError("%s is not valid UTF-8" % what) from None


def decode_fields(payload: bytes, pos: int) -> Tuple[Tuple[str, str], ...]:
    end = len(payload)
    if pos >= end:
        raise FrameError("field list is missing", ErrorCode.FRAME_SIZE_ERROR)
    count = payload[pos]
    pos += 1
    fields: List[Tuple[str, str]] = []
    seen = set()
    for _ in range(count):
        if pos + 1 > end:
            raise FrameError("field list is truncated", ErrorCode.FRAME_SIZE_ERROR)
        klen = payload[pos]
        pos += 1
        if klen == 0 or pos + klen + 2 > end:
            raise FrameError("field list is truncated", ErrorCode.FRAME_SIZE_ERROR)
        key = _text(payload[pos : pos + klen], "a field name")
        pos += klen
        (vlen,) = _U16.unpack_from(payload, pos)
        pos += 2
        if pos + vlen > end:
            raise FrameError("field list is truncated", ErrorCode.FRAME_SIZE_ERROR)
        value = _text(payload[pos : pos + vlen], "field %r" % key)
        pos += vlen
        if key in seen:
            raise FrameError("field %r appears twice" % key)
        seen.add(key)
        fields.append((key, value))
    if pos != end:
        raise FrameError("%d bytes after the field list" % (end - pos), ErrorCode.FRAME_SIZE_ERROR)
    return tuple(fields)


def _need(payload: bytes, size: int, what: str, exact: bool = False) -> None:
    if len(payload) < size or (exact and len(payload) != size):
        raise FrameError(
            "%s payload of %d bytes (expected %s%d)"
            % (what, len(payload), "" if exact else "at least ", size),
            ErrorCode.FRAME_SIZE_ERROR,
        )


_TYPES = {int(t): t for t in FrameType}  # FrameType(x) is a slow Python call


def decode_payload(ftype: int, flags: int, stream_id: int, payload: bytes) -> Frame:
    """Build a Frame from one header's worth of fields and its payload."""
    t = _TYPES.get(ftype)
    if t is None:
        raise FrameError("unknown frame type 0x%02x" % ftype)
    if t in SESSION_FRAMES:
        if stream_id != 0:
            raise FrameError("%s frame on stream %d (must be 0)" % (t.name, stream_id))
    elif stream_id == 0:
        raise FrameError("%s frame on stream 0" % t.name)
    if t == FrameType.DATA:
        return Frame(t, stream_id, flags, data=payload)
    if t == FrameType.OPEN:
        _need(payload, 6, "OPEN")
        window, priority = _OPEN_HEAD.unpack_from(payload, 0)
        if priority not in (Priority.INTERACTIVE, Priority.BULK):
            raise FrameError("OPEN with unknown priority %d" % priority)
        fields = decode_fields(payload, 5)
        return Frame(t, stream_id, flags, window=window, priority=priority, fields=fields)
    if t == FrameType.ACCEPT:
        _need(payload, 5, "ACCEPT")
        (window,) = _U32.unpack_from(payload, 0)
        return Frame(t, stream_id, flags, window=window, fields=decode_fields(payload, 4))
    if t in (FrameType.REFUSE, FrameType.RESET):
        _need(payload, 2, t.name)
        (code,) = _U16.unpack_from(payload, 0)
        return Frame(t, stream_id, flags, code=code, message=_text(payload[2:], "message"))
    if t == FrameType.WINDOW:
        _need(payload, 4, "WINDOW", exact=True)
        (increment,) = _U32.unpack(payload)
        return Frame(t, stream_id, flags, window=increment)
    if t == FrameType.PING:
        _need(payload, 8, "PING", exact=True)
        return Frame(t, 0, flags, data=payload)
    if t == FrameType.GOAWAY:
        _need(payload, 6, "GOAWAY")
        last, code = _GOAWAY_HEAD.unpack_from(payload, 0)
        return Frame(t, 0, flags, last_stream_id=last, code=code, message=_text(payload[6:], "message"))
    return Frame(t, stream_id, flags, fields=decode_fields(payload, 0))


RawFrame = Tuple[int, int, int, memoryview]  # type, flags, stream id, payload


class FrameDecoder:
    """Incremental decoder: feed() bytes as they arrive, then call next_frame() until None.

    next_frame() raises FrameError on an invalid frame; the session it belongs to is
    then over and the decoder must not be used again.

    split() is the fast path the session uses instead of feed() + next_frame(): it
    checks only the headers and hands back the payloads as memoryviews, without a
    copy and without building a Frame, and buffers nothing but a frame cut in two.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD):
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._pos = 0  # start of the first undecoded byte; compacted lazily

    def feed(self, data: bytes) -> None:
        if self._pos and self._pos == len(self._buffer):
            self._buffer.clear()
            self._pos = 0
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer) - self._pos

    def next_frame(self) -> Optional[Frame]:
        buf = self._buffer
        pos = self._pos
        available = len(buf) - pos
        if available < HEADER_SIZE:
            self._compact()
            return None
        word, flags, stream_id = HEADER.unpack_from(buf, pos)
        length = word >> 8
        error = self._check_header(length, stream_id)
        if error is not None:
            raise error
        if available - HEADER_SIZE < length:
            self._compact()
            return None
        start = pos + HEADER_SIZE
        self._pos = start + length
        with memoryview(buf) as view:
            payload = bytes(view[start : self._pos])
        return decode_payload(word & 0xFF, flags, stream_id, payload)

    def split(self, data: bytes) -> Tuple[List[RawFrame], Optional[FrameError]]:
        """The complete frames in what was buffered followed by `data`.

        Returns (frames, error): each frame as (type, flags, stream id, payload), the
        payload a memoryview of `data` (or of a copy, for a frame that began in an
        earlier call). Only the header is checked (length, reserved bit); payloads
        are for decode_payload() to judge. error is the FrameError of the first bad
        header, after the frames that came before it; the decoder is then finished.
        The views are valid as long as `data` is left unchanged.
        """
        frames: List[RawFrame] = []
        if self._pos:
            self._compact()
        buf = self._buffer
        view = memoryview(data)
        if buf:  # complete the frame that the previous call cut
            have = len(buf)
            used = 0
            if have < HEADER_SIZE:
                used = min(HEADER_SIZE - have, len(view))
                buf += view[:used]
                if len(buf) < HEADER_SIZE:
                    return frames, None
            word, _, stream_id = HEADER.unpack_from(buf, 0)
            error = self._check_header(word >> 8, stream_id)
            if error is not None:
                return frames, error
            more = HEADER_SIZE + (word >> 8) - len(buf)
            if more < 0:  # whole frames were feed()-ed: take the slow road
                whole = bytes(buf) + bytes(view[used:])
                buf.clear()
                pos, error = self._scan(memoryview(whole), frames)
                if error is None and pos < len(whole):
                    buf += whole[pos:]
                return frames, error
            more = min(more, len(view) - used)
            buf += view[used : used + more]
            used += more
            if len(buf) < HEADER_SIZE + (word >> 8):
                return frames, None
            whole = bytes(buf)
            buf.clear()
            self._scan(memoryview(whole), frames)  # exactly that frame
            view = view[used:]
        pos, error = self._scan(view, frames)
        if error is None and pos < len(view):
            buf += view[pos:]
        return frames, error

    def _scan(self, view: memoryview, frames: List[RawFrame]) -> Tuple[int, Optional[FrameError]]:
        """Append the complete frames at the start of view; (bytes used, header error)."""
        unpack = HEADER.unpack_from
        max_payload = self.max_payload
        end = len(view)
        pos = 0
        while end - pos >= HEADER_SIZE:
            word, flags, stream_id = unpack(view, pos)
            length = word >> 8
            if length > max_payload or stream_id > MAX_STREAM_ID:
                return pos, self._check_header(length, stream_id)
            start = pos + HEADER_SIZE
            stop = start + length
            if stop > end:
                break
            frames.append((word & 0xFF, flags, stream_id, view[start:stop]))
            pos = stop
        return pos, None

    def _check_header(self, length: int, stream_id: int) -> Optional[FrameError]:
        if length > self.max_payload:
            return FrameError(
                "frame of %d bytes exceeds the maximum of %d" % (length, self.max_payload),
                ErrorCode.FRAME_SIZE_ERROR,
            )
        if stream_id > MAX_STREAM_ID:
            return FrameError("stream id 0x%08x has the reserved bit set" % stream_id)
        return None

    def _compact(self) -> None:
        if self._pos:
            del self._buffer[: self._pos]
            self._pos = 0
