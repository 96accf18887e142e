#!/usr/bin/env python3
"""A stand-in for QEMU, for benchmarks: just enough QMP for the agent's VNC path, and
every passed fd relayed to a TCP server, as QEMU's VNC server or chardev would serve it.

    python3 bench/qemu_standin.py QMP_SOCKET TARGET_PORT

Listens on the unix socket QMP_SOCKET (prints "ready" on stdout once it does) and
speaks QMP to one client at a time: the greeting, qmp_capabilities, query-status
(running), query-name, query-vnc-servers (one server, auth none), qom-list (no
devices: no consoles, no guest channels), query-chardev (none), getfd (the fd that
came with SCM_RIGHTS), add_client (protocol vnc: the named fd is connected to
127.0.0.1:TARGET_PORT, bytes copied both ways by two threads, half-close passed on),
closefd; anything else is CommandNotFound. It is not QEMU: what it costs per byte is
one more relay hop (two blocking threads per stream), about what QEMU's own chardev
loop costs, and it never speaks RFB (the bench's target speaks whatever the bench
sends).
"""

import json
import os
import socket
import struct
import sys
import threading
from typing import Any, Dict, List, Tuple

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "standin"},
                    "capabilities": []}}
VNC_SERVER = {"id": "default", "enabled": True, "auth": "none", "clients": [],
              "server": [{"host": "", "service": "", "family": "unix", "websocket": False,
                          "auth": "none"}]}
FD_SIZE = struct.calcsize("@i")


def copy(src: socket.socket, dst: socket.socket) -> None:
    """src -> dst until EOF (then dst's write side is shut) or an error (both closed)."""
    buf = bytearray(256 * 1024)
    view = memoryview(buf)
    try:
        while True:
            n = src.recv_into(buf)
            if not n:
                dst.shutdown(socket.SHUT_WR)
                return
            dst.sendall(view[:n])
    except OSError:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def relay(fd: int, target_port: int) -> None:
    ours = socket.socket(fileno=fd)
    try:
        far = socket.create_connection(("127.0.0.1", target_port))
    except OSError:
        ours.close()
        return
    far.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=copy, args=(far, ours), daemon=True)
    back.start()
    copy(ours, far)
    back.join()
    ours.close()
    far.close()


class Monitor:
    """One QMP client connection."""

    def __init__(self, conn: socket.socket, target_port: int):
        self.conn = conn
        self.target_port = target_port
        self.passed: List[int] = []  # fds received, not yet named by getfd
        self.named: Dict[str, int] = {}

    def receive(self) -> Tuple[bytes, List[int]]:
        data, ancdata, _flags, _addr = self.conn.recvmsg(65536, socket.CMSG_SPACE(16 * FD_SIZE))
        fds: List[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % FD_SIZE
                fds += list(struct.unpack("@%di" % (usable // FD_SIZE), payload[:usable]))
        return data, fds

    def send(self, message: Dict[str, Any]) -> None:
        self.conn.sendall(json.dumps(message).encode() + b"\r\n")

    def serve(self) -> None:
        self.send(GREETING)
        decoder = json.JSONDecoder()
        text = ""
        while True:
            data, fds = self.receive()
            self.passed += fds
            if not data:
                return
            text += data.decode()
            while True:
                text = text.lstrip()  # the byte that carried an fd is a space
                if not text:
                    break
                try:
                    command, end = decoder.raw_decode(text)
                except ValueError:
                    break  # the rest of the command is still coming
                text = text[end:]
                self.answer(command)

    def answer(self, command: Dict[str, Any]) -> None:
        name = command.get("execute", "")
        args = command.get("arguments") or {}
        reply: Dict[str, Any]
        if name in ("qmp_capabilities", "cont"):
            reply = {"return": {}}
        elif name == "query-status":
            reply = {"return": {"status": "running", "running": True, "singlestep": False}}
        elif name == "query-name":
            reply = {"return": {}}
        elif name == "query-vnc-servers":
            reply = {"return": [VNC_SERVER]}
        elif name in ("qom-list", "query-chardev"):
            reply = {"return": []}
        elif name == "getfd" and self.passed:
            self.named[str(args.get("fdname"))] = self.passed.pop(0)
            reply = {"return": {}}
        elif name == "closefd" and str(args.get("fdname")) in self.named:
            os.close(self.named.pop(str(args.get("fdname"))))
            reply = {"return": {}}
        elif name == "add_client" and str(args.get("fdname")) in self.named:
            fd = self.named.pop(str(args.get("fdname")))
            threading.Thread(target=relay, args=(fd, self.target_port), daemon=True).start()
            reply = {"return": {}}
        else:
            reply = {"error": {"class": "CommandNotFound" if name not in ("getfd", "closefd", "add_client")
                               else "GenericError", "desc": "the stand-in does not do %s %s" % (name, args)}}
        if "id" in command:
            reply["id"] = command["id"]
        self.send(reply)


def main() -> int:
    path, target_port = sys.argv[1], int(sys.argv[2])
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    print("ready", flush=True)
    while True:  # one client at a time, as QEMU's QMP socket serves
        conn, _ = server.accept()
        monitor = Monitor(conn, target_port)
        try:
            monitor.serve()
        except (OSError, ValueError):
            pass
        finally:
            for fd in monitor.passed + list(monitor.named.values()):
                os.close(fd)
            conn.close()


if __name__ == "__main__":
    sys.exit(main())
