"""vproxy.tls over real TLS 1.3 connections on 127.0.0.1.

Every refusal is asserted on the server side (the agent must see the failure and never
learn an identity), and the client's view of it is checked to read as one clear sentence.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import socket
import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from support.pkitools import handshake
from vproxy.security import tls
from vproxy.errors import UserError, VproxyError


# --------------------------------------------------------------------------- success

def test_mutual_tls13_handshake_gives_identities(pki):
    server, client = handshake(pki.server_context(), pki.client_context(pki.alice))
    assert server.error is None and client.error is None
    assert server.version == client.version == "TLSv1.3"
    assert server.alpn == client.alpn == "vproxy/1"
    assert server.alpn_error is None and client.alpn_error is None
    assert server.identity == tls.Identity("alice", (), (), ())
    assert str(server.identity) == "alice"
    assert client.identity.common_name == "localhost"
    assert client.identity.dns_names == ("localhost",)
    assert client.identity.ip_addresses == ("127.0.0.1",)
    assert client.received == b"ok"


def test_server_name_checked_by_ip_too(pki):
    server, client = handshake(pki.server_context(), pki.client_context(pki.bob),
                               server_hostname="127.0.0.1")
    assert client.error is None and client.received == b"ok"
    assert server.identity.common_name == "bob"


def test_identity_with_sans_from_a_real_handshake(pki):
    server, client = handshake(pki.server_context(), pki.client_context(pki.san_client))
    assert client.error is None
    ident = server.identity
    assert ident == tls.Identity("ci-runner", ("ci.example.com",), ("2001:db8::7",),
                                 ("spiffe://example.com/ci",))
    assert ident.names() == ("ci-runner", "ci.example.com", "2001:db8::7",
                             "spiffe://example.com/ci")


def test_contexts_are_tls13_only_mtls(pki):
    s = pki.server_context()
    c = pki.client_context()
    for ctx in (s, c):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert c.check_hostname is True
    assert s.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    assert not pki.server_context(crl=False).verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    assert s.num_tickets == 0


def test_asyncio_streams_with_the_contexts(pki):
    """The contexts work with asyncio's TLS transport, and ssl_object gives identity."""
    async def main():
        seen = {}

        async def on_client(reader, writer):
            obj = writer.get_extra_info("ssl_object")
            tls.check_alpn(obj)
            seen["identity"] = tls.identity_of(obj)
            writer.write(await reader.readexactly(5))
            await writer.drain()
            writer.close()

        srv = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=pki.server_context())
        port = srv.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=pki.client_context(pki.alice), server_hostname="localhost")
        tls.check_alpn(writer.get_extra_info("ssl_object"))
        writer.write(b"hello")
        echoed = await reader.readexactly(5)
        writer.close()
        srv.close()
        await srv.wait_closed()
        return echoed, seen["identity"]

    echoed, identity = asyncio.run(asyncio.wait_for(main(), 10))
    assert echoed == b"hello"
    assert identity.common_name == "alice"


# --------------------------------------------------------------------------- refusals

REFUSED = [
    # fixture attribute, server's verify code, server's sentence, client's sentence
    ("other_client", 20, "not signed by a trusted CA", "does not trust the CA"),
    ("expired", 10, "has expired", "it has expired"),
    ("not_yet_valid", 9, "not valid yet", "not valid yet"),
    ("revoked", 23, "has been revoked", "it has been revoked"),
    ("wrong_eku", 26, "not meant for this use", "not meant for this use"),
    ("self_signed", 18, "self-signed", "does not trust the CA"),
]


@pytest.mark.parametrize("which,code,server_says,client_says", REFUSED,
                         ids=[r[0] for r in REFUSED])
def test_server_refuses_bad_client_certificates(pki, which, code, server_says, client_says):
    pair = getattr(pki, which)
    server, client = handshake(pki.server_context(), pki.client_context(pair))
    assert isinstance(server.error, ssl.SSLCertVerificationError), server.error
    assert server.error.verify_code == code
    assert server.identity is None                 # the agent never learnt who it was
    assert server_says in tls.describe_tls_error(server.error)
    assert isinstance(client.error, ssl.SSLError), client.error
    assert client.received == b""
    assert client_says in tls.describe_tls_error(client.error)


