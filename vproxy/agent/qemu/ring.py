"""A byte ring addressed by absolute offsets (`RingBuffer`).

Everything a console ever received has an offset: the first byte is 0 and the count
never goes back. The ring keeps the last `capacity` bytes, i.e. the offsets
``[start, end)``; older bytes are gone. Appends never block and never allocate once
the buffer exists; reads copy out at most one contiguous run.
"""

from __future__ import annotations


class RingBuffer:
    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError("ring capacity must be positive, not %d" % capacity)
        self.capacity = capacity
        self._buf = bytearray(capacity)
        self.end = 0  # offset one past the newest byte: total bytes ever appended

    @property
    def start(self) -> int:
        """Offset of the oldest byte still held."""
        return max(0, self.end - self.capacity)

    def __len__(self) -> int:
        return self.end - self.start

    def append(self, data: bytes) -> None:
        n = len(data)
        if n >= self.capacity:  # only the tail survives
            data = memoryview(data)[n - self.capacity:]
            self.end += n - self.capacity
            n = self.capacity
        pos = self.end % self.capacity
        first = min(n, self.capacity - pos)
        self._buf[pos:pos + first] = data[:first]
        if first < n:
            self._buf[0:n - first] = data[first:]
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
