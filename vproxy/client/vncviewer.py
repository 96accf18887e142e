"""Which VNC viewer to start for `vproxy vnc`, and how to tell it the address.

Looked for on PATH in this order, each with its own address syntax:
- vncviewer (TigerVNC, TightVNC, RealVNC): "HOST::PORT" (two colons: a port, not a
  display number); a unix socket as its path (TigerVNC 1.11 and later).
- remote-viewer (virt-viewer): "vnc://HOST:PORT", a unix socket as "vnc+unix:///PATH".
- gvncviewer (gtk-vnc): "HOST:DISPLAY", the port being 5900 + DISPLAY, so it can reach
  ports from 5900 up only, and no IPv6 address; a unix socket as its path.
"""

import shutil
from typing import List, Optional, Tuple

from vproxy.errors import UserError
from vproxy.net.address import ListenAddress, format_host_port

VIEWERS = ("vncviewer", "remote-viewer", "gvncviewer")


def find_viewer(path: Optional[str] = None) -> Optional[Tuple[str, str]]:
    """(name, program path) of the first viewer found on PATH, or None."""
    for name in VIEWERS:
        program = shutil.which(name, path=path)
        if program:
            return name, program
    return None


def _connect_host(address: ListenAddress) -> str:
    # a viewer connects to a wildcard listener through loopback
    if address.host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if address.host == "::":
        return "::1"
    return address.host


def viewer_argument(name: str, address: ListenAddress) -> str:
    """The address argument `name` understands for our listener at `address`."""
    if address.kind == "unix":
        if name == "remote-viewer":
            return "vnc+unix://%s" % address.path
        return address.path  # vncviewer (TigerVNC) and gvncviewer take a path with a "/"
    host = _connect_host(address)
    bracketed = "[%s]" % host if ":" in host else host
    if name == "vncviewer":
        return "%s::%d" % (bracketed, address.port)
    if name == "remote-viewer":
        return "vnc://%s" % format_host_port(host, address.port)
    if name == "gvncviewer":
        if ":" in host:
            raise UserError("gvncviewer cannot connect to an IPv6 address (%s)" % host,
                            hint="listen on 127.0.0.1, or use --no-viewer and another viewer")
        if address.port < 5900:
            raise UserError("gvncviewer can only reach ports from 5900 up (display numbers), "
                            "not %d" % address.port,
                            hint="use --listen 127.0.0.1:0 (a free high port) or a port >= 5900")
        return "%s:%d" % (host, address.port - 5900)
    raise ValueError("unknown viewer %r" % name)


def viewer_command(name: str, program: str, address: ListenAddress) -> List[str]:
    return [program, viewer_argument(name, address)]


def no_viewer_error() -> UserError:
    return UserError("no VNC viewer found on PATH (looked for %s)" % ", ".join(VIEWERS),
                     hint="install one (e.g. tigervnc-viewer or virt-viewer), or use "
                          "--no-viewer and point any VNC viewer at the printed address")


__all__ = ["VIEWERS", "find_viewer", "viewer_argument", "viewer_command", "no_viewer_error"]