def test_revoked_client_is_accepted_without_the_crl(pki):
    """The CRL, not something else about that certificate, is what refuses it."""
    server, client = handshake(pki.server_context(crl=False), pki.client_context(pki.revoked))
    assert server.error is None and server.identity.common_name == "revoked"


def test_crl_of_another_ca_refuses_everyone_with_a_clear_reason(pki, tmp_path):
    # With a CRL loaded, a client whose CA has no CRL loaded cannot be checked.
    crl = tmp_path / "other-crl.pem"
    shutil.copy(str(pki.other_ca_dir / "crl.pem"), str(crl))
    ctx = tls.server_context(pki.server.cert, pki.server.key, pki.ca, str(crl))
    server, client = handshake(ctx, pki.client_context(pki.alice))
    assert server.error.verify_code == 3
    assert "no CRL of the peer's CA" in tls.describe_tls_error(server.error)


def test_server_refuses_client_without_certificate(pki):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(pki.ca)
    ctx.set_alpn_protocols([tls.ALPN])
    server, client = handshake(pki.server_context(), ctx)
    assert isinstance(server.error, ssl.SSLError)
    assert server.error.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert server.identity is None
    assert tls.describe_tls_error(server.error) == "the peer sent no client certificate"
    assert "requires a client certificate" in tls.describe_tls_error(client.error)


def test_server_refuses_tls12_client(pki):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(pki.ca)
    ctx.load_cert_chain(pki.alice.cert, pki.alice.key)
    ctx.set_alpn_protocols([tls.ALPN])
    server, client = handshake(pki.server_context(), ctx)
    assert isinstance(server.error, ssl.SSLError)
    assert server.error.reason in ("UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE")
    assert server.identity is None
    assert "TLS 1.3 only" in tls.describe_tls_error(server.error)
    assert "TLS 1.3 only" in tls.describe_tls_error(client.error)


def test_server_refuses_plain_tcp_garbage(pki):
    """Not TLS at all: the server's handshake fails and says so."""
    import threading
    result = {}
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        conn.settimeout(5)
        try:
            pki.server_context().wrap_socket(conn, server_side=True)
        except Exception as e:  # noqa: BLE001
            result["error"] = e
        finally:
            conn.close()

    t = threading.Thread(target=serve)
    t.start()
    with socket.create_connection(listener.getsockname()) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        try:
            s.recv(100)
        except ConnectionResetError:
            pass
    t.join(5)
    listener.close()
    assert isinstance(result["error"], ssl.SSLError)
    assert "HTTP request" in tls.describe_tls_error(result["error"]) or \
        "does not speak TLS" in tls.describe_tls_error(result["error"])


# --------------------------------------------------------------------------- the client's checks

def test_client_refuses_server_of_another_ca(pki):
    server, client = handshake(pki.server_context(pair=pki.other_server),
                               pki.client_context(pki.alice))
    assert isinstance(client.error, ssl.SSLCertVerificationError)
    assert client.error.verify_code == 20
    assert "not signed by a trusted CA" in tls.describe_tls_error(client.error)
    assert server.error is not None and server.identity is None
    assert "does not trust the CA" in tls.describe_tls_error(server.error)


def test_client_refuses_wrong_host_name(pki):
    server, client = handshake(pki.server_context(), pki.client_context(pki.alice),
                               server_hostname="vmhost.example.com")
    assert isinstance(client.error, ssl.SSLCertVerificationError)
    assert client.error.verify_code == 62
    assert "does not match the host name" in tls.describe_tls_error(client.error)
    assert server.identity is None


def test_client_refuses_a_client_certificate_as_server(pki):
    server, client = handshake(pki.server_context(pair=pki.alice),
                               pki.client_context(pki.bob), server_hostname="alice")
    assert isinstance(client.error, ssl.SSLCertVerificationError)
    assert client.error.verify_code in (26, 62)   # purpose (or name: alice has no SAN)


# --------------------------------------------------------------------------- ALPN

def test_alpn_mismatch_detected_on_both_ends(pki):
    cctx = pki.client_context(pki.alice)
    cctx.set_alpn_protocols(["vproxy/2"])
    server, client = handshake(pki.server_context(), cctx)
    assert server.error is None
    assert isinstance(server.alpn_error, tls.AlpnMismatch)
    assert server.alpn_error.selected is None
    assert isinstance(client.alpn_error, tls.AlpnMismatch)
    assert "vproxy/1" in tls.describe_tls_error(server.alpn_error)
    assert client.received == b""       # the server closed instead of talking


