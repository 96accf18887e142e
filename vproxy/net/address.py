"""Addresses both sides parse and print: an agent's HOST:PORT, a listen address, a unix socket.

Rules kept here:
- One parser per kind of address, one way to print one: "host:port", or "[v6]:port"
  for an IPv6 literal.
- A unix socket file is only replaced when it is stale (nothing answers); a live one,
  or a file that is not a socket, is a UserError that says which.
"""

import errno
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass
from typing import Tuple

from vproxy.errors import UserError

DEFAULT_PORT = 7443


def parse_address(address: str, default_port: int = DEFAULT_PORT, listening: bool = False) -> Tuple[str, int]:
    """"host", "host:port", "[v6]:port" or "v6" -> (host, port). A listener may use port 0."""
    text = address.strip()
    if not text:
        raise UserError("empty agent address", hint="give HOST or HOST:PORT")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if not port:
        return host, default_port
    if not port.isdigit() or not (0 if listening else 1) <= int(port) < 65536:
        raise UserError("bad port %r in agent address %r" % (port, address))
    return host, int(port)


def format_host_port(host: str, port: int) -> str:
    """"host:port", or "[v6]:port" for an IPv6 literal."""
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def format_sockname(sockname: object) -> str:
    """A socket address as people read it: "host:port", "[v6]:port", or the text of a
    unix socket's name."""
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return format_host_port(sockname[0], sockname[1])
    return str(sockname)


@dataclass(frozen=True)
class ListenAddress:
    """Where to listen: a TCP host and port, or a unix socket path."""

    kind: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return "unix:%s" % self.path
        return format_host_port(self.host, self.port)

    @property
    def is_loopback(self) -> bool:
        if self.kind == "unix":
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name: it may resolve to anything


def parse_listen(text: str, default_host: str = "127.0.0.1") -> ListenAddress:
    """"unix:/path", "/path" or "./path" (a unix socket); "PORT", "HOST:PORT",
    "[V6]:PORT" (TCP; port 0 picks a free port)."""
    text = text.strip()
    if not text:
        raise UserError("empty listen address", hint="give HOST:PORT, PORT or unix:/PATH")
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise UserError("listen address %r names no socket path" % text,
                            hint="e.g. --listen unix:/run/user/1000/qga.sock")
        return ListenAddress("unix", path=os.path.abspath(os.path.expanduser(path)))
    if "/" in text or text.startswith("~"):
        return ListenAddress("unix", path=os.path.abspath(os.path.expanduser(text)))
    if text.isdigit():
        host, port = default_host, text
    elif text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise UserError("bad listen address %r" % text, hint="IPv6 is written [::1]:PORT")
        port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
        host = host or default_host
    else:
        raise UserError("bad listen address %r" % text,
                        hint="give HOST:PORT, PORT, [V6]:PORT or unix:/PATH")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise UserError("bad port %r in listen address %r" % (port, text))
    return ListenAddress("tcp", host=host, port=int(port))


def check_listen_safety(address: ListenAddress, unsafe: bool) -> None:
    """Listening beyond loopback needs the caller's explicit consent."""
    if address.is_loopback or unsafe:
        return
    raise UserError(
        "refusing to listen on %s: anyone who can reach it would use your certificate's "
        "rights on the VM" % address,
        hint="listen on 127.0.0.1 or a unix socket, or add --unsafe-listen if that is "
             "really what you want")


def clear_stale_socket(path: str, label: str, busy: str, hint: str) -> None:
    """Make way for a listening unix socket at `path`: a stale socket file (nobody
    answers) is removed; a live one, or any other file, is a UserError starting `label`."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UserError("%s: the file exists and is not a socket" % label)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: nobody listens
    except OSError as e:
        raise UserError("%s: %s" % (label, e.strerror)) from None
    else:
        raise UserError("%s: %s" % (label, busy), hint=hint)
    finally:
        probe.close()


def unix_listener(path: str) -> socket.socket:
    """A listening unix socket at `path`, mode 0600; a stale socket file is replaced,
    a live one (something answers) or any other file is an error."""
    clear_stale_socket(path, "cannot listen on unix:%s" % path, "something else listens there",
                       "stop it, or pick another path")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is born 0600: no window where others connect
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        hint = "does the directory exist?" if e.errno == errno.ENOENT else ""
        raise UserError("cannot listen on unix:%s: %s" % (path, e.strerror), hint=hint) from None
    finally:
        os.umask(old)
    sock.listen(64)
    sock.setblocking(False)
    return sock
