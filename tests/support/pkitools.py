"""A complete test PKI: a CA, a server, good clients and every kind of bad client.

    def test_x(pki):                        # the session-wide fixture, from tests/conftest.py
        ctx = pki.server_context()          # server "localhost" / 127.0.0.1, CA + CRL
        cctx = pki.client_context(pki.alice)
        server, client = handshake(ctx, cctx)   # a real TLS connection on 127.0.0.1
        assert server.identity.common_name == "alice"

`make_pki(directory)` makes one (tests/conftest.py's `pki` fixture makes one per
session; bench/ makes its own). Everything is issued with vproxy.pki (so the fixture
also exercises it), except the self-signed certificate, which no CA would issue.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Tuple

from vproxy.security import pki as vpki
from vproxy.security import tls


class CertPair(NamedTuple):
    cert: str
    key: str


@dataclass(frozen=True)
class TestPki:
    __test__ = False        # not a test class, despite its name

    dir: Path               # the main CA's PKI directory
    ca: str                 # its ca.pem
    crl: str                # its crl.pem (lists `revoked`)
    server: CertPair        # server cert: DNS localhost, IP 127.0.0.1 (CN localhost)
    alice: CertPair         # good client, CN alice
    bob: CertPair           # another good client, CN bob
    san_client: CertPair    # good client CN ci-runner with DNS, IP and URI SANs
    other_ca_dir: Path      # an unrelated CA
    other_ca: str
    other_client: CertPair  # client CN "alice", issued by the unrelated CA
    other_server: CertPair  # server localhost/127.0.0.1, issued by the unrelated CA
    expired: CertPair       # client, validity ended 10 days ago
    not_yet_valid: CertPair  # client, validity starts in 10 days
    revoked: CertPair       # client, listed in crl
    wrong_eku: CertPair     # "client" cert with serverAuth only
    self_signed: CertPair   # self-signed client cert, CN alice, clientAuth

    def server_context(self, pair: Optional[CertPair] = None, crl: bool = True,
                       ca: Optional[str] = None) -> ssl.SSLContext:
        pair = pair or self.server
        return tls.server_context(pair.cert, pair.key, ca or self.ca,
                                  self.crl if crl else None)

    def client_context(self, pair: Optional[CertPair] = None,
                       ca: Optional[str] = None) -> ssl.SSLContext:
        pair = pair or self.alice
        return tls.client_context(pair.cert, pair.key, ca or self.ca)


@dataclass
class Side:
    """What one end of handshake() saw."""

    error: Optional[BaseException] = None       # handshake (or first read) failure
    identity: Optional[tls.Identity] = None     # the peer's, if the handshake completed
    alpn: Optional[str] = None
    alpn_error: Optional[tls.AlpnMismatch] = None
    version: Optional[str] = None
    received: bytes = b""                       # client: b"ok" once the server accepted


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
              server_hostname: str = "localhost", timeout: float = 10.0) -> Tuple[Side, Side]:
    """One real TLS connection over 127.0.0.1, blocking sockets, server in a thread.

    The server completes its handshake, reads the client's identity, checks ALPN and
    sends b"ok"; the client handshakes and reads those two bytes. In TLS 1.3 the client
    finishes its handshake before the server has judged the client certificate, so a
    refusal reaches the client only on that read: it lands in client.error all the same.
    """
    server, client = Side(), Side()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(timeout)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError as e:
            server.error = e
            return
        conn.settimeout(timeout)
        try:
            with server_ctx.wrap_socket(conn, server_side=True,
                                        do_handshake_on_connect=False) as s:
                s.do_handshake()
                server.version = s.version()
                server.alpn = s.selected_alpn_protocol()
                server.identity = tls.identity_of(s)
                try:
                    tls.check_alpn(s)
                except tls.AlpnMismatch as e:
                    server.alpn_error = e
                    return
                s.sendall(b"ok")
        except Exception as e:   # noqa: BLE001 - recorded for the test to judge
            server.error = e
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        raw = socket.create_connection(listener.getsockname(), timeout=timeout)
        with client_ctx.wrap_socket(raw, server_hostname=server_hostname,
                                    do_handshake_on_connect=False) as c:
            c.do_handshake()
            client.version = c.version()
            client.alpn = c.selected_alpn_protocol()
            client.identity = tls.identity_of(c)
            try:
                tls.check_alpn(c)
            except tls.AlpnMismatch as e:
                client.alpn_error = e
            while len(client.received) < 2:
                chunk = c.recv(2 - len(client.received))
                if not chunk:
                    break
                client.received += chunk
    except Exception as e:   # noqa: BLE001
        client.error = e
    thread.join(timeout)
    listener.close()
    assert not thread.is_alive(), "server side of handshake() hung"
    return server, client


def _pair(paths) -> CertPair:
    cert, key = paths
    return CertPair(str(cert), str(key))


def make_self_signed(out_dir: Path, name: str = "alice") -> CertPair:
    """A self-signed client certificate (clientAuth, CN name) and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out_dir / (name + ".pem"), out_dir / (name + ".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return CertPair(str(cert_path), str(key_path))


def issue_expiring(pki_dir: Path, name: str, seconds: float,
                   out_dir: Optional[Path] = None, kind: str = "client",
                   dns_names: Sequence[str] = (), ip_addresses: Sequence[str] = ()) -> CertPair:
    """A certificate (client by default; kind="server" for an agent, with its SANs) CN
    name from the CA in pki_dir whose validity ends `seconds` from now (to the second:
    X.509 times have no fractions), and began a day before that. Issue into a PKI of
    the test's own, not the session-wide one."""
    not_after = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds)
    return _pair(vpki.issue(pki_dir, name, kind, dns_names=dns_names,
                            ip_addresses=ip_addresses, days=1,
                            valid_from=not_after - dt.timedelta(days=1), out_dir=out_dir))


