"""Reading certificates and CRLs with the standard library: a small DER reader.

The agent must not need `cryptography` at run time, and the standard library's ssl
cannot tell whether a live session's certificate is revoked by a CRL loaded later.
What a reload needs (vproxy.agent.reload) is little: from a certificate its serial number,
issuer and subject names, public key and key identifiers; from a CRL its issuer, its
authority key identifier and the serial numbers it lists. This module reads exactly
that and nothing else.

Rules kept here:
- Only definite-length DER; anything else raises CertificateFormatError naming what
  was being read. Lengths are checked against the data: no slice runs past the end.
- Names are compared as their DER bytes, as OpenSSL's own CRL lookup does
  (a CA re-encoding its name differently would not match here either).
- No signature is verified. The files are the agent's own configuration (the same
  trust as the config file itself), and the agent uses them only to END sessions
  that were admitted before: a forged CRL could only make it stricter.
"""

import base64
import re
from dataclasses import dataclass, field
from typing import FrozenSet, List, Optional, Tuple

from vproxy.errors import UserError

# DER tags used here
_INTEGER = 0x02
_BIT_STRING = 0x03
_OCTET_STRING = 0x04
_OID = 0x06
_SEQUENCE = 0x30
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18

_OID_SKI = bytes.fromhex("551d0e")  # 2.5.29.14 subjectKeyIdentifier
_OID_AKI = bytes.fromhex("551d23")  # 2.5.29.35 authorityKeyIdentifier

_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.S)


class CertificateFormatError(ValueError):
    """Bytes that are not the DER structure they were supposed to be."""


# --------------------------------------------------------------------------- DER

def _tlv(data: bytes, pos: int, end: int) -> Tuple[int, int, int]:
    """(tag, start of value, end of value) of the element at data[pos:end]."""
    if pos + 2 > end:
        raise CertificateFormatError("truncated DER element at offset %d" % pos)
    tag = data[pos]
    pos += 1
    if tag & 0x1F == 0x1F:  # high tag number: skip its continuation bytes
        while True:
            if pos >= end:
                raise CertificateFormatError("truncated DER tag")
            b = data[pos]
            pos += 1
            if not b & 0x80:
                break
    if pos >= end:
        raise CertificateFormatError("truncated DER length")
    first = data[pos]
    pos += 1
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise CertificateFormatError("indefinite length (BER, not DER)")
    else:
        count = first & 0x7F
        if count > 4 or pos + count > end:
            raise CertificateFormatError("bad DER length at offset %d" % (pos - 1))
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if pos + length > end:
        raise CertificateFormatError("DER element at offset %d runs past its container" % pos)
    return tag, pos, pos + length


def _children(data: bytes, start: int, end: int) -> List[Tuple[int, int, int, int]]:
    """The elements inside data[start:end]: (tag, element start, value start, end)."""
    out = []
    pos = start
    while pos < end:
        tag, vstart, vend = _tlv(data, pos, end)
        out.append((tag, pos, vstart, vend))
        pos = vend
    return out


def _expect(element: Tuple[int, int, int, int], tag: int, what: str) -> None:
    if element[0] != tag:
        raise CertificateFormatError("%s: expected tag 0x%02x, found 0x%02x" % (what, tag, element[0]))


def _sequence(data: bytes, what: str) -> List[Tuple[int, int, int, int]]:
    tag, start, end = _tlv(data, 0, len(data))
    if tag != _SEQUENCE or end != len(data):
        raise CertificateFormatError("%s is not one DER SEQUENCE" % what)
    return _children(data, start, end)


def _integer(data: bytes, element: Tuple[int, int, int, int], what: str) -> int:
    _expect(element, _INTEGER, what)
    value = data[element[2]:element[3]]
    if not value:
        raise CertificateFormatError("%s: empty INTEGER" % what)
    return int.from_bytes(value, "big", signed=True)


def _extensions(data: bytes, start: int, end: int) -> List[Tuple[bytes, bytes]]:
    """[(OID bytes, extnValue bytes)] of a SEQUENCE OF Extension at data[start:end]."""
    out = []
    for ext in _children(data, start, end):
        _expect(ext, _SEQUENCE, "extension")
        parts = _children(data, ext[2], ext[3])
        if len(parts) < 2:
            raise CertificateFormatError("extension with %d parts" % len(parts))
        _expect(parts[0], _OID, "extension id")
        _expect(parts[-1], _OCTET_STRING, "extension value")
        out.append((data[parts[0][2]:parts[0][3]], data[parts[-1][2]:parts[-1][3]]))
    return out


