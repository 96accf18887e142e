"""What can go wrong between the agent and a QEMU, as exceptions that carry their context.

    vproxy.errors.VproxyError
     +-- QemuError              base of this package's own failures (vm: the VM's name)
          +-- VMGone            no QEMU answers (not started yet, exited, QMP lost)
          +-- QMPCommandError   QEMU answered a command with an error (command,
                                error_class, desc)
          +-- QMPBusy           a shared QMP socket (qmp = "shared") stayed held by
                                another client for the whole wait

Each message is written for the person at the other end of the stream: it names the VM
and, where there is one, what to change on the QEMU command line. Providers turn these
into `ChannelRefused` (before ACCEPT) or a stream reset (after).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from vproxy.errors import VproxyError


class QemuError(VproxyError):
    """A QEMU-side failure; ``str(e)`` is a complete, user-facing sentence."""

    def __init__(self, vm: str, message: str):
        super().__init__(message)
        self.vm = vm
        self.message = message


class VMGone(QemuError):
    """The VM's QEMU is not connected: it is not running yet, exited or dropped QMP."""


class QMPCommandError(QemuError):
    """QEMU refused a QMP command."""

    def __init__(self, vm: str, command: str, arguments: Optional[Dict[str, Any]],
                 error_class: str, desc: str):
        super().__init__(vm, "VM %s: QEMU refused %s: %s" % (vm, command, desc))
        self.command = command
        self.arguments = arguments
        self.error_class = error_class
        self.desc = desc

    @property
    def command_not_found(self) -> bool:
        return self.error_class == "CommandNotFound"


class QMPBusy(QemuError):
    """A shared QMP socket stayed busy: another client held it for the whole wait."""