def make_pki(tmp_path: Path) -> TestPki:
    """Build the whole test PKI under tmp_path (takes well under a second)."""
    tmp_path = Path(tmp_path)
    main = tmp_path / "ca"
    other = tmp_path / "other-ca"
    now = dt.datetime.now(dt.timezone.utc)

    vpki.init_ca(main, common_name="vproxy test CA")
    server = _pair(vpki.issue(main, "localhost", "server", dns_names=["localhost"],
                              ip_addresses=["127.0.0.1"]))
    alice = _pair(vpki.issue(main, "alice", "client"))
    bob = _pair(vpki.issue(main, "bob", "client"))
    san_client = _pair(vpki.issue(main, "ci-runner", "client",
                                  dns_names=["ci.example.com"], ip_addresses=["2001:db8::7"],
                                  uris=["spiffe://example.com/ci"]))
    expired = _pair(vpki.issue(main, "expired", "client", days=5,
                               valid_from=now - dt.timedelta(days=15)))
    not_yet_valid = _pair(vpki.issue(main, "not-yet-valid", "client", days=30,
                                     valid_from=now + dt.timedelta(days=10)))
    revoked = _pair(vpki.issue(main, "revoked", "client"))
    vpki.revoke(main, "revoked")
    wrong_eku = _pair(vpki.issue(main, "wrong-eku", "client",
                                 key_usage_override=["serverAuth"]))

    vpki.init_ca(other, common_name="some other CA")
    other_client = _pair(vpki.issue(other, "alice", "client"))
    other_server = _pair(vpki.issue(other, "localhost", "server", dns_names=["localhost"],
                                    ip_addresses=["127.0.0.1"]))
    self_signed = make_self_signed(tmp_path / "self-signed")

    return TestPki(
        dir=main, ca=str(main / vpki.CA_CERT), crl=str(main / vpki.CRL),
        server=server, alice=alice, bob=bob, san_client=san_client,
        other_ca_dir=other, other_ca=str(other / vpki.CA_CERT),
        other_client=other_client, other_server=other_server,
        expired=expired, not_yet_valid=not_yet_valid, revoked=revoked,
        wrong_eku=wrong_eku, self_signed=self_signed,
    )
