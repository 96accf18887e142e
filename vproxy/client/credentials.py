"""Which agent a client connects to, and with which certificate: the one resolver that
the command line (vproxy.cli.common) and the Python API (vproxy.api) both use.

Rules this module keeps:
- HOST is a name from the client configuration file (vproxy.client.config), else
  HOST[:PORT], else unix:/PATH or a path (local mode: the agent's unix socket, no
  certificate at all).
- Each setting (identity, cert, key, ca, crl, pki_dir, server_name) comes from, in
  increasing precedence: the file's [defaults], the host's [hosts.NAME] table, the
  environment (VPROXY_IDENTITY, VPROXY_CERT, ...), the caller (the command line's flags,
  the API's arguments). A certificate is taken whole at each step (config.layer).
- The settings become files as for the agent (vproxy.security.certfiles): an identity
  is PKI_DIR/issued/NAME.pem and .key, the CA defaults to PKI_DIR/ca.pem, and a client
  checks a CRL only when one is set somewhere above (no default CRL).
- The caller says which value came from where: this module reads no flags and no
  environment behind its back (`environment_settings` reads VPROXY_* for callers that
  have no click to do it), so the same layering serves both front ends.
"""

import os
from typing import Dict, Mapping, Optional

from vproxy.security.certfiles import Wording, certificate_files

from .config import TLS_KEYS, ClientConfig, Target, host_address, host_settings, is_local_address, layer

#: The environment variable of each TLS setting (the CLI's options read the same ones).
ENVIRONMENT = {key: "VPROXY_" + key.upper() for key in TLS_KEYS}
#: The agent to connect to when the caller names none (the API; the CLI takes HOST).
HOST_VARIABLE = "VPROXY_HOST"


def environment_settings(environ: Mapping[str, str] = os.environ) -> Dict[str, str]:
    """The TLS settings the VPROXY_* environment variables give (empty ones left out)."""
    return {key: environ[name] for key, name in ENVIRONMENT.items() if environ.get(name)}


def resolve_target(host: Optional[str], config: ClientConfig, *,
                   environment: Mapping[str, Optional[str]],
                   arguments: Mapping[str, Optional[str]], wording: Wording) -> Target:
    """HOST and the settings of each layer (see the module doc) -> the Target to
    connect to, or a UserError saying what is missing. An empty HOST resolves only the
    certificate (the Target's address is then "")."""
    address = host_address(config, host) if host else ""
    if address and is_local_address(address):
        return Target(host or "", address, {}, None)  # local mode: no certificates
    settings = layer(layer(host_settings(config, host or ""), environment), arguments)
    files = certificate_files(settings, server=False, wording=wording)
    return Target(host or "", address, files, settings.get("server_name"))
