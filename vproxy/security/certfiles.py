"""Which certificate, key, CA and CRL files a side uses: given paths, or an identity
issued by `vproxy pki` in a PKI directory. The agent (`vproxy serve`) and every client
(the CLI and vproxy.api, through vproxy.client.credentials) turn their settings into
files here, so both sides read a PKI directory the same way.

Rules this module keeps:
- An identity NAME stands for PKI_DIR/issued/NAME.pem and NAME.key; a cert or key
  given as well wins over the identity's (a missing identity certificate is a
  UserError that says how to issue one).
- The CA defaults to PKI_DIR/ca.pem, which must then exist.
- Only the agent gets a default CRL: PKI_DIR/crl.pem, when the CA is the PKI's own
  (no ca given) and the file exists. The agent is the side that refuses revoked
  certificates; a client checks a CRL only when it is given one.
- PKI_DIR is the pki_dir setting, else vproxy.security.pki.default_pki_dir().
- The errors name the settings the way the caller's user spells them (--cert for the
  command line, cert= for the Python API): see `Wording`.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, TypedDict

from vproxy.errors import UserError

from .pki import CA_CERT, CRL, ISSUED, default_pki_dir


class TlsFiles(TypedDict, total=False):
    """The files a TLS context is made of; all four for TLS, none for local mode."""

    cert: str
    key: str
    ca: str
    crl: Optional[str]  # None: no CRL


@dataclass(frozen=True)
class Wording:
    """The messages for what is missing, in the caller's terms. ``no_key`` may name the
    certificate as {cert}; ``no_ca`` names the default CA path as {path}."""

    no_certificate: str
    no_certificate_hint: str
    no_key: str
    no_ca: str
    no_ca_hint: str


def certificate_files(settings: Mapping[str, Optional[str]], *, server: bool,
                      wording: Wording) -> TlsFiles:
    """identity / cert / key / ca / crl / pki_dir settings -> the cert, key, ca and crl
    paths (crl may be None), or a UserError saying what is missing."""
    pki_dir = Path(settings.get("pki_dir") or default_pki_dir()).expanduser()
    cert, key, ca, crl = settings.get("cert"), settings.get("key"), settings.get("ca"), settings.get("crl")
    identity = settings.get("identity")
    if identity:
        cert = cert or str(pki_dir / ISSUED / (identity + ".pem"))
        key = key or str(pki_dir / ISSUED / (identity + ".key"))
        if not Path(cert).exists():
            kind = "server" if server else "client"
            raise UserError("no certificate for identity %r in %s" % (identity, pki_dir / ISSUED),
                            hint="issue one with: vproxy pki issue %s %s" % (kind, identity))
    if not cert:
        raise UserError(wording.no_certificate, hint=wording.no_certificate_hint)
    if not key:
        raise UserError(wording.no_key.format(cert=cert))
    if not ca:
        ca = str(pki_dir / CA_CERT)
        if not Path(ca).exists():
            raise UserError(wording.no_ca.format(path=ca), hint=wording.no_ca_hint)
    if crl is None and server and (pki_dir / CRL).exists() and not settings.get("ca"):
        crl = str(pki_dir / CRL)  # the PKI's own CRL comes with its CA
    return {"cert": cert, "key": key, "ca": ca, "crl": crl}
