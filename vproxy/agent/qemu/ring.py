"""A byte ring addressed by absolute offsets (`RingBuffer`).

Everything a console ever received has an offset: the first byte is 0 and the count
never goes back. The ring keeps the last `capacity` bytes, i.e. the offsets
``[start, end)``; older bytes are gone. Appends never block; reads copy out at most
one contiguous run.

History costs what it holds: the storage starts empty and grows with the output (a
bytearray extended in place, which CPython over-allocates by 1/8, so growth is
amortised), and reaches `capacity` only when the ring first fills up; from then on
appends wrap around in place and never allocate. Until then every byte sits at the
position equal to its offset, which is also ``offset % capacity``: reads are the same
code either side of the growth. An agent serving 1,000 VMs whose consoles printed
nothing holds 1,000 empty rings, not 1,000 MiB of zeros (a preallocated
``bytearray(capacity)`` is written through, so every page of it is resident).
"""

from __future__ import annotations


class RingBuffer:
    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError("ring capacity must be positive, not %d" % capacity)
        self.capacity = capacity
        self._buf = bytearray()  # grows up to capacity, then wraps (see the module doc)
        self._growing = True
        self.end = 0  # offset one past the newest byte: total bytes ever appended

    @property
    def start(self) -> int:
        """Offset of the oldest byte still held."""
        return max(0, self.end - self.capacity)

    @property
    def allocated(self) -> int:
        """Bytes of storage in use (at most `capacity`; grows with what was appended)."""
        return len(self._buf)

    def __len__(self) -> int:
        return self.end - self.start

    def append(self, data: bytes) -> None:
        n = len(data)
        buf = self._buf
        if self._growing:  # no wrap yet, offset == position
            if self.end + n <= self.capacity:
                buf += data
                self.end += n
                return
            buf += bytes(self.capacity - len(buf))  # full size from now on: wrap in place
            self._growing = False
        if n >= self.capacity:  # only the tail survives
            data = memoryview(data)[n - self.capacity:]
            self.end += n - self.capacity
            n = self.capacity
        pos = self.end % self.capacity
        first = min(n, self.capacity - pos)
        buf[pos:pos + first] = data[:first]
        if first < n:
            buf[0:n - first] = data[first:]
        self.end += n

    def read(self, offset: int, max_bytes: int) -> bytes:
        """Up to *max_bytes* from *offset* (which must be in ``[start, end]``)."""
        if not self.start <= offset <= self.end:
            raise ValueError("offset %d outside the ring [%d, %d]" % (offset, self.start, self.end))
        pos = offset % self.capacity
        n = min(max_bytes, self.end - offset, self.capacity - pos)
        return bytes(self._buf[pos:pos + n])

    def read_all(self, offset: int) -> bytes:
        """Everything from *offset* to `end`."""
        out = bytearray()
        while offset + len(out) < self.end:
            out += self.read(offset + len(out), self.end)
        return bytes(out)
