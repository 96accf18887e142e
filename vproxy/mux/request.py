"""What an OPEN asks for: a VM, a channel on it and a mode, plus channel options.

On the wire these are the fields "vm", "channel" and "mode" of the OPEN frame's field
list; every other field is an option of the channel (e.g. "replay" for a console).
"""

from dataclasses import dataclass, field
from typing import Dict

MODES = ("ro", "rw", "force", "hotplug")
MAX_NAME = 255  # longest VM or channel name accepted


class BadRequest(ValueError):
    """An OPEN whose fields make no sense; the agent refuses it with BAD_REQUEST."""


@dataclass(frozen=True)
class OpenRequest:
    vm: str
    channel: str
    mode: str = "rw"
    options: Dict[str, str] = field(default_factory=dict, hash=False)

    def to_fields(self) -> Dict[str, str]:
        fields = {"vm": self.vm, "channel": self.channel, "mode": self.mode}
        for key, value in self.options.items():
            if key in fields:
                raise ValueError("option %r clashes with a request field" % key)
            fields[key] = value
        return fields

    @classmethod
    def from_fields(cls, fields: Dict[str, str]) -> "OpenRequest":
        options = dict(fields)
        try:
            vm = options.pop("vm")
            channel = options.pop("channel")
            mode = options.pop("mode")
        except KeyError as e:
            raise BadRequest("the open request has no %s field" % e.args[0]) from None
        for what, value in (("VM name", vm), ("channel name", channel)):
            if len(value) > MAX_NAME:
                raise BadRequest("%s of %d characters (at most %d)" % (what, len(value), MAX_NAME))
            if any(ord(ch) < 32 or ch == "\x7f" for ch in value):
                raise BadRequest("%s contains control characters" % what)
        if mode not in MODES:
            raise BadRequest("unknown mode %r (one of %s)" % (mode[:32], ", ".join(MODES)))
        return cls(vm, channel, mode, options)

    def describe(self) -> str:
        where = "%s of VM %s" % (self.channel, self.vm) if self.vm else self.channel
        return "%s (%s)" % (where, self.mode)
