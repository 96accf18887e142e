"""TLS for vproxy: contexts, the peer's Identity, and human-readable TLS failures.

Rules kept here:
- TLS 1.3 only, on both ends. The server requires a client certificate; the client
  verifies the server's certificate and its name (DNS or IP SAN).
- ALPN names the protocol version (ALPN). OpenSSL lets a handshake without a common
  ALPN protocol complete, so both ends call check_alpn() after the handshake.
- A CRL, when given, is checked for the peer's (leaf) certificate. The server sends no
  session tickets, so a revoked client cannot resume a session it got earlier.
- Only the standard library's ssl: this module is on the data path of the .pyz.
- A user's mistake (a missing file, a key that belongs to another certificate) raises
  vproxy.errors.UserError naming the file; never a raw ssl traceback.

OpenSSL verifies the purpose of the peer's certificate by default: a server context
accepts only client certificates whose extended key usage (if present) includes
clientAuth, and a client context only server certificates with serverAuth.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from vproxy.errors import UserError, VproxyError

ALPN = "vproxy/1"

_ISSUE_HINT = "create one with: vproxy pki issue {kind} NAME (see: vproxy pki --help)"
_CA_HINT = "create a CA with: vproxy pki init (its certificate is ca.pem in the PKI directory)"


class TlsError(VproxyError):
    """Base of the TLS-level errors this module raises after a handshake."""


class AlpnMismatch(TlsError):
    """The peer did not select the vproxy protocol version in ALPN."""

    def __init__(self, selected: Optional[str]):
        if selected is None:
            message = "the peer did not negotiate the %s protocol (no ALPN agreed); " \
                      "is it a vproxy of a compatible version?" % ALPN
        else:
            message = "the peer speaks %r, not %r; versions of vproxy differ" % (selected, ALPN)
        super().__init__(message)
        self.selected = selected
        self.message = message


class NoPeerCertificate(TlsError):
    """The TLS connection has no verified peer certificate."""


# --------------------------------------------------------------------------- contexts

def server_context(cert: str, key: str, ca: str, crl: Optional[str] = None) -> ssl.SSLContext:
    """An SSLContext for the agent: TLS 1.3, client certificates required and verified
    against `ca` (and `crl`, if given), ALPN "vproxy/1"."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _common(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    # No tickets: nothing to resume, so every connection is verified afresh (and CRL'd).
    ctx.num_tickets = 0
    _load_chain(ctx, str(cert), str(key), "server")
    _load_ca(ctx, str(ca))
    if crl is not None:
        _load_crl(ctx, str(crl))
    return ctx