def _key_identifiers(data: bytes, extensions: List[Tuple[bytes, bytes]]) -> Tuple[Optional[bytes], Optional[bytes]]:
    """(subject key id, authority key id) from parsed extensions; None where absent."""
    ski = aki = None
    for oid, value in extensions:
        if oid == _OID_SKI:
            tag, start, end = _tlv(value, 0, len(value))
            if tag == _OCTET_STRING:
                ski = value[start:end]
        elif oid == _OID_AKI:
            tag, start, end = _tlv(value, 0, len(value))
            if tag == _SEQUENCE:
                for t, _, vs, ve in _children(value, start, end):
                    if t == 0x80:  # [0] IMPLICIT KeyIdentifier
                        aki = value[vs:ve]
    return ski, aki


# --------------------------------------------------------------------------- certificates

@dataclass(frozen=True)
class Certificate:
    der: bytes
    serial: int
    issuer: bytes       # DER of the issuer Name
    subject: bytes      # DER of the subject Name
    public_key: bytes   # DER of the SubjectPublicKeyInfo
    subject_key_id: Optional[bytes] = None
    authority_key_id: Optional[bytes] = None

    def may_be_issued_by(self, ca: "Certificate") -> bool:
        """Names match, and key identifiers too where both are present."""
        if self.issuer != ca.subject:
            return False
        if self.authority_key_id is not None and ca.subject_key_id is not None:
            return self.authority_key_id == ca.subject_key_id
        return True


def parse_certificate(der: bytes) -> Certificate:
    cert = _sequence(der, "certificate")
    if len(cert) != 3:
        raise CertificateFormatError("certificate: expected 3 parts, found %d" % len(cert))
    _expect(cert[0], _SEQUENCE, "tbsCertificate")
    tbs = _children(der, cert[0][2], cert[0][3])
    i = 1 if tbs and tbs[0][0] == 0xA0 else 0  # [0] EXPLICIT version
    if len(tbs) < i + 6:
        raise CertificateFormatError("tbsCertificate: too few fields")
    serial = _integer(der, tbs[i], "serial number")
    _expect(tbs[i + 2], _SEQUENCE, "issuer")
    _expect(tbs[i + 4], _SEQUENCE, "subject")
    _expect(tbs[i + 5], _SEQUENCE, "subjectPublicKeyInfo")
    issuer = der[tbs[i + 2][1]:tbs[i + 2][3]]
    subject = der[tbs[i + 4][1]:tbs[i + 4][3]]
    spki = der[tbs[i + 5][1]:tbs[i + 5][3]]
    extensions: List[Tuple[bytes, bytes]] = []
    for element in tbs[i + 6:]:
        if element[0] == 0xA3:  # [3] EXPLICIT Extensions
            inner = _children(der, element[2], element[3])
            if len(inner) != 1:
                raise CertificateFormatError("extensions: expected one SEQUENCE")
            _expect(inner[0], _SEQUENCE, "extensions")
            extensions = _extensions(der, inner[0][2], inner[0][3])
    ski, aki = _key_identifiers(der, extensions)
    return Certificate(der, serial, issuer, subject, spki, ski, aki)


# --------------------------------------------------------------------------- CRLs

@dataclass(frozen=True)
class Crl:
    issuer: bytes                       # DER of the issuer Name
    revoked: FrozenSet[int]             # serial numbers
    authority_key_id: Optional[bytes] = None

    def covers(self, cert: Certificate) -> bool:
        """Is this the CRL of the CA that issued cert?"""
        if cert.issuer != self.issuer:
            return False
        if self.authority_key_id is not None and cert.authority_key_id is not None:
            return self.authority_key_id == cert.authority_key_id
        return True


