"""A small certificate authority for vproxy: one CA, server and client certificates, a CRL.

A PKI directory (default ~/.config/vproxy/pki, always passed in explicitly):

    ca.pem              the CA certificate: give it to every agent and every client
    ca.key              the CA's private key (mode 0600); never leaves this directory
    crl.pem             the certificate revocation list, signed by the CA
    index.json          what was issued: serial, name, subject, kind, not_after, path, revoked
    issued/NAME.pem     issued certificates (unless --out put them elsewhere)
    issued/NAME.key     their private keys (mode 0600)

Rules kept here:
- Keys are ECDSA P-256, written with mode 0600 from the moment they exist (a temporary
  file opened with 0600, then renamed into place).
- Nothing is overwritten without force=True: an existing file raises UserError.
- `cryptography` is imported inside the functions that need it, never at module level:
  the data path (vproxy.security.tls) must not need it, and without it only `vproxy pki` fails,
  with a UserError that says what to install.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
import json
import os
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from vproxy.errors import UserError
from vproxy.security.native import ensure_cryptography

PathLike = Union[str, "os.PathLike[str]"]

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CRL = "crl.pem"
INDEX = "index.json"
ISSUED = "issued"

KINDS = ("server", "client")
DEFAULT_CERT_DAYS = 825
DEFAULT_CA_DAYS = 3650
DEFAULT_CRL_DAYS = 365
# Certificates start a little in the past so that a peer whose clock lags accepts them.
CLOCK_SKEW = _dt.timedelta(minutes=5)

# Extended key usages accepted by issue(key_usage_override=...), by their usual names.
EKU_NAMES = ("serverAuth", "clientAuth", "codeSigning", "emailProtection",
             "timeStamping", "OCSPSigning")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+:-]{0,127}$")


def default_pki_dir() -> Path:
    """$VPROXY_PKI_DIR, else $XDG_CONFIG_HOME/vproxy/pki, else ~/.config/vproxy/pki."""
    env = os.environ.get("VPROXY_PKI_DIR")
    if env:
        return Path(env).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join("~", ".config")
    return Path(config).expanduser() / "vproxy" / "pki"


@dataclass(frozen=True)
class IssuedCert:
    """One entry of index.json."""

    name: str
    kind: str                       # "server" or "client"
    serial: int
    subject: str                    # RFC 4514 text, e.g. "CN=alice"
    not_after: _dt.datetime         # UTC, timezone-aware
    path: str                       # the certificate file as written
    revoked: bool
    revoked_at: Optional[_dt.datetime] = None

    @property
    def serial_hex(self) -> str:
        return _hex_serial(self.serial)


# --------------------------------------------------------------------------- cryptography

def _crypto() -> Any:
    """Import cryptography's pieces, or say clearly what is missing."""
    ensure_cryptography()  # in the .pyz: unpacks the bundled wheels on first use
    # lazy: cryptography is heavy, and in the .pyz it exists only after ensure_cryptography()
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise UserError("vproxy pki needs the 'cryptography' package",
                        hint="pip install cryptography") from None

    return types.SimpleNamespace(x509=x509, hashes=hashes, serialization=serialization, ec=ec,
                                 EKU=ExtendedKeyUsageOID, NameOID=NameOID)


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _aware(value: _dt.datetime) -> _dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=_dt.timezone.utc)


def _not_before(cert: Any) -> _dt.datetime:
    value = getattr(cert, "not_valid_before_utc", None)   # cryptography >= 42
    return value if value is not None else _aware(cert.not_valid_before)


def _not_after(cert: Any) -> _dt.datetime:
    value = getattr(cert, "not_valid_after_utc", None)
    return value if value is not None else _aware(cert.not_valid_after)


def _crl_next_update(crl: Any) -> Optional[_dt.datetime]:
    if hasattr(crl, "next_update_utc"):
        return crl.next_update_utc
    return _aware(crl.next_update) if crl.next_update is not None else None


