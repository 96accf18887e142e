"""The API's arguments -> the agent and the files to connect with, through the same
resolver as the command line (vproxy.client.credentials).

Rules this module keeps:
- Precedence, as for the CLI: the client configuration file's [defaults], then its
  [hosts.NAME] table when the address is such a NAME, then the VPROXY_* environment
  variables, then the arguments. The file is $VPROXY_CLIENT_CONFIG, else
  ~/.config/vproxy/client.toml if it exists.
- The address is the argument, else $VPROXY_HOST; there is no default agent.
- The messages speak of arguments (cert=, key=, ca=), not of flags; every file is
  checked here so that a typo is a UserError naming it, before any connection.
"""

import os
from pathlib import Path
from typing import Dict, Optional, Union

from vproxy.client.config import ENV_PATH, Target, load_client_config
from vproxy.client.credentials import HOST_VARIABLE, environment_settings, resolve_target
from vproxy.errors import UserError
from vproxy.security.certfiles import Wording

PathLike = Union[str, "os.PathLike[str]"]

API_WORDING = Wording(
    no_certificate="no client certificate: pass cert= and key=, or identity=",
    no_certificate_hint="or set VPROXY_CERT and VPROXY_KEY, or VPROXY_IDENTITY",
    no_key="a certificate ({cert}) but no key: pass key=",
    no_ca="no CA certificate: {path} does not exist and ca= was not given",
    no_ca_hint="pass ca='ca.pem' (the CA that signed the agent's certificate)")


def resolve_target_for_api(address: Optional[str] = None, *, cert: Optional[PathLike] = None,
                           key: Optional[PathLike] = None, ca: Optional[PathLike] = None,
                           crl: Optional[PathLike] = None, identity: Optional[str] = None,
                           pki_dir: Optional[PathLike] = None,
                           server_name: Optional[str] = None) -> Target:
    """connect()'s arguments -> the Target (see the module doc), files checked."""
    address = address or os.environ.get(HOST_VARIABLE)
    if not address:
        raise UserError("no agent address: pass one, or set VPROXY_HOST",
                        hint="e.g. vproxy.api.connect('vmhost1:7443', identity='alice')")
    arguments = {"cert": cert, "key": key, "ca": ca, "crl": crl, "identity": identity,
                 "pki_dir": pki_dir, "server_name": server_name}
    target = resolve_target(
        address, load_client_config(os.environ.get(ENV_PATH)), environment=environment_settings(),
        arguments={k: os.fspath(v) for k, v in arguments.items() if v}, wording=API_WORDING)
    tls = target.tls
    for what, path in (("certificate", tls.get("cert")), ("key", tls.get("key")),
                       ("CA certificate", tls.get("ca")), ("CRL", tls.get("crl"))):
        if path and not Path(path).is_file():
            raise UserError("%s %s: no such file" % (what, path))
    return target


def resolve_credentials(address: Optional[str] = None, *, cert: Optional[PathLike] = None,
                        key: Optional[PathLike] = None, ca: Optional[PathLike] = None,
                        crl: Optional[PathLike] = None, identity: Optional[str] = None,
                        pki_dir: Optional[PathLike] = None) -> Dict[str, Optional[str]]:
    """The agent address and TLS files, from the arguments, else the VPROXY_*
    environment variables, else the client configuration file's entry for the address
    and its [defaults], else the PKI directory; UserError saying what is missing.
    (For a local-mode address, unix:/PATH, the files are all None.)"""
    target = resolve_target_for_api(address, cert=cert, key=key, ca=ca, crl=crl, identity=identity,
                                    pki_dir=pki_dir)
    tls = target.tls
    return {"address": target.address, "cert": tls.get("cert"), "key": tls.get("key"),
            "ca": tls.get("ca"), "crl": tls.get("crl")}
