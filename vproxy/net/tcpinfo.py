"""The path's round trip as TCP measures it (Linux TCP_INFO), for sizing windows.

TCP times its own segments against their ACKs and keeps the minimum over minutes
(tcpi_min_rtt). That figure sits below every application queue: unlike a mux PING,
it is not inflated by bulk data waiting in the sockets or in the peer's event loop,
which is what a window sized on the base round trip must not follow.
"""

import socket
import struct
from typing import Optional

# struct tcp_info (linux/tcp.h): tcpi_min_rtt is the u32 at byte 148, in microseconds
# (Linux 4.6 and later; older kernels return a shorter struct).
_MIN_RTT_OFFSET = 148
_TCP_INFO_SIZE = 152


def min_rtt(sock: Optional[socket.socket]) -> Optional[float]:
    """Seconds, or None where there is no such figure (not TCP, not Linux, no sample)."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    if sock is None or tcp_info is None:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, _TCP_INFO_SIZE)
    except (OSError, ValueError):
        return None
    if len(raw) < _TCP_INFO_SIZE:
        return None
    micros: int = struct.unpack_from("=I", raw, _MIN_RTT_OFFSET)[0]
    if micros == 0 or micros == 0xFFFFFFFF:  # no sample yet (~0U before the first)
        return None
    return micros / 1e6
