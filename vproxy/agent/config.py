"""The agent's configuration file (TOML; see man/vproxy.conf.5).

    listen = "0.0.0.0:7443"
    identity = "vmhost1"            # or cert/key/ca/crl paths
    vm_dir = "/run/vproxy/qmp"      # every socket NAME.qmp in it is VM NAME
    console_ring = 1048576          # bytes of console history kept per console
    console_log_dir = "/var/log/vproxy/consoles"
    audit_log = "/var/log/vproxy/audit.log"
    local_socket = "/run/vproxy/agent.sock"   # also serve local users, known by uid
    resume_prelaunch = false        # true: `cont` VMs started with -S after the takeover
    qmp = "exclusive"               # "shared": connect per command, poll (sockets others use)
    builtin_channels = "acl"        # sink/source/echo: "everyone" (default), "acl", "off"
    adopt = ["pty", "socket"]       # consoles on ptys, consoles and guest channels on socket servers

    [[vm]]
    name = "web1"
    qmp = "/run/qemu/web1.qmp"
    qmp_mode = "shared"             # optional: this VM's QMP mode, over the global qmp
    adopt = ["pty"]                 # optional: this VM's adopt kinds, over the global adopt

    [[allow]]
    identities = ["alice", "ops-*"]
    vms = ["web*"]
    channels = ["console", "vnc", "channel:org.qemu.guest_agent.0"]
    modes = ["rw"]

Everything wrong in the file is a UserError naming the file and the key.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from .acl import BUILTIN_POLICIES, Acl, rule_from_dict
from vproxy.errors import UserError
from vproxy.tomlfile import load_toml

KEYS: Dict[str, Any] = {  # key -> its type, or a tuple of types, for isinstance
    "listen": str, "identity": str, "cert": str, "key": str, "ca": str, "crl": str, "pki_dir": str,
    "handshake_timeout": (int, float), "audit_log": str, "vm_dir": str, "console_ring": int,
    "console_log_dir": str, "max_sessions": int, "max_sessions_per_identity": int,
    "max_sessions_per_address": int,
    "max_streams": int, "vm": list, "allow": list, "local_socket": str,
    "drain_timeout": (int, float), "metrics": str, "log_format": str, "resume_prelaunch": bool,
    "builtin_channels": str, "qmp": str, "adopt": list,
}

QMP_MODES = ("exclusive", "shared")  # vproxy.agent.qemu.monitor's, without importing qemu.qmp

#: The keys a [[vm]] table may have (name and qmp are required). In a [[vm]] the QMP
#: mode is ``qmp_mode``: ``qmp`` there is the socket's path.
VM_KEYS = ("name", "qmp", "qmp_mode", "adopt")

#: What ``adopt`` may list (as vproxy.agent.qemu.chardev.ADOPT_KINDS): a console whose
#: chardev is a pty is opened like ``virsh console`` does, one on a socket server is
#: connected to as its client; neither is changed.
ADOPT_KINDS = ("pty", "socket")


@dataclass
class AgentFileConfig:
    settings: Dict[str, Any] = field(default_factory=dict)  # the scalar keys, as given
    vms: List[Tuple[str, str]] = field(default_factory=list)  # (name, qmp path)
    #: name -> the settings a [[vm]] gives itself ({"qmp_mode": str, "adopt": tuple}),
    #: only the keys it sets; VMs without any are not in it
    vm_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    acl: Acl = field(default_factory=Acl)


def parse_agent_config(data: Dict[str, Any], path: str = "config") -> AgentFileConfig:
    out = AgentFileConfig()
    for key, value in data.items():
        kind = KEYS.get(key)
        if kind is None and key == "qmp_mode":
            raise UserError("%s: unknown key 'qmp_mode': the QMP mode of every VM is qmp = \"shared\" "
                            "(qmp_mode is the key of a [[vm]] table, whose qmp is its socket's path)" % path)
        if kind is None:
            raise UserError("%s: unknown key %r (known: %s)" % (path, key, ", ".join(sorted(KEYS))))
        if kind is bool:  # the only boolean key: true or false, nothing else
            if not isinstance(value, bool):
                raise UserError("%s: %s must be true or false, not %r (%s)"
                                % (path, key, value, type(value).__name__))
        elif not isinstance(value, kind) or isinstance(value, bool):
            raise UserError("%s: %s has the wrong type (%s)" % (path, key, type(value).__name__))
        if key not in ("vm", "allow"):
            out.settings[key] = value
    for index, vm in enumerate(data.get("vm", [])):
        where = "%s: [[vm]] #%d" % (path, index + 1)
        if (not isinstance(vm, dict) or not {"name", "qmp"} <= set(vm)
                or not all(isinstance(vm[k], str) and vm[k] for k in ("name", "qmp"))):
            raise UserError("%s: needs name = \"...\" and qmp = \"/path/to/qmp.sock\"" % where)
        where = "%s: [[vm]] %r" % (path, vm["name"])
        unknown = sorted(set(vm) - set(VM_KEYS))
        if unknown:
            raise UserError("%s: unknown key %r (a [[vm]] has %s)" % (where, unknown[0], ", ".join(VM_KEYS)))
        if any(vm["name"] == name for name, _ in out.vms):
            raise UserError("%s: VM %r is configured twice" % (where, vm["name"]))
        options: Dict[str, Any] = {}
        if "qmp_mode" in vm:
            if vm["qmp_mode"] not in QMP_MODES:
                raise UserError("%s: qmp_mode must be \"exclusive\" or \"shared\", not %r"
                                % (where, vm["qmp_mode"]))
            options["qmp_mode"] = vm["qmp_mode"]
        if "adopt" in vm:
            options["adopt"] = check_adopt(vm["adopt"], where)
        out.vms.append((vm["name"], vm["qmp"]))
        if options:
            out.vm_options[vm["name"]] = options
    rules = []
    for index, rule in enumerate(data.get("allow", [])):
        where = "%s: [[allow]] #%d" % (path, index + 1)
        if not isinstance(rule, dict):
            raise UserError("%s: must be a table" % where)
        rules.append(rule_from_dict(rule, where))
    out.acl = Acl(rules)
    for key in ("console_ring", "max_sessions", "max_sessions_per_identity",
                "max_sessions_per_address", "max_streams"):
        if out.settings.get(key, 1) <= 0:
            raise UserError("%s: %s must be positive" % (path, key))
    if out.settings.get("drain_timeout", 0) < 0:
        raise UserError("%s: drain_timeout must not be negative" % path)
    if out.settings.get("builtin_channels", "everyone") not in BUILTIN_POLICIES:
        raise UserError("%s: builtin_channels must be \"everyone\", \"acl\" or \"off\", not %r"
                        % (path, out.settings["builtin_channels"]))
    if out.settings.get("qmp", "exclusive") not in QMP_MODES:
        raise UserError("%s: qmp must be \"exclusive\" or \"shared\", not %r (the QMP socket of a "
                        "[[vm]] is its own qmp = \"/path\")" % (path, out.settings["qmp"]))
    check_adopt(out.settings.get("adopt", list(ADOPT_KINDS)), path)
    if out.settings.get("log_format", "text") not in ("text", "json"):
        raise UserError("%s: log_format must be \"text\" or \"json\"" % path)
    return out


def check_adopt(adopt: Any, where: str) -> Tuple[str, ...]:
    """An ``adopt`` list (global or a [[vm]]'s), as a tuple; UserError naming *where*."""
    if not isinstance(adopt, list) or not all(isinstance(k, str) and k in ADOPT_KINDS for k in adopt):
        raise UserError("%s: adopt must list some of \"pty\" and \"socket\" (or be []), not %r"
                        % (where, adopt))
    return tuple(adopt)


def load_agent_config(path: Optional[str]) -> AgentFileConfig:
    if not path:
        return AgentFileConfig()
    return parse_agent_config(load_toml(path), path)