def test_alpn_absent_detected(pki):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(pki.ca)
    ctx.load_cert_chain(pki.alice.cert, pki.alice.key)
    server, client = handshake(pki.server_context(), ctx)
    assert isinstance(server.alpn_error, tls.AlpnMismatch)
    assert isinstance(server.alpn_error, VproxyError)


def test_client_detects_server_speaking_another_alpn(pki):
    sctx = pki.server_context()
    sctx.set_alpn_protocols(["vproxy/2", "vproxy/1.5"])
    cctx = pki.client_context(pki.alice)
    cctx.set_alpn_protocols([tls.ALPN, "vproxy/2"])
    server, client = handshake(sctx, cctx)
    assert client.alpn == "vproxy/2"
    assert isinstance(client.alpn_error, tls.AlpnMismatch)
    assert client.alpn_error.selected == "vproxy/2"
    assert "versions of vproxy differ" in str(client.alpn_error)


# --------------------------------------------------------------------------- user errors

def test_missing_certificate_is_a_user_error(pki):
    with pytest.raises(UserError) as info:
        tls.client_context("/x/y.pem", pki.alice.key, pki.ca)
    assert info.value.message == "cannot read certificate /x/y.pem: No such file or directory"
    assert "vproxy pki issue client" in info.value.hint
    with pytest.raises(UserError) as info:
        tls.server_context("/x/y.pem", pki.server.key, pki.ca)
    assert "vproxy pki issue server" in info.value.hint


def test_missing_key_ca_and_crl_are_user_errors(pki):
    with pytest.raises(UserError) as info:
        tls.client_context(pki.alice.cert, "/x/alice.key", pki.ca)
    assert info.value.message == "cannot read private key /x/alice.key: No such file or directory"
    with pytest.raises(UserError) as info:
        tls.client_context(pki.alice.cert, pki.alice.key, "/x/ca.pem")
    assert info.value.message == "cannot read CA certificate /x/ca.pem: No such file or directory"
    assert "vproxy pki init" in info.value.hint
    with pytest.raises(UserError) as info:
        tls.server_context(pki.server.cert, pki.server.key, pki.ca, "/x/crl.pem")
    assert info.value.message == "cannot read CRL /x/crl.pem: No such file or directory"


def test_key_of_another_certificate_is_a_user_error(pki):
    with pytest.raises(UserError) as info:
        tls.client_context(pki.alice.cert, pki.bob.key, pki.ca)
    assert info.value.message == "private key %s does not belong to certificate %s" % (
        pki.bob.key, pki.alice.cert)


def test_wrong_kinds_of_files_are_user_errors(pki, tmp_path):
    cases = [
        ((pki.alice.key, pki.alice.key, pki.ca), "is not a PEM certificate"),
        ((pki.alice.cert, pki.alice.cert, pki.ca), "is not a PEM private key"),
        ((pki.alice.cert, pki.alice.key, pki.alice.key), "is not a PEM CA certificate"),
        ((pki.alice.cert, pki.alice.key, str(tmp_path)), "Is a directory"),
    ]
    for args, words in cases:
        with pytest.raises(UserError) as info:
            tls.client_context(*args)
        assert words in info.value.message
    # A certificate passed as the CRL would silently become trusted: refused.
    with pytest.raises(UserError) as info:
        tls.server_context(pki.server.cert, pki.server.key, pki.ca, pki.other_ca)
    assert "is not a PEM CRL" in info.value.message
    mixed = tmp_path / "mixed.pem"
    mixed.write_bytes(open(pki.crl, "rb").read() + open(pki.other_ca, "rb").read())
    with pytest.raises(UserError) as info:
        tls.server_context(pki.server.cert, pki.server.key, pki.ca, str(mixed))
    assert "contains certificates" in info.value.message


def test_encrypted_key_is_a_user_error_not_a_prompt(pki, tmp_path):
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key(open(pki.alice.key, "rb").read(), None)
    enc = tmp_path / "enc.key"
    enc.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(UserError) as info:
        tls.client_context(pki.alice.cert, str(enc), pki.ca)
    assert "is encrypted" in info.value.message


