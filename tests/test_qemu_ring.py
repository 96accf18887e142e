"""RingBuffer and the VNC shared-flag filter against simple models (hypothesis)."""

import tracemalloc

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


class _LastBytes:
    """The reference model: everything ever appended; the ring must hold its last *capacity* bytes."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.everything = b""

    @property
    def start(self):
        return max(0, len(self.everything) - self.capacity)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(1, 300), data=st.data())
def test_growing_ring_matches_last_n_bytes(capacity, data):
    """Storage grows with what was appended, and behaves the same before, across and after
    the point where it reaches its capacity (and wraps)."""
    ring, model = RingBuffer(capacity), _LastBytes(capacity)
    assert ring.allocated == 0
    sizes = st.one_of(st.integers(0, 8), st.integers(capacity - 2, capacity + 2).filter(lambda n: n >= 0),
                      st.integers(0, 3 * capacity))
    for step in range(data.draw(st.integers(1, 12))):
        chunk = bytes((step * 7 + i) % 251 for i in range(data.draw(sizes)))
        ring.append(chunk if step % 2 else memoryview(bytearray(chunk)))
        model.everything += chunk
        assert ring.end == len(model.everything)
        assert ring.start == model.start
        assert len(ring) == ring.end - ring.start
        assert ring.allocated == min(ring.end, capacity)  # what it holds, never more
        assert ring.read_all(ring.start) == model.everything[model.start:]
        for _ in range(3):
            offset = data.draw(st.integers(ring.start, ring.end))
            n = data.draw(st.integers(0, 2 * capacity))
            got = ring.read(offset, n)
            assert got == model.everything[offset:offset + len(got)]
            assert len(got) <= n
            if n and offset < ring.end:
                assert got
        if ring.start > 0:
            with pytest.raises(ValueError):
                ring.read(ring.start - 1, 1)


def test_ring_holds_what_it_received():
    """A 1 MiB ring that received 10 bytes holds about 10 bytes, not 1 MiB."""
    ring = RingBuffer(1 << 20)
    ring.append(b"0123456789")
    assert ring.allocated == 10
    assert ring.read(0, 100) == b"0123456789"
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        rings = [RingBuffer(1 << 20) for _ in range(100)]
        for r in rings:
            r.append(b"boot banner\r\n")
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 100 * 1024, "100 nearly empty 1 MiB rings hold %d bytes" % held
    ring.append(b"x" * ((1 << 20) - 10))
    assert ring.allocated == 1 << 20 and ring.start == 0
    ring.append(b"yz")  # wraps in place: no more storage
    assert ring.allocated == 1 << 20 and ring.start == 2
    assert ring.read(2, 8) == b"23456789"
    assert ring.read(ring.end - 2, 8) == b"yz"


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
