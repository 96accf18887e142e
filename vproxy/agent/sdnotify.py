"""sd_notify(3) without libsystemd: tell the service manager how the agent is doing.

When systemd starts the agent as a Type=notify service it sets NOTIFY_SOCKET to a unix
datagram socket (a path, or "@name" in the abstract namespace). The agent sends
newline-separated KEY=VALUE lines there:

    READY=1                      listening: `systemctl start` returns now
    RELOADING=1, MONOTONIC_USEC  a SIGHUP reload began (MONOTONIC_USEC for notify-reload)
    READY=1                      ... and ended
    STOPPING=1                   draining before exit
    STATUS=...                   one line for `systemctl status`

Without NOTIFY_SOCKET every call is a no-op. A failure to send is logged once at
debug level and never stops the agent: the notification is advisory.
"""

import logging
import os
import socket
import time
from typing import Optional

log = logging.getLogger("vproxy.sdnotify")


class Notifier:
    def __init__(self, address: Optional[str] = None):
        """address: the NOTIFY_SOCKET value (default: from the environment)."""
        self.address = os.environ.get("NOTIFY_SOCKET", "") if address is None else address
        self._sock: Optional[socket.socket] = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *lines: str) -> bool:
        """Send KEY=VALUE lines as one datagram; True if it was sent."""
        if not self.address or not lines:
            return False
        message = "\n".join(line.replace("\n", " ") for line in lines).encode("utf-8", "replace")
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, target)
        except OSError as e:
            if not self._failed:
                log.debug("cannot notify the service manager at %s: %s", self.address, e)
                self._failed = True
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *(["STATUS=" + status] if status else []))

    def reloading(self, status: str = "reloading") -> bool:
        usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000)
        return self.notify("RELOADING=1", "MONOTONIC_USEC=%d" % usec, "STATUS=" + status)

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify("STOPPING=1", "STATUS=" + status)

    def status(self, status: str) -> bool:
        return self.notify("STATUS=" + status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


__all__ = ["Notifier"]