def client_context(cert: str, key: str, ca: str, crl: Optional[str] = None) -> ssl.SSLContext:
    """An SSLContext for a client: TLS 1.3, our certificate, the server verified against
    `ca` (and `crl`, if given) with its name checked; ALPN "vproxy/1"."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _common(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    _load_chain(ctx, str(cert), str(key), "client")
    _load_ca(ctx, str(ca))
    if crl is not None:
        _load_crl(ctx, str(crl))
    return ctx


def _common(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN])


def _read(path: str, what: str, hint: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        reason = e.strerror or str(e)
        raise UserError("cannot read %s %s: %s" % (what, path, reason), hint=hint) from None


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str, kind: str) -> None:
    hint = _ISSUE_HINT.format(kind=kind)
    cert_pem = _read(cert, "certificate", hint)
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise UserError("%s is not a PEM certificate (no BEGIN CERTIFICATE line)" % cert,
                        hint=hint)
    key_pem = _read(key, "private key", hint)
    if b"PRIVATE KEY-----" not in key_pem:
        raise UserError("%s is not a PEM private key (no BEGIN ... PRIVATE KEY line)" % key,
                        hint=hint)

    def no_password() -> bytes:
        raise UserError("private key %s is encrypted; vproxy needs an unencrypted key "
                        "(protected by file mode 0600)" % key,
                        hint="decrypt it with: openssl pkey -in %s -out NEW.key" % key)

    try:
        ctx.load_cert_chain(cert, key, password=no_password)
    except UserError:
        raise
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise UserError("private key %s does not belong to certificate %s" % (key, cert),
                            hint="pass the .key file written together with that .pem "
                                 "(vproxy pki issue writes NAME.pem and NAME.key)") from None
        raise UserError("cannot load certificate %s with key %s: %s"
                        % (cert, key, _ssl_reason(e)), hint=hint) from None
    except OSError as e:  # raced with a rename, permissions changed, ...
        raise UserError("cannot load certificate %s with key %s: %s"
                        % (cert, key, e.strerror or e), hint=hint) from None


def _load_ca(ctx: ssl.SSLContext, ca: str) -> None:
    pem = _read(ca, "CA certificate", _CA_HINT)
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise UserError("%s is not a PEM CA certificate (no BEGIN CERTIFICATE line)" % ca,
                        hint=_CA_HINT)
    try:
        ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as e:
        raise UserError("cannot load CA certificate %s: %s" % (ca, _ssl_reason(e)),
                        hint=_CA_HINT) from None


def _load_crl(ctx: ssl.SSLContext, crl: str) -> None:
    hint = "the CA's CRL is crl.pem in the PKI directory (vproxy pki revoke updates it)"
    pem = _read(crl, "CRL", hint)
    # load_verify_locations() would also take certificates from this file, and trust
    # them: refuse anything but CRLs, so a wrong --crl cannot widen trust.
    if b"-----BEGIN X509 CRL-----" not in pem:
        raise UserError("%s is not a PEM CRL (no BEGIN X509 CRL line)" % crl, hint=hint)
    if b"-----BEGIN CERTIFICATE-----" in pem:
        raise UserError("%s contains certificates; a CRL file must hold only CRLs" % crl,
                        hint=hint)
    try:
        ctx.load_verify_locations(cafile=crl)
    except (ssl.SSLError, OSError) as e:
        raise UserError("cannot load CRL %s: %s" % (crl, _ssl_reason(e)), hint=hint) from None
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def _ssl_reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None)
    if reason:
        return reason.replace("_", " ").lower()
    return getattr(e, "strerror", None) or str(e)


# --------------------------------------------------------------------------- identity

@dataclass(frozen=True)
class Identity:
    """Who is on the other end, read from their verified certificate."""

    common_name: str                 # subject CN, "" if none
    dns_names: Tuple[str, ...]       # SAN DNS entries
    ip_addresses: Tuple[str, ...]    # SAN IP entries, as text (normalised by ipaddress)
    uris: Tuple[str, ...]            # SAN URI entries

    def names(self) -> Tuple[str, ...]:
        """CN first, then the SANs (DNS, IP, URI), without repeats: what an ACL matches."""
        out = []
        for name in (self.common_name,) + self.dns_names + self.ip_addresses + self.uris:
            if name and name not in out:
                out.append(name)
        return tuple(out)

    def __str__(self) -> str:
        names = self.names()
        return names[0] if names else "(anonymous)"


def identity_from_peercert(peercert: Dict[str, Any]) -> Identity:
    """The Identity in a certificate in ssl's getpeercert() dict form.

    With several CNs the last one (the most specific) is taken, as Go's crypto/x509 does.
    """
    if not peercert:
        raise NoPeerCertificate("the peer presented no (verified) certificate")
    common_name = ""
    for rdn in peercert.get("subject", ()):
        for attr, value in rdn:
            if attr == "commonName":
                common_name = value
    dns = []
    ips = []
    uris = []
    for kind, value in peercert.get("subjectAltName", ()):
        if kind == "DNS":
            dns.append(value)
        elif kind == "IP Address":
            ips.append(_normalise_ip(value))
        elif kind == "URI":
            uris.append(value)
    return Identity(common_name, tuple(dns), tuple(ips), tuple(uris))


def _normalise_ip(text: str) -> str:
    # ssl spells IPv6 SANs "2001:DB8:0:0:0:0:0:1" (older versions with a trailing "\n").
    text = text.strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


def identity_of(ssl_object: Any) -> Identity:
    """The peer's Identity on an SSLSocket or SSLObject after its handshake."""
    peercert = ssl_object.getpeercert()
    if not peercert:
        raise NoPeerCertificate("the peer presented no (verified) certificate")
    return identity_from_peercert(peercert)


def not_after(ssl_object: Any) -> Optional[float]:
    """When the peer's (verified) certificate expires, in seconds since the epoch (UTC);
    None if there is no certificate or its date cannot be read."""
    value = (ssl_object.getpeercert() or {}).get("notAfter")
    if not value:
        return None
    try:
        return float(ssl.cert_time_to_seconds(value))
    except ValueError:
        return None


EXPIRY_RECHECK = 86400.0  # a certificate that expires later is looked at again daily:
# the wall clock may be set meanwhile, and loop timers run on the monotonic clock.


class ExpiryWatch:
    """Call on_expired() once, just after the wall clock passes not_after (a peer
    certificate's notAfter, epoch seconds: valid through it, RFC 5280). The loop timer
    is never set more than `recheck` (EXPIRY_RECHECK) seconds ahead; when it fires early (a daily look,
    or the clock was set back) it is set again. cancel() when the session ends."""

    def __init__(self, loop: Any, not_after: float, on_expired: Any,
                 recheck: float = EXPIRY_RECHECK):
        self.not_after = not_after
        self._loop = loop
        self._on_expired = on_expired
        self._recheck = recheck
        self._timer: Any = None
        self._schedule()

    def _schedule(self) -> None:
        left = self.not_after - time.time()
        delay = min(max(left, 0.0) + 0.05, self._recheck)
        self._timer = self._loop.call_later(delay, self._check)

    def _check(self) -> None:
        self._timer = None
        if time.time() <= self.not_after:
            self._schedule()
            return
        self._on_expired()

    def when(self) -> Optional[float]:
        """The loop time of the next look, None once fired or cancelled."""
        return self._timer.when() if self._timer is not None else None

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()  # it holds its session for up to a day
            self._timer = None


