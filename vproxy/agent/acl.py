"""Authorization: which certificate identities may open which channels of which VMs.

Deny by default. A request is allowed when one rule matches all of:
- identity: one of the identity's names (CN, then SANs) matches one of the rule's
  `identities` globs;
- VM: one of the VM's names matches one of the rule's `vms` globs. A VM found in a
  vm_dir whose QEMU has -name has two: that name and its socket's name (its alias,
  e.g. "web1" and "100" for Proxmox's 100.qmp), and a request for either is matched
  with both (the agent passes `vm_names`), so a rule for "web1" grants "100" too and
  a rule for "100" grants "web1"; a rule for another VM grants neither. Rules only
  grant, so matching more names can only open the VM to the rules written for it;
  a glob like "web*" also matches a VM whose alias starts with "web";
- channel: one of the rule's `channels` entries matches: "console" (every console),
  "console:ID", "channel" (every guest channel), "channel:NAME-GLOB", "vnc", or "*";
- mode: the rule's `modes` grant it. "rw" includes "ro", "force" includes "rw" and
  "ro"; "hotplug" (adding a new guest channel) is granted only by name.

The kind "bench" names the agent's built-in channels (sink, source, echo: no VM),
which the agent puts under the ACL only with builtin_channels = "acl" (vproxy.agent.server).
A rule grants them with the entry "bench" (all three) or "bench:NAME-GLOB", whatever
its `vms` and `modes` (the built-in channels belong to no VM and have no modes), or
with "*" (channels unspecified) when its `vms` include "*": a rule for every channel
of every VM, as --allow makes, grants bench too; "*" on some VMs only does not. A
rule with only "bench" entries makes no VM visible in `vproxy ls`.

Globs are fnmatch patterns, matched case-sensitively.
"""

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from vproxy.errors import ChannelRefused, UserError
from vproxy.mux import OpenRequest, RefuseCode

MODES = ("ro", "rw", "force", "hotplug")
_IMPLIES = {"ro": {"ro"}, "rw": {"ro", "rw"}, "force": {"ro", "rw", "force"}, "hotplug": {"hotplug"}}
CHANNEL_KINDS = ("console", "channel", "vnc", "bench")
# builtin_channels: every client, the identities a rule grants "bench", or nobody
BUILTIN_POLICIES = ("everyone", "acl", "off")


@dataclass(frozen=True)
class Rule:
    identities: Tuple[str, ...]
    vms: Tuple[str, ...] = ("*",)
    channels: Tuple[str, ...] = ("*",)
    modes: Tuple[str, ...] = ("rw",)

    def granted_modes(self) -> set:
        out = set()
        for mode in self.modes:
            out |= _IMPLIES[mode]
        return out

    def matches_identity(self, names: Sequence[str]) -> bool:
        return any(fnmatchcase(n, g) for n in names for g in self.identities)

    def matches_vm(self, vm: str, vm_names: Optional[Sequence[str]] = None) -> bool:
        """Whether one of the VM's names (*vm_names*; default: just *vm*) matches."""
        return any(fnmatchcase(n, g) for n in (vm_names or (vm,)) for g in self.vms)

    def matches_channel(self, channel: str) -> bool:
        """A VM's channel (console, console:ID, channel:NAME, vnc)."""
        kind, _, arg = channel.partition(":")
        if kind == "bench":
            return False  # not a VM's channel: see grants_bench
        for entry in self.channels:
            if entry == "*" or entry == kind:
                return True
            e_kind, _, e_arg = entry.partition(":")
            if e_kind == kind and arg and fnmatchcase(arg, e_arg):
                return True
        return False

    def grants_bench(self, name: str) -> bool:
        """Whether this rule opens the built-in channel `name` (sink, source, echo)."""
        for entry in self.channels:
            if entry == "bench" or (entry == "*" and "*" in self.vms):
                return True
            kind, _, arg = entry.partition(":")
            if kind == "bench" and arg and fnmatchcase(name, arg):
                return True
        return False

    def grants_vms(self) -> bool:
        """Whether this rule names any channel of a VM (not only bench entries)."""
        return any(entry.partition(":")[0] != "bench" for entry in self.channels)


