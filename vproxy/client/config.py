"""The client's configuration file: named hosts and defaults (TOML; see vproxy.conf(5)).

    [defaults]
    identity = "alice"                   # or cert/key, and ca, crl, pki_dir

    [hosts.vmhost1]
    address = "vmhost1.example:7443"
    ca = "~/work-pki/ca.pem"

    [hosts.here]
    address = "unix:/run/vproxy/agent.sock"   # local mode: no certificates

Each setting comes from, in increasing precedence: [defaults], the host's own table,
the environment (VPROXY_IDENTITY, ...), the command line. A certificate is chosen as a
whole: a layer that names an identity replaces the cert and key of the layers below it,
and one that names cert (and key) replaces their identity, so that VPROXY_IDENTITY=bob
is not silently combined with a host's cert = ".../alice.pem".

Relative paths in the file are relative to the file's directory; "~" is expanded.
Everything wrong in the file is a UserError naming the file and the key.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from vproxy.errors import UserError
from vproxy.security.certfiles import TlsFiles
from vproxy.tomlfile import load_toml

TLS_KEYS = ("identity", "cert", "key", "ca", "crl", "pki_dir")
PATH_KEYS = ("cert", "key", "ca", "crl", "pki_dir")
DEFAULT_KEYS = TLS_KEYS + ("server_name",)
HOST_KEYS = DEFAULT_KEYS + ("address",)
ENV_PATH = "VPROXY_CLIENT_CONFIG"


def default_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "vproxy" / "client.toml"


@dataclass
class ClientConfig:
    path: Optional[str] = None  # None: no file
    defaults: Dict[str, str] = field(default_factory=dict)
    hosts: Dict[str, Dict[str, str]] = field(default_factory=dict)  # in file order


def parse_client_config(data: Mapping[str, Any], path: str = "client config") -> ClientConfig:
    out = ClientConfig(path=path)
    unknown = set(data) - {"defaults", "hosts"}
    if unknown:
        raise UserError("%s: unknown key(s) %s (known: defaults, hosts)"
                        % (path, ", ".join(sorted(unknown))))
    base = os.path.dirname(os.path.abspath(path))
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise UserError("%s: [defaults] must be a table" % path)
    out.defaults = _settings(defaults, DEFAULT_KEYS, "%s: [defaults]" % path, base)
    hosts = data.get("hosts", {})
    if not isinstance(hosts, dict):
        raise UserError("%s: hosts must be tables: [hosts.NAME]" % path)
    for name, entry in hosts.items():
        where = "%s: [hosts.%s]" % (path, name)
        if not isinstance(entry, dict):
            raise UserError("%s: must be a table" % where)
        if not name or is_local_address(name) or any(c.isspace() for c in name):
            raise UserError("%s: a host name must be a plain word" % where)
        out.hosts[name] = _settings(entry, HOST_KEYS, where, base)
    return out


def _settings(table: Mapping[str, Any], known: tuple, where: str, base: str) -> Dict[str, str]:
    out = {}
    for key, value in table.items():
        if key not in known:
            raise UserError("%s: unknown key %r (known: %s)" % (where, key, ", ".join(known)))
        if not isinstance(value, str) or not value:
            raise UserError("%s: %s must be a non-empty string" % (where, key))
        if key in PATH_KEYS:
            value = os.path.join(base, os.path.expanduser(value))
        out[key] = value
    if "key" in out and "cert" not in out:
        raise UserError("%s: key without cert" % where)
    return out


def load_client_config(path: Optional[str] = None) -> ClientConfig:
    """The file given (it must exist), else the default one if it exists, else empty."""
    if path:
        if not os.path.exists(path):
            raise UserError("client config file %s does not exist" % path,
                            hint="check --client-config or %s" % ENV_PATH)
        return parse_client_config(load_toml(path), path)
    default = default_path()
    if not default.exists():
        return ClientConfig()
    return parse_client_config(load_toml(str(default)), str(default))


# --------------------------------------------------------------------------- targets

def is_local_address(address: str) -> bool:
    """`unix:/path` or a path (anything with a "/"): the agent's local unix socket."""
    return address.startswith("unix:") or "/" in address


def local_path(address: str) -> str:
    path = address[5:] if address.startswith("unix:") else address
    return os.path.abspath(os.path.expanduser(path))


def layer(lower: Mapping[str, Optional[str]], upper: Mapping[str, Optional[str]]) -> Dict[str, str]:
    """`upper` overrides `lower`; a certificate (identity, or cert+key) is taken whole."""
    out = {k: v for k, v in lower.items() if v}
    top = {k: v for k, v in upper.items() if v}
    if "identity" in top and "cert" not in top:
        out.pop("cert", None)
        out.pop("key", None)
    if "cert" in top and "identity" not in top:
        out.pop("identity", None)
        if "key" not in top:
            out.pop("key", None)
    out.update(top)
    return out


@dataclass(frozen=True)
class Target:
    """One agent to connect to, with its settings resolved."""

    name: str  # what the user typed (a host name from the file, or an address)
    address: str  # HOST[:PORT], or unix:/PATH
    tls: TlsFiles = field(default_factory=lambda: TlsFiles())  # empty in local mode
    server_name: Optional[str] = None

    @property
    def local(self) -> bool:
        return is_local_address(self.address)

    async def connect(self, **kw: Any):
        """A vproxy.client.AgentClient for this agent."""
        if self.local:
            from .local import connect_local  # lazy: asyncio and ssl only to connect

            return await connect_local(local_path(self.address), **kw)
        from .connection import connect  # lazy: asyncio and ssl only to connect

        return await connect(self.address, server_name=self.server_name, **self.tls, **kw)


def host_settings(config: ClientConfig, host: str) -> Dict[str, str]:
    """[defaults] overlaid with [hosts.HOST] (when HOST is a name in the file)."""
    entry = config.hosts.get(host)
    if entry is None:
        return dict(config.defaults)
    return layer(config.defaults, entry)


def host_address(config: ClientConfig, host: str) -> str:
    entry = config.hosts.get(host)
    if entry is None:
        return host
    return entry.get("address", host)


def host_names(config: ClientConfig) -> List[str]:
    return list(config.hosts)
