"""A minimal VNC (RFB 3.8) client that takes one screenshot, and the PNG writer it needs.

Rules this module keeps:
- Security type None only: the agent hands QEMU the connection with skipauth, so the
  tunnel is the authentication. Raw encoding only, 32-bit true colour asked for.
- Nothing outside the standard library: struct for the protocol, zlib for the PNG.
- A stream is anything with async ``readexactly(n)`` and ``write(data)`` (an
  AsyncStream of vproxy.api, or a test's fake); a server that says something else than
  expected is an RfbError naming it.
"""

import asyncio
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Any, Tuple, Union

from vproxy.errors import VproxyError


class RfbError(VproxyError):
    """The VNC server said something this minimal RFB client does not handle."""


class Screenshot:
    """A VNC framebuffer: ``width``, ``height``, ``rgb`` (3 bytes per pixel, rows top
    down), ``name`` (the desktop name QEMU gave)."""

    def __init__(self, width: int, height: int, rgb: bytes, name: str = ""):
        self.width, self.height, self.rgb, self.name = width, height, rgb, name

    def colours(self) -> int:
        """How many distinct colours the picture has (1: blank)."""
        rgb = self.rgb
        return len(set(zip(rgb[0::3], rgb[1::3], rgb[2::3])))

    def png(self) -> bytes:
        return encode_png(self.width, self.height, self.rgb)

    def save(self, path: Union[str, "os.PathLike[str]"]) -> Path:
        path = Path(path)
        path.write_bytes(self.png())
        return path

    def __repr__(self) -> str:
        return "<Screenshot %dx%d %r>" % (self.width, self.height, self.name)


def encode_png(width: int, height: int, rgb: bytes) -> bytes:
    """An 8-bit RGB PNG (no filtering, zlib level 6)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    stride = width * 3
    raw = b"".join(b"\x00" + rgb[y * stride:(y + 1) * stride] for y in range(height))
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b""))


async def rfb_capture(stream: Any, timeout: float = 30.0) -> Screenshot:
    """One full framebuffer from an RFB server on *stream* (anything with async
    readexactly/write): RFB 3.8, security None, raw encoding, 32-bit true colour."""
    return await asyncio.wait_for(_rfb_capture(stream), timeout)


async def rfb_handshake(stream: Any) -> Tuple[int, int, str]:
    """RFB 3.8 up to the first update request on *stream* (anything with async
    readexactly/write): security None, shared, then SetPixelFormat (32-bit true colour)
    and SetEncodings (raw only). Returns the screen's width, height and name."""
    read = stream.readexactly
    version = await read(12)
    if not re.match(rb"RFB \d{3}\.\d{3}\n", version):
        raise RfbError("not a VNC server: it greeted with %r" % version)
    if version < b"RFB 003.008\n":
        raise RfbError("VNC server speaks %s; this client needs RFB 3.8" % version.decode().strip())
    await stream.write(b"RFB 003.008\n")
    count = (await read(1))[0]
    if count == 0:
        (length,) = struct.unpack(">I", await read(4))
        raise RfbError("the VNC server refused: %s" % (await read(length)).decode("utf-8", "replace"))
    types = await read(count)
    if 1 not in types:
        raise RfbError("the VNC server wants authentication (security types %s)" % list(types))
    await stream.write(b"\x01")  # security None
    (result,) = struct.unpack(">I", await read(4))
    if result != 0:
        (length,) = struct.unpack(">I", await read(4))
        raise RfbError("VNC security handshake failed: %s" % (await read(length)).decode("utf-8", "replace"))
    await stream.write(b"\x01")  # ClientInit: shared
    width, height = struct.unpack(">HH", await read(4))
    await read(16)  # the server's pixel format: we set our own
    (length,) = struct.unpack(">I", await read(4))
    name = (await read(length)).decode("utf-8", "replace")
    # SetPixelFormat: 32 bpp, depth 24, little-endian, true colour, 8 bits each, R<<16 G<<8 B
    await stream.write(struct.pack(">B3xBBBBHHHBBB3x", 0, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0))
    await stream.write(struct.pack(">BxHi", 2, 1, 0))  # SetEncodings: raw only
    return width, height, name


async def _rfb_capture(stream: Any) -> Screenshot:
    read = stream.readexactly
    width, height, name = await rfb_handshake(stream)
    await stream.write(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))  # full update
    pixels = bytearray(width * height * 4)
    covered = 0
    while covered < width * height:
        kind = (await read(1))[0]
        if kind == 0:  # FramebufferUpdate
            (rects,) = struct.unpack(">xH", await read(3))
            for _ in range(rects):
                x, y, w, h, encoding = struct.unpack(">HHHHi", await read(12))
                if encoding != 0:
                    raise RfbError("VNC server sent encoding %d although only raw was asked for" % encoding)
                data = await read(w * h * 4)
                if x + w > width or y + h > height:
                    raise RfbError("VNC rectangle %dx%d+%d+%d outside the %dx%d screen"
                                   % (w, h, x, y, width, height))
                for row in range(h):
                    at = ((y + row) * width + x) * 4
                    pixels[at:at + w * 4] = data[row * w * 4:(row + 1) * w * 4]
                covered += w * h
        elif kind == 1:  # SetColourMapEntries (not for true colour, but skip it)
            _, n = struct.unpack(">xHH", await read(5))
            await read(6 * n)
        elif kind == 2:  # Bell
            pass
        elif kind == 3:  # ServerCutText
            (length,) = struct.unpack(">3xI", await read(7))
            await read(length)
        else:
            raise RfbError("unknown VNC server message type %d" % kind)
    rgb = bytearray(width * height * 3)
    rgb[0::3] = pixels[2::4]
    rgb[1::3] = pixels[1::4]
    rgb[2::3] = pixels[0::4]
    return Screenshot(width, height, bytes(rgb), name)