class Acl:
    def __init__(self, rules: Iterable[Rule] = ()):
        self.rules: List[Rule] = list(rules)

    def allows(self, identity, request: OpenRequest, vm_names: Optional[Sequence[str]] = None) -> bool:
        """*vm_names*: every name of the VM *request* opens (its name and aliases, as
        VMRegistry.names_of gives them); default: just the name asked for."""
        names = identity.names() if hasattr(identity, "names") else (str(identity),)
        for rule in self.rules:
            if (rule.matches_identity(names) and rule.matches_vm(request.vm, vm_names)
                    and rule.matches_channel(request.channel)
                    and request.mode in rule.granted_modes()):
                return True
        return False

    def check(self, identity, request: OpenRequest, vm_names: Optional[Sequence[str]] = None) -> None:
        """Raise ChannelRefused(FORBIDDEN) naming who, what and the missing grant."""
        if self.allows(identity, request, vm_names):
            return
        names = identity.names() if hasattr(identity, "names") else (str(identity),)
        partial = [r for r in self.rules if r.matches_identity(names) and r.matches_vm(request.vm, vm_names)
                   and r.matches_channel(request.channel)]
        if partial:
            why = "mode %s is not granted (only %s)" % (
                request.mode, ", ".join(sorted(set().union(*(r.granted_modes() for r in partial)))))
        else:
            why = "no ACL rule grants it"
        raise ChannelRefused(RefuseCode.FORBIDDEN, "%s may not open %s of VM %s: %s"
                             % (identity, request.channel, request.vm, why))

    def allows_bench(self, identity, name: str) -> bool:
        """Whether a rule grants `identity` the built-in channel `name` (kind "bench")."""
        names = identity.names() if hasattr(identity, "names") else (str(identity),)
        return any(r.matches_identity(names) and r.grants_bench(name) for r in self.rules)

    def visible_vms(self, identity, names: Iterable[str],
                    aliases: Optional[Dict[str, Sequence[str]]] = None) -> List[str]:
        """The VMs an identity may open anything on (what `vproxy ls` shows it);
        *aliases*: VM name -> its other names, matched like the name."""
        ids = identity.names() if hasattr(identity, "names") else (str(identity),)
        rules = [r for r in self.rules if r.matches_identity(ids) and r.grants_vms()]
        aliases = aliases or {}
        return [vm for vm in names
                if any(r.matches_vm(vm, (vm, *aliases.get(vm, ()))) for r in rules)]


def rule_from_dict(data: dict, where: str) -> Rule:
    """A rule from the config file; UserError naming `where` for anything wrong."""
    known = {"identities", "vms", "channels", "modes"}
    unknown = set(data) - known
    if unknown:
        raise UserError("%s: unknown key(s) %s (known: %s)" % (where, ", ".join(sorted(unknown)),
                                                             ", ".join(sorted(known))))
    if "identities" not in data:
        raise UserError("%s: a rule needs identities = [...]" % where)

    def strings(key, default):
        value = data.get(key, default)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
            raise UserError("%s: %s must be a non-empty list of strings" % (where, key))
        return tuple(value)

    modes = strings("modes", ["rw"])
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise UserError("%s: unknown mode(s) %s (one of %s)" % (where, ", ".join(bad), ", ".join(MODES)))
    channels = strings("channels", ["*"])
    for entry in channels:
        if entry != "*" and entry.partition(":")[0] not in CHANNEL_KINDS:
            raise UserError("%s: unknown channel %r (console, console:ID, channel, channel:NAME, vnc, "
                            "bench, bench:NAME or *)"
                            % (where, entry))
    return Rule(strings("identities", None), strings("vms", ["*"]), channels, modes)
