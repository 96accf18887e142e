"""RingBuffer and the VNC shared-flag filter against simple models (hypothesis)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vproxy.agent.qemu.ring import RingBuffer
from vproxy.agent.qemu.vnc import SharedFlagFilter


@settings(max_examples=100, deadline=None)
@given(capacity=st.integers(1, 64), chunks=st.lists(st.binary(max_size=100), max_size=30),
       data=st.data())
def test_ring_matches_model(capacity, chunks, data):
    ring = RingBuffer(capacity)
    everything = b""
    for chunk in chunks:
        ring.append(chunk)
        everything += chunk
        assert ring.end == len(everything)
        assert ring.start == max(0, len(everything) - capacity)
        assert ring.read_all(ring.start) == everything[ring.start:]
        offset = data.draw(st.integers(ring.start, ring.end))
        n = data.draw(st.integers(0, 200))
        got = ring.read(offset, n)
        assert got == everything[offset:offset + len(got)]
        assert len(got) <= n
        if n and offset < ring.end:
            assert got  # at least one byte: reads stop only at the wrap point
    if ring.start > 0:
        with pytest.raises(ValueError):
            ring.read(ring.start - 1, 1)
    with pytest.raises(ValueError):
        ring.read(ring.end + 1, 1)


@given(minor=st.sampled_from([b"003", b"007", b"008"]), flag=st.sampled_from([b"\0", b"\1"]),
       tail=st.binary(max_size=40), cuts=st.lists(st.integers(0, 60), max_size=6))
def test_shared_flag_any_chunking(minor, flag, tail, cuts):
    version = b"RFB 003." + minor + b"\n"
    security = b"" if minor == b"003" else b"\x01"
    flow = version + security + flag + tail
    want = version + security + b"\x01" + tail
    f = SharedFlagFilter()
    out, last = b"", 0
    for cut in sorted(set(c for c in cuts if c < len(flow))) + [len(flow)]:
        out += f.feed(flow[last:cut])
        last = cut
    assert out == want