def parse_crl(der: bytes) -> Crl:
    crl = _sequence(der, "CRL")
    if len(crl) != 3:
        raise CertificateFormatError("CRL: expected 3 parts, found %d" % len(crl))
    _expect(crl[0], _SEQUENCE, "tbsCertList")
    tbs = _children(der, crl[0][2], crl[0][3])
    i = 1 if tbs and tbs[0][0] == _INTEGER else 0  # version
    if len(tbs) < i + 3:
        raise CertificateFormatError("tbsCertList: too few fields")
    _expect(tbs[i], _SEQUENCE, "CRL signature algorithm")
    _expect(tbs[i + 1], _SEQUENCE, "CRL issuer")
    issuer = der[tbs[i + 1][1]:tbs[i + 1][3]]
    if tbs[i + 2][0] not in (_UTC_TIME, _GENERALIZED_TIME):
        raise CertificateFormatError("CRL thisUpdate is not a time")
    revoked = set()
    aki = None
    for element in tbs[i + 3:]:
        tag = element[0]
        if tag in (_UTC_TIME, _GENERALIZED_TIME):
            continue  # nextUpdate
        if tag == _SEQUENCE:  # revokedCertificates
            for entry in _children(der, element[2], element[3]):
                _expect(entry, _SEQUENCE, "revoked certificate entry")
                parts = _children(der, entry[2], entry[3])
                if not parts:
                    raise CertificateFormatError("empty revoked certificate entry")
                revoked.add(_integer(der, parts[0], "revoked serial number"))
        elif tag == 0xA0:  # [0] EXPLICIT crlExtensions
            inner = _children(der, element[2], element[3])
            if len(inner) != 1:
                raise CertificateFormatError("CRL extensions: expected one SEQUENCE")
            _expect(inner[0], _SEQUENCE, "CRL extensions")
            _, aki = _key_identifiers(der, _extensions(der, inner[0][2], inner[0][3]))
        else:
            raise CertificateFormatError("tbsCertList: unexpected tag 0x%02x" % tag)
    return Crl(issuer, frozenset(revoked), aki)


# --------------------------------------------------------------------------- PEM files

def pem_blocks(data: bytes, label: str) -> List[bytes]:
    """The DER of every PEM block with this label ("CERTIFICATE", "X509 CRL")."""
    out = []
    for match in _PEM.finditer(data):
        if match.group(1).decode("ascii") != label:
            continue
        body = b"".join(line.strip() for line in match.group(2).splitlines()
                        if b":" not in line)  # skip RFC 1421 headers, if any
        try:
            out.append(base64.b64decode(body, validate=True))
        except ValueError as e:
            raise CertificateFormatError("bad base64 in a %s block: %s" % (label, e)) from None
    return out


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UserError("cannot read %s %s: %s" % (what, path, e.strerror or e)) from None


@dataclass
class Trust:
    """What the agent trusts at one moment: its CA certificates and its CRLs."""

    cas: List[Certificate] = field(default_factory=list)
    crls: List[Crl] = field(default_factory=list)

    @classmethod
    def load(cls, ca_path: str, crl_path: Optional[str] = None) -> "Trust":
        """Read the CA file and the CRL file; UserError naming the file if unreadable."""
        trust = cls()
        try:
            trust.cas = [parse_certificate(d) for d in pem_blocks(_read(ca_path, "CA certificate"),
                                                                  "CERTIFICATE")]
        except CertificateFormatError as e:
            raise UserError("CA certificate %s: %s" % (ca_path, e)) from None
        if not trust.cas:
            raise UserError("%s holds no PEM certificate" % ca_path)
        if crl_path:
            try:
                trust.crls = [parse_crl(d) for d in pem_blocks(_read(crl_path, "CRL"), "X509 CRL")]
            except CertificateFormatError as e:
                raise UserError("CRL %s: %s" % (crl_path, e)) from None
            if not trust.crls:
                raise UserError("%s holds no PEM CRL" % crl_path)
        return trust

    def is_revoked(self, cert: Certificate) -> bool:
        return any(crl.covers(cert) and cert.serial in crl.revoked for crl in self.crls)

    def issuer_keys(self, cert: Certificate) -> FrozenSet[bytes]:
        """Public keys of the CA certificates here that may have issued cert."""
        return frozenset(ca.public_key for ca in self.cas if cert.may_be_issued_by(ca))


def still_trusted(cert: Certificate, before: Optional[Trust], now: Trust) -> Optional[str]:
    """None if cert, admitted under `before`, is still good under `now`; else why not.

    Revocation is judged by `now`'s CRLs. For the CA: the handshake verified cert's
    signature with a CA key of `before`; if `now` no longer holds that key under that
    name, cert is no longer signed by a trusted CA. When `before` cannot tell which CA
    that was (a chain through an intermediate the client sent), only `now`'s CAs are
    asked, and a cert whose issuer they do not name at all is kept (it cannot be judged
    without verifying signatures).
    """
    if now.is_revoked(cert):
        return "its certificate (serial %X) is revoked by the agent's CRL" % cert.serial
    old_keys = before.issuer_keys(cert) if before is not None else frozenset()
    new_keys = now.issuer_keys(cert)
    if old_keys and not (old_keys & new_keys):
        return "its certificate (serial %X) is no longer signed by a CA the agent trusts" % cert.serial
    return None


__all__ = ["Certificate", "Crl", "Trust", "CertificateFormatError", "parse_certificate",
           "parse_crl", "pem_blocks", "still_trusted"]