def expiry_text(identity: Any, not_after: float) -> str:
    """'(CN alice) expired at 2026-01-02 03:04:05 UTC', for the messages that end a
    session whose peer certificate expired."""
    who = ("CN %s" % identity.common_name if getattr(identity, "common_name", "")
           else str(identity))
    return "(%s) expired at %s" % (who, time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                      time.gmtime(not_after)))


def check_alpn(ssl_object: Any) -> None:
    """Raise AlpnMismatch unless the handshake agreed on ALPN "vproxy/1"."""
    selected = ssl_object.selected_alpn_protocol()
    if selected != ALPN:
        raise AlpnMismatch(selected)


# --------------------------------------------------------------------------- messages

# Our own verification of the peer's certificate failed (X509_V_ERR_*).
_VERIFY_MESSAGES = {
    2: "the peer's certificate is not signed by a trusted CA (unknown issuer)",
    3: "no CRL of the peer's CA is loaded (is the CRL file the one of this CA?)",
    9: "the peer's certificate is not valid yet (check the clocks)",
    10: "the peer's certificate has expired",
    11: "the CRL is not valid yet (check the clocks)",
    12: "the CRL has expired; re-sign it with: vproxy pki crl",
    18: "the peer's certificate is self-signed and not trusted",
    19: "the peer's certificate chain ends in an untrusted self-signed CA",
    20: "the peer's certificate is not signed by a trusted CA (unknown CA)",
    21: "the peer's certificate is not signed by a trusted CA (unknown CA)",
    23: "the peer's certificate has been revoked",
    24: "the peer's certificate is signed by a certificate that is not a CA",
    26: "the peer's certificate is not meant for this use (its extended key usage "
        "lacks clientAuth or serverAuth)",
    62: "the server's certificate does not match the host name we connected to",
    64: "the server's certificate does not match the IP address we connected to",
}

# OpenSSL's reason codes: alerts the peer sent us, and local protocol failures.
_REASON_MESSAGES = {
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust the CA that signed our certificate "
                              "(unknown CA)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer refused our certificate: it has expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "the peer refused our certificate: it has been revoked",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused our certificate (bad certificate: "
                                   "not valid yet, or the clocks differ)",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the peer refused our certificate: it is not "
                                           "meant for this use (extended key usage)",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the peer refused our certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a client certificate and we "
                                         "sent none",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer sent no client certificate",
    "TLSV1_ALERT_PROTOCOL_VERSION": "TLS version mismatch: vproxy speaks TLS 1.3 only",
    "UNSUPPORTED_PROTOCOL": "TLS version mismatch: vproxy speaks TLS 1.3 only",
    "NO_PROTOCOLS_AVAILABLE": "TLS version mismatch: vproxy speaks TLS 1.3 only",
    "TLSV1_ALERT_NO_APPLICATION_PROTOCOL": "the peer does not speak %s (ALPN)" % ALPN,
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS (is it a vproxy agent?)",
    "HTTP_REQUEST": "the peer sent an HTTP request, not a TLS handshake",
    "UNEXPECTED_EOF_WHILE_READING": "the peer closed the connection during the TLS handshake",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the TLS handshake failed (the peer found no common "
                                     "parameters)",
    "TLSV1_ALERT_DECRYPT_ERROR": "the TLS handshake failed (a signature did not verify; "
                                 "does the key belong to the certificate?)",
}


def describe_tls_error(exc: BaseException) -> str:
    """One human sentence for a TLS failure, for CLI messages and logs."""
    if isinstance(exc, AlpnMismatch):
        return exc.message
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = _VERIFY_MESSAGES.get(exc.verify_code)
        detail = exc.verify_message or ""
        if message is None:
            return "certificate verification failed: %s" % (detail or _ssl_reason(exc))
        if exc.verify_code in (62, 64) and detail:
            return "%s (%s)" % (message, detail)
        return message
    if isinstance(exc, ssl.SSLError):
        message = _REASON_MESSAGES.get(exc.reason or "")
        if message is not None:
            return message
        if isinstance(exc, ssl.SSLEOFError):
            return "the peer closed the connection during the TLS handshake"
        return "TLS failure: %s" % _ssl_reason(exc)
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "the TLS handshake timed out"
    if isinstance(exc, ConnectionResetError):
        return "the peer reset the connection during the TLS handshake"
    if isinstance(exc, (BrokenPipeError, ConnectionAbortedError)):
        return "the peer closed the connection during the TLS handshake"
    if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
        return "connection refused (is the agent running and listening there?)"
    if isinstance(exc, UserError):
        return exc.message
    return str(exc) or exc.__class__.__name__


__all__ = [
    "ALPN", "TlsError", "AlpnMismatch", "NoPeerCertificate", "Identity",
    "server_context", "client_context", "identity_from_peercert", "identity_of",
    "check_alpn", "describe_tls_error",
]