def test_garbage_pem_is_a_user_error(pki, tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    with pytest.raises(UserError) as info:
        tls.client_context(str(bad), pki.alice.key, pki.ca)
    assert str(bad) in info.value.message


# --------------------------------------------------------------------------- identity

def test_identity_from_peercert_dict():
    peercert = {
        "subject": ((("countryName", "DE"),), (("organizationName", "Lab"),),
                    (("commonName", "alice"),)),
        "subjectAltName": (("DNS", "alice.example.com"), ("IP Address", "192.0.2.7"),
                           ("IP Address", "2001:DB8:0:0:0:0:0:1\n"), ("URI", "urn:x:alice"),
                           ("email", "alice@example.com"), ("DNS", "alice")),
    }
    ident = tls.identity_from_peercert(peercert)
    assert ident.common_name == "alice"
    assert ident.dns_names == ("alice.example.com", "alice")
    assert ident.ip_addresses == ("192.0.2.7", "2001:db8::1")
    assert ident.uris == ("urn:x:alice",)
    assert ident.names() == ("alice", "alice.example.com", "192.0.2.7", "2001:db8::1",
                             "urn:x:alice")
    assert str(ident) == "alice"


def test_identity_without_cn_and_without_anything():
    ident = tls.identity_from_peercert({"subject": ((("organizationName", "x"),),),
                                        "subjectAltName": (("URI", "spiffe://a/b"),)})
    assert ident.common_name == "" and str(ident) == "spiffe://a/b"
    assert ident.names() == ("spiffe://a/b",)
    assert str(tls.Identity("", (), (), ())) == "(anonymous)"
    with pytest.raises(tls.NoPeerCertificate):
        tls.identity_from_peercert({})


def test_identity_takes_the_last_cn():
    ident = tls.identity_from_peercert({"subject": ((("commonName", "outer"),),
                                                    (("commonName", "inner"),))})
    assert ident.common_name == "inner"


def test_identity_is_frozen_and_hashable():
    ident = tls.Identity("a", ("b",), (), ())
    with pytest.raises(dataclasses.FrozenInstanceError):
        ident.common_name = "x"  # type: ignore[misc]
    assert {ident: 1}[tls.Identity("a", ("b",), (), ())] == 1


names = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=0, max_size=12)


@given(cn=names, dns=st.lists(names, max_size=4), uris=st.lists(names, max_size=3))
def test_identity_names_property(cn, dns, uris):
    ident = tls.Identity(cn, tuple(dns), (), tuple(uris))
    got = ident.names()
    assert len(set(got)) == len(got)
    assert "" not in got
    if cn:
        assert got[0] == cn
    assert set(got) == {n for n in [cn] + dns + uris if n}
    assert str(ident) == (got[0] if got else "(anonymous)")


# --------------------------------------------------------------------------- messages

def test_describe_misc_errors():
    assert "timed out" in tls.describe_tls_error(socket.timeout("timed out"))
    assert "reset" in tls.describe_tls_error(ConnectionResetError(104, "reset"))
    assert "refused" in tls.describe_tls_error(ConnectionRefusedError(111, "refused"))
    assert tls.describe_tls_error(UserError("cannot read x", hint="y")) == "cannot read x"
    assert tls.describe_tls_error(ValueError("odd")) == "odd"
    assert "vproxy/1" in tls.describe_tls_error(tls.AlpnMismatch(None))


def test_expiry_watch_looks_again_when_early_and_fires_once_after_not_after():
    """The timer is never set further than `recheck` ahead; a look before notAfter sets
    it again, the first after it calls on_expired (once); cancel() stops it."""
    import asyncio
    import time

    from vproxy.security.tls import ExpiryWatch

    async def main():
        loop = asyncio.get_event_loop()
        fired = []
        not_after = time.time() + 0.5
        watch = ExpiryWatch(loop, not_after, lambda: fired.append(time.time()), recheck=0.1)
        assert 0 < watch.when() - loop.time() <= 0.1 + 0.01
        await asyncio.sleep(0.3)
        assert fired == [] and watch.when() is not None  # looked, too early: set again
        await asyncio.sleep(0.6)
        assert len(fired) == 1 and fired[0] > not_after and watch.when() is None
        gone = ExpiryWatch(loop, time.time() + 0.2, lambda: fired.append(0.0))
        gone.cancel()
        assert gone.when() is None
        await asyncio.sleep(0.4)
        assert len(fired) == 1

    asyncio.run(main())
