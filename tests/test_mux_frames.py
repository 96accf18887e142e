"""The frame codec: round trips, and arbitrary bytes give only FrameError."""

from hypothesis import given, settings
from hypothesis import strategies as st

from vproxy.mux import frames as fr
from vproxy.mux.errors import ErrorCode, FrameError

text = st.text(max_size=40)
field_lists = st.dictionaries(st.text(min_size=1, max_size=20), text, max_size=8)
stream_ids = st.integers(1, fr.MAX_STREAM_ID)
u32 = st.integers(0, 0xFFFFFFFF)

any_frame = st.one_of(
    st.builds(lambda s, d, e: fr.Frame(fr.FrameType.DATA, s, fr.Flag.END_STREAM if e else 0, data=d),
              stream_ids, st.binary(max_size=fr.MAX_PAYLOAD), st.booleans()),
    st.builds(lambda s, w, p, f: fr.Frame(fr.FrameType.OPEN, s, window=w, priority=p, fields=tuple(f.items())),
              stream_ids, u32, st.sampled_from([0, 1]), field_lists),
    st.builds(lambda s, w, f: fr.Frame(fr.FrameType.ACCEPT, s, window=w, fields=tuple(f.items())),
              stream_ids, u32, field_lists),
    st.builds(lambda s, c, m: fr.Frame(fr.FrameType.REFUSE, s, code=c, message=m),
              stream_ids, st.integers(0, 0xFFFF), text),
    st.builds(lambda s, c, m: fr.Frame(fr.FrameType.RESET, s, code=c, message=m),
              stream_ids, st.integers(0, 0xFFFF), text),
    st.builds(lambda s, w: fr.Frame(fr.FrameType.WINDOW, s, window=w), stream_ids, u32),
    st.builds(lambda d, a: fr.Frame(fr.FrameType.PING, 0, fr.Flag.ACK if a else 0, data=d),
              st.binary(min_size=8, max_size=8), st.booleans()),
    st.builds(lambda last, c, m: fr.Frame(fr.FrameType.GOAWAY, 0, last_stream_id=last, code=c, message=m),
              st.integers(0, fr.MAX_STREAM_ID), st.integers(0, 0xFFFF), text),
    st.builds(lambda s, f: fr.Frame(fr.FrameType.NOTICE, s, fields=tuple(f.items())), stream_ids, field_lists),
)


def decode_all(data: bytes):
    decoder = fr.FrameDecoder()
    decoder.feed(data)
    out = []
    while True:
        frame = decoder.next_frame()
        if frame is None:
            return out, decoder.buffered
        out.append(frame)


@given(st.lists(any_frame, max_size=6), st.integers(1, 50))
def test_round_trip_in_any_chunking(frames, chunk):
    wire = b"".join(fr.encode(f) for f in frames)
    decoder = fr.FrameDecoder()
    got = []
    for i in range(0, len(wire), chunk):
        decoder.feed(wire[i : i + chunk])
        while True:
            f = decoder.next_frame()
            if f is None:
                break
            got.append(f)
    assert got == frames
    assert decoder.buffered == 0


@settings(max_examples=1000)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_give_frames_or_frame_error(data):
    try:
        decode_all(data)
    except FrameError as e:
        assert isinstance(e.code, ErrorCode) and e.message


@settings(max_examples=500)
@given(st.lists(any_frame, min_size=1, max_size=3), st.data())
def test_corrupted_frames_give_frames_or_frame_error(frames, data):
    wire = bytearray(b"".join(fr.encode(f) for f in frames))
    for _ in range(data.draw(st.integers(1, 4))):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    try:
        decode_all(bytes(wire))
    except FrameError:
        pass


def test_oversized_frame_is_a_frame_size_error():
    wire = fr.header(fr.MAX_PAYLOAD + 1, fr.FrameType.DATA, 0, 1)
    decoder = fr.FrameDecoder()
    decoder.feed(wire)  # the header alone is enough to know
    try:
        decoder.next_frame()
    except FrameError as e:
        assert e.code == ErrorCode.FRAME_SIZE_ERROR
        assert "exceeds" in e.message
    else:
        raise AssertionError("an oversized frame was accepted")


def test_session_frames_must_use_stream_zero_and_stream_frames_must_not():
    for wire, needle in (
        (fr.header(8, fr.FrameType.PING, 0, 3) + b"\0" * 8, "must be 0"),
        (fr.header(4, fr.FrameType.WINDOW, 0, 0) + b"\0\0\0\1", "stream 0"),
    ):
        try:
            decode_all(wire)
        except FrameError as e:
            assert needle in e.message
        else:
            raise AssertionError("accepted %r" % wire)


def test_non_utf8_names_are_a_frame_error():
    payload = b"\0\0\1\0" + b"\0" + b"\1" + b"\2vm" + b"\0\2" + b"\xff\xfe"
    try:
        decode_all(fr.header(len(payload), fr.FrameType.OPEN, 0, 1) + payload)
    except FrameError as e:
        assert "UTF-8" in e.message
    else:
        raise AssertionError("accepted non-UTF-8")