def _revocation_date(revoked: Any) -> _dt.datetime:
    value = getattr(revoked, "revocation_date_utc", None)
    return value if value is not None else _aware(revoked.revocation_date)


def _hex_serial(serial: int) -> str:
    text = "%X" % serial
    if len(text) % 2:
        text = "0" + text
    return ":".join(text[i:i + 2] for i in range(0, len(text), 2))


def _iso(value: _dt.datetime) -> str:
    return value.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(text: str) -> _dt.datetime:
    return _dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=_dt.timezone.utc)


# --------------------------------------------------------------------------- files

def _check_free(paths: Iterable[Path], force: bool) -> None:
    if force:
        return
    for path in paths:
        if path.exists() or path.is_symlink():
            raise UserError("%s already exists; not overwriting it" % path,
                            hint="pass --force to replace it (force=True)")


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically; the file has `mode` from its creation (no chmod window)."""
    tmp = path.with_name(".%s.tmp-%d" % (path.name, os.getpid()))
    try:
        fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        os.unlink(str(tmp))
        fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as e:
        raise UserError("cannot write %s: %s" % (path, e.strerror or e)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(str(tmp), str(path))
    except OSError as e:
        try:
            os.unlink(str(tmp))
        except OSError:
            pass
        raise UserError("cannot write %s: %s" % (path, e.strerror or e)) from None


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise UserError("cannot create directory %s: %s" % (path, e.strerror or e)) from None


def _read(path: Path, what: str, hint: str = "") -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError("cannot read %s %s: %s" % (what, path, e.strerror or e),
                        hint=hint) from None


def _key_pem(c: Any, key: Any) -> bytes:
    s = c.serialization
    return key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())


def _cert_pem(c: Any, cert: Any) -> bytes:
    return cert.public_bytes(c.serialization.Encoding.PEM)


def _load_cert(c: Any, path: Path, what: str = "certificate") -> Any:
    data = _read(path, what)
    try:
        return c.x509.load_pem_x509_certificate(data)
    except ValueError:
        try:
            return c.x509.load_der_x509_certificate(data)
        except ValueError:
            raise UserError("%s is not a certificate (neither PEM nor DER)" % path) from None


def _no_ca_hint(pki_dir: Path) -> str:
    return "create the CA with: vproxy pki init --dir %s" % pki_dir


def _load_ca(c: Any, pki_dir: Path) -> Tuple[Any, Any]:
    cert_path, key_path = pki_dir / CA_CERT, pki_dir / CA_KEY
    if not cert_path.exists():
        raise UserError("no CA in %s (%s is missing)" % (pki_dir, cert_path),
                        hint=_no_ca_hint(pki_dir))
    cert = _load_cert(c, cert_path, "CA certificate")
    data = _read(key_path, "CA key", _no_ca_hint(pki_dir))
    try:
        key = c.serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise UserError("cannot load CA key %s: %s" % (key_path, e)) from None
    if key.public_key().public_bytes(
            c.serialization.Encoding.DER, c.serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
            c.serialization.Encoding.DER, c.serialization.PublicFormat.SubjectPublicKeyInfo):
        raise UserError("CA key %s does not belong to CA certificate %s" % (key_path, cert_path))
    return cert, key


# --------------------------------------------------------------------------- index

def _load_index(pki_dir: Path) -> Dict[str, Any]:
    path = pki_dir / INDEX
    if not path.exists():
        return {"version": 1, "crl_number": 0, "crl_days": DEFAULT_CRL_DAYS, "certs": []}
    try:
        index = json.loads(_read(path, "index").decode("utf-8"))
    except ValueError as e:
        raise UserError("%s is corrupt: %s" % (path, e)) from None
    index.setdefault("certs", [])
    index.setdefault("crl_number", 0)
    index.setdefault("crl_days", DEFAULT_CRL_DAYS)
    return index


def _save_index(pki_dir: Path, index: Dict[str, Any]) -> None:
    data = json.dumps(index, indent=2, sort_keys=True).encode("utf-8") + b"\n"
    _write(pki_dir / INDEX, data, 0o600)


def _entry(raw: Dict[str, Any]) -> IssuedCert:
    return IssuedCert(
        name=raw["name"], kind=raw["kind"], serial=int(raw["serial"], 16),
        subject=raw["subject"], not_after=_parse_iso(raw["not_after"]), path=raw["path"],
        revoked=bool(raw.get("revoked")),
        revoked_at=_parse_iso(raw["revoked_at"]) if raw.get("revoked_at") else None)


def list_issued(pki_dir: PathLike) -> List[IssuedCert]:
    """Everything this CA issued, oldest first."""
    return [_entry(raw) for raw in _load_index(Path(pki_dir))["certs"]]


# --------------------------------------------------------------------------- CA and CRL

def init_ca(pki_dir: PathLike, common_name: str = "vproxy CA", days: int = DEFAULT_CA_DAYS,
            force: bool = False, crl_days: int = DEFAULT_CRL_DAYS) -> Path:
    """Create a CA in pki_dir: ca.pem, ca.key (0600), an empty crl.pem, index.json.

    Returns the path of ca.pem. Refuses to replace an existing CA unless force=True
    (which also forgets what the old CA issued).
    """
    c = _crypto()
    pki_dir = Path(pki_dir).expanduser()
    _positive(days, "days")
    _positive(crl_days, "CRL days")
    _check_free([pki_dir / CA_CERT, pki_dir / CA_KEY], force)
    _mkdir(pki_dir)
    x509 = c.x509

    key = c.ec.generate_private_key(c.ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(c.NameOID.COMMON_NAME, common_name)])
    now = _utcnow()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, c.hashes.SHA256())
    )
    _write(pki_dir / CA_KEY, _key_pem(c, key), 0o600)
    _write(pki_dir / CA_CERT, _cert_pem(c, cert), 0o644)
    index = {"version": 1, "crl_number": 0, "crl_days": crl_days, "certs": []}
    _mkdir(pki_dir / ISSUED)
    _write_crl(c, pki_dir, cert, key, index, crl_days)
    return pki_dir / CA_CERT


def _write_crl(c: Any, pki_dir: Path, ca_cert: Any, ca_key: Any, index: Dict[str, Any],
               days: int) -> Path:
    """Sign a CRL listing every revoked entry of index; bump its number; save both."""
    x509 = c.x509
    now = _utcnow()
    index["crl_number"] = int(index.get("crl_number", 0)) + 1
    index["crl_days"] = days
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + _dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(index["crl_number"]), critical=False)
    )
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    except x509.ExtensionNotFound:
        pass
    seen = set()
    for raw in index["certs"]:
        if not raw.get("revoked") or raw["serial"] in seen:
            continue
        seen.add(raw["serial"])
        revoked_at = _parse_iso(raw["revoked_at"]) if raw.get("revoked_at") else now
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(int(raw["serial"], 16))
            .revocation_date(revoked_at)
            .build())
    crl = builder.sign(ca_key, c.hashes.SHA256())
    path = pki_dir / CRL
    _write(path, crl.public_bytes(c.serialization.Encoding.PEM), 0o644)
    _save_index(pki_dir, index)
    return path


def update_crl(pki_dir: PathLike, days: Optional[int] = None) -> Path:
    """Re-sign crl.pem (same revocations, fresh validity of `days`, default as before).

    A CRL past its next-update time makes every peer fail verification (when the agent
    checks a CRL), so re-sign it before then; crl_next_update() tells when that is.
    """
    c = _crypto()
    pki_dir = Path(pki_dir).expanduser()
    ca_cert, ca_key = _load_ca(c, pki_dir)
    index = _load_index(pki_dir)
    days = int(index.get("crl_days", DEFAULT_CRL_DAYS)) if days is None else days
    _positive(days, "CRL days")
    return _write_crl(c, pki_dir, ca_cert, ca_key, index, days)


def crl_next_update(pki_dir: PathLike) -> Optional[_dt.datetime]:
    """When crl.pem in pki_dir stops being valid."""
    c = _crypto()
    path = Path(pki_dir).expanduser() / CRL
    try:
        crl = c.x509.load_pem_x509_crl(_read(path, "CRL"))
    except ValueError:
        raise UserError("%s is not a PEM CRL" % path) from None
    return _crl_next_update(crl)


def _positive(value: int, what: str) -> None:
    if int(value) <= 0:
        raise UserError("%s must be a positive number of days, not %s" % (what, value))


# --------------------------------------------------------------------------- issuing

def _check_name(name: str) -> None:
    if not _NAME_RE.match(name or "") or ".." in name:
        raise UserError("bad certificate name %r: use letters, digits and . _ @ + : - "
                        "(it names the files NAME.pem and NAME.key)" % name)


def _parse_ip(text: str) -> Any:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise UserError("%r is not an IP address" % text,
                        hint="give host names with --dns and addresses with --ip") from None


def looks_like_ip(text: str) -> bool:
    """Whether *text* is an IPv4 or IPv6 address (then a SAN is IP:, else DNS:)."""
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def issue(pki_dir: PathLike, name: str, kind: str,
          dns_names: Sequence[str] = (), ip_addresses: Sequence[str] = (),
          days: int = DEFAULT_CERT_DAYS, valid_from: Optional[_dt.datetime] = None,
          out_dir: Optional[PathLike] = None, force: bool = False,
          key_usage_override: Optional[Sequence[str]] = None,
          uris: Sequence[str] = ()) -> Tuple[Path, Path]:
    """Issue a certificate and key signed by the CA in pki_dir; return (cert, key) paths.

    kind "server": extended key usage serverAuth; SANs from dns_names and ip_addresses,
    or, if both are empty, `name` itself (an IP SAN if it parses as an address).
    kind "client": extended key usage clientAuth; the identity is CN=name (SANs only if
    dns_names / ip_addresses / uris are given).

    The files are OUT/NAME.pem and OUT/NAME.key (0600), OUT being pki_dir/issued unless
    out_dir is given. valid_from (default: now minus five minutes) and days set the
    validity: tests pass a past or future valid_from to make expired or not-yet-valid
    certificates. key_usage_override replaces the extended key usages by these names
    (see EKU_NAMES); an empty sequence leaves the extension out.
    """
    if kind not in KINDS:
        raise UserError("unknown certificate kind %r: use 'server' or 'client'" % (kind,))
    _check_name(name)
    _positive(days, "days")
    ips = [_parse_ip(text) for text in ip_addresses]
    dns = [str(d).strip() for d in dns_names]
    for d in dns:
        if not d or " " in d or looks_like_ip(d):
            raise UserError("%r is not a DNS name" % d,
                            hint="give host names with --dns and addresses with --ip")
    if kind == "server" and not dns and not ips:
        if looks_like_ip(name):
            ips = [ipaddress.ip_address(name)]
        else:
            dns = [name]
    ekus = key_usage_override
    if ekus is None:
        ekus = ("serverAuth",) if kind == "server" else ("clientAuth",)
    for eku in ekus:
        if eku not in EKU_NAMES:
            raise UserError("unknown extended key usage %r (known: %s)"
                            % (eku, ", ".join(EKU_NAMES)))

    c = _crypto()
    x509 = c.x509
    pki_dir = Path(pki_dir).expanduser()
    ca_cert, ca_key = _load_ca(c, pki_dir)
    out = Path(out_dir).expanduser() if out_dir is not None else pki_dir / ISSUED
    cert_path, key_path = out / (name + ".pem"), out / (name + ".key")
    _check_free([cert_path, key_path], force)
    _mkdir(out)

    start = _aware(valid_from) if valid_from is not None else _utcnow() - CLOCK_SKEW
    end = start + _dt.timedelta(days=days)
    key = c.ec.generate_private_key(c.ec.SECP256R1())
    serial = x509.random_serial_number()
    eku_oids = {
        "serverAuth": c.EKU.SERVER_AUTH, "clientAuth": c.EKU.CLIENT_AUTH,
        "codeSigning": c.EKU.CODE_SIGNING, "emailProtection": c.EKU.EMAIL_PROTECTION,
        "timeStamping": c.EKU.TIME_STAMPING, "OCSPSigning": c.EKU.OCSP_SIGNING,
    }
    subject = x509.Name([x509.NameAttribute(c.NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
    )
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())
    builder = builder.add_extension(aki, critical=False)
    if ekus:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([eku_oids[e] for e in ekus]), critical=False)
    sans = ([x509.DNSName(d) for d in dns] + [x509.IPAddress(i) for i in ips]
            + [x509.UniformResourceIdentifier(u) for u in uris])
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, c.hashes.SHA256())

    _write(key_path, _key_pem(c, key), 0o600)
    _write(cert_path, _cert_pem(c, cert), 0o644)
    index = _load_index(pki_dir)
    index["certs"].append({
        "name": name, "kind": kind, "serial": "%x" % serial,
        "subject": subject.rfc4514_string(), "not_after": _iso(end),
        "path": str(cert_path.resolve()), "revoked": False, "revoked_at": None,
    })
    _save_index(pki_dir, index)
    return cert_path, key_path


# --------------------------------------------------------------------------- revoking

def revoke(pki_dir: PathLike, name_or_cert_path: PathLike) -> Path:
    """Revoke by certificate file or by NAME (every unrevoked certificate of that name);
    re-sign crl.pem and mark index.json. Returns the path of crl.pem."""
    c = _crypto()
    pki_dir = Path(pki_dir).expanduser()
    ca_cert, ca_key = _load_ca(c, pki_dir)
    index = _load_index(pki_dir)
    target = str(name_or_cert_path)
    as_path = Path(target).expanduser()
    now = _iso(_utcnow())

    if os.sep in target or target.endswith((".pem", ".crt")) or as_path.is_file():
        cert = _load_cert(c, as_path)
        if cert.issuer != ca_cert.subject:
            raise UserError("%s was not issued by the CA in %s (its issuer is %s)"
                            % (as_path, pki_dir, cert.issuer.rfc4514_string()))
        serial = "%x" % cert.serial_number
        entries = [raw for raw in index["certs"] if raw["serial"] == serial]
        if not entries:   # issued elsewhere by this CA (e.g. index lost): still revocable
            entries = [{
                "name": as_path.stem, "kind": _kind_of(c, cert),
                "serial": serial, "subject": cert.subject.rfc4514_string(),
                "not_after": _iso(_not_after(cert)), "path": str(as_path.resolve()),
                "revoked": False, "revoked_at": None}]
            index["certs"].append(entries[0])
        if all(raw.get("revoked") for raw in entries):
            raise UserError("%s (serial %s) is already revoked"
                            % (as_path, _hex_serial(cert.serial_number)))
    else:
        entries = [raw for raw in index["certs"]
                   if raw["name"] == target and not raw.get("revoked")]
        if not entries:
            known = [raw for raw in index["certs"] if raw["name"] == target]
            if known:
                raise UserError("every certificate named %r is already revoked" % target)
            raise UserError("no certificate named %r was issued by the CA in %s"
                            % (target, pki_dir), hint="see: vproxy pki list")
    for raw in entries:
        raw["revoked"] = True
        raw["revoked_at"] = now
    return _write_crl(c, pki_dir, ca_cert, ca_key, index, int(index["crl_days"]))


# --------------------------------------------------------------------------- show

def _kind_of(c: Any, cert: Any) -> str:
    x509 = c.x509
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "CA"
    except x509.ExtensionNotFound:
        pass
    try:
        ekus = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return "any"
    server = c.EKU.SERVER_AUTH in ekus
    client = c.EKU.CLIENT_AUTH in ekus
    if server and client:
        return "server+client"
    if server:
        return "server"
    if client:
        return "client"
    return "other"


def _sans_of(c: Any, cert: Any) -> List[str]:
    x509 = c.x509
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out = ["DNS:%s" % v for v in san.get_values_for_type(x509.DNSName)]
    out += ["IP:%s" % v for v in san.get_values_for_type(x509.IPAddress)]
    out += ["URI:%s" % v for v in san.get_values_for_type(x509.UniformResourceIdentifier)]
    out += ["email:%s" % v for v in san.get_values_for_type(x509.RFC822Name)]
    return out


def validity_text(not_before: _dt.datetime, not_after: _dt.datetime,
                  now: Optional[_dt.datetime] = None) -> str:
    """"(expired)", "(not yet valid)" or "(valid, N days left)"."""
    now = now or _utcnow()
    if now > not_after:
        return "(expired)"
    if now < not_before:
        return "(not yet valid)"
    left = (not_after - now).days
    return "(valid, %d day%s left)" % (left, "" if left == 1 else "s")


def show(cert_path: PathLike, pki_dir: Optional[PathLike] = None,
         now: Optional[_dt.datetime] = None) -> str:
    """Human text about a certificate file. With pki_dir, also whether that CA revoked it."""
    c = _crypto()
    path = Path(cert_path).expanduser()
    cert = _load_cert(c, path)
    kind = _kind_of(c, cert)
    kinds = {
        "any": "any (no extended key usage: usable as client and server)",
        "other": "other (neither serverAuth nor clientAuth: unusable for vproxy)",
    }
    sans = _sans_of(c, cert)
    fingerprint = hashlib.sha256(cert.public_bytes(c.serialization.Encoding.DER)).hexdigest()
    start, end = _not_before(cert), _not_after(cert)
    lines = [
        ("certificate", str(path)),
        ("subject", cert.subject.rfc4514_string() or "(empty)"),
        ("kind", kinds.get(kind, kind)),
        ("names", ", ".join(sans) if sans else "(no subject alternative names)"),
        ("issuer", cert.issuer.rfc4514_string()),
        ("serial", _hex_serial(cert.serial_number)),
        ("valid from", _iso(start)),
        ("valid until", "%s %s" % (_iso(end), validity_text(start, end, now))),
        ("sha256", ":".join(fingerprint[i:i + 2].upper() for i in range(0, 64, 2))),
    ]
    if pki_dir is not None:
        lines.append(("revoked", _revocation_status(c, cert, Path(pki_dir).expanduser())))
    width = max(len(k) for k, _ in lines)
    return "\n".join("%-*s  %s" % (width, k, v) for k, v in lines) + "\n"


def _revocation_status(c: Any, cert: Any, pki_dir: Path) -> str:
    x509 = c.x509
    ca_path = pki_dir / CA_CERT
    if not ca_path.exists():
        return "unknown (no CA in %s)" % pki_dir
    ca_cert = _load_cert(c, ca_path, "CA certificate")
    if cert.issuer != ca_cert.subject:
        if cert.subject == ca_cert.subject and cert.serial_number == ca_cert.serial_number:
            return "no (this is the CA certificate)"
        return "unknown (not issued by the CA in %s)" % pki_dir
    crl_path = pki_dir / CRL
    try:
        crl = x509.load_pem_x509_crl(_read(crl_path, "CRL"))
    except (UserError, ValueError):
        return "unknown (cannot read %s)" % crl_path
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    if entry is not None:
        return "YES, on %s (per %s)" % (_iso(_revocation_date(entry)), crl_path)
    return "no (per %s)" % crl_path


def find_issued(pki_dir: PathLike, name: str) -> Optional[Path]:
    """The newest certificate file issued under `name`, if index.json knows one."""
    for entry in reversed(list_issued(pki_dir)):
        if entry.name == name:
            return Path(entry.path)
    return None


__all__ = [
    "CA_CERT", "CA_KEY", "CRL", "INDEX", "ISSUED", "KINDS", "EKU_NAMES", "IssuedCert",
    "default_pki_dir", "init_ca", "issue", "revoke", "show", "list_issued", "update_crl",
    "crl_next_update", "find_issued", "validity_text", "looks_like_ip",
]
