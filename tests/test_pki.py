"""vproxy.pki and `vproxy pki`: what gets written, how, and that it is usable for mTLS."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import stat
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from support.pkitools import handshake
from vproxy.security import pki as vpki
from vproxy.security import tls
from vproxy.cli.pki import pki as pki_group
from vproxy.errors import UserError

UTC = dt.timezone.utc


def load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def load_crl(path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(Path(path).read_bytes())


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def ext(cert, cls):
    return cert.extensions.get_extension_for_class(cls)


@pytest.fixture
def ca(tmp_path) -> Path:
    d = tmp_path / "pki"
    vpki.init_ca(d)
    return d


# --------------------------------------------------------------------------- init

def test_init_writes_ca_key_crl_and_index(tmp_path):
    d = tmp_path / "new" / "pki"
    assert vpki.init_ca(d, common_name="lab CA") == d / "ca.pem"
    cert = load(d / "ca.pem")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "lab CA"
    assert ext(cert, x509.BasicConstraints).value.ca is True
    assert ext(cert, x509.BasicConstraints).critical
    ku = ext(cert, x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    cert.verify_directly_issued_by(cert)          # self-signed, signature good
    crl = load_crl(d / "crl.pem")
    assert crl.is_signature_valid(cert.public_key())
    assert len(list(crl)) == 0
    assert crl.next_update_utc - dt.datetime.now(UTC) > dt.timedelta(days=364)
    assert json.loads((d / "index.json").read_text())["certs"] == []
    assert mode(d / "ca.key") == 0o600
    assert mode(d) == 0o700


def test_keys_are_0600_from_creation_even_with_umask_0(tmp_path):
    old = os.umask(0)
    try:
        vpki.init_ca(tmp_path)
        cert, key = vpki.issue(tmp_path, "alice", "client")
    finally:
        os.umask(old)
    assert mode(tmp_path / "ca.key") == 0o600
    assert mode(key) == 0o600
    assert mode(cert) == 0o644
    assert mode(tmp_path / "issued") == 0o700


def test_key_file_is_never_created_with_a_wider_mode(tmp_path, monkeypatch):
    created = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *args, **kwargs):
        if flags & os.O_CREAT:
            created.append((os.path.basename(path), mode))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    vpki.init_ca(tmp_path)
    vpki.issue(tmp_path, "alice", "client")
    keys = [m for name, m in created if ".key" in name]
    assert keys and all(m == 0o600 for m in keys)


def test_init_refuses_to_overwrite_and_force_replaces(ca):
    before = (ca / "ca.pem").read_bytes(), (ca / "ca.key").read_bytes()
    with pytest.raises(UserError) as info:
        vpki.init_ca(ca)
    assert "already exists" in info.value.message and "--force" in info.value.hint
    assert ((ca / "ca.pem").read_bytes(), (ca / "ca.key").read_bytes()) == before
    vpki.init_ca(ca, force=True)
    assert (ca / "ca.key").read_bytes() != before[1]
    assert mode(ca / "ca.key") == 0o600


# --------------------------------------------------------------------------- issue

def test_issue_server_certificate(ca):
    cert_path, key_path = vpki.issue(ca, "myhost", "server", dns_names=["myhost"],
                                     ip_addresses=["127.0.0.1", "::1"])
    assert cert_path == ca / "issued" / "myhost.pem" and key_path == ca / "issued" / "myhost.key"
    cert = load(cert_path)
    ca_cert = load(ca / "ca.pem")
    cert.verify_directly_issued_by(ca_cert)
    assert cert.subject.rfc4514_string() == "CN=myhost"
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["myhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                        ipaddress.ip_address("::1")]
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    ski = ext(cert, x509.SubjectKeyIdentifier).value
    assert ski.digest == x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(ca_cert, x509.SubjectKeyIdentifier).value.digest
    assert cert.public_key().curve.name == "secp256r1"
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 825


@pytest.mark.parametrize("name,dns,ips", [
    ("myhost", ["myhost"], []),
    ("192.0.2.1", [], [ipaddress.ip_address("192.0.2.1")]),
    ("2001:db8::1", [], [ipaddress.ip_address("2001:db8::1")]),
])
def test_server_without_sans_uses_its_name(ca, name, dns, ips):
    cert = load(vpki.issue(ca, name, "server")[0])
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == dns
    assert san.get_values_for_type(x509.IPAddress) == ips


def test_issue_client_certificate(ca):
    cert = load(vpki.issue(ca, "alice", "client")[0])
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        ext(cert, x509.SubjectAlternativeName)
    entry = vpki.list_issued(ca)[-1]
    assert (entry.name, entry.kind, entry.subject, entry.revoked) == \
        ("alice", "client", "CN=alice", False)
    assert entry.serial == cert.serial_number
    assert entry.not_after == cert.not_valid_after_utc.replace(microsecond=0)
    assert Path(entry.path) == (ca / "issued" / "alice.pem").resolve()


def test_issue_validity_window_and_overrides(ca):
    start = dt.datetime(2020, 1, 1, tzinfo=UTC)
    cert = load(vpki.issue(ca, "old", "client", valid_from=start, days=10,
                           key_usage_override=["serverAuth"])[0])
    assert cert.not_valid_before_utc == start
    assert cert.not_valid_after_utc == start + dt.timedelta(days=10)
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    cert = load(vpki.issue(ca, "noeku", "client", key_usage_override=[])[0])
    with pytest.raises(x509.ExtensionNotFound):
        ext(cert, x509.ExtendedKeyUsage)


def test_issue_refuses_to_overwrite_and_force_replaces(ca):
    cert, key = vpki.issue(ca, "alice", "client")
    before = cert.read_bytes(), key.read_bytes()
    with pytest.raises(UserError) as info:
        vpki.issue(ca, "alice", "client")
    assert str(ca / "issued" / "alice.pem") in info.value.message
    assert (cert.read_bytes(), key.read_bytes()) == before
    with pytest.raises(UserError):          # the same name as a server: same files
        vpki.issue(ca, "alice", "server")
    vpki.issue(ca, "alice", "client", force=True)
    assert key.read_bytes() != before[1] and mode(key) == 0o600
    assert len(vpki.list_issued(ca)) == 2


def test_issue_refuses_if_only_the_key_exists(ca):
    (ca / "issued" / "bob.key").write_text("precious")
    with pytest.raises(UserError):
        vpki.issue(ca, "bob", "client")
    assert (ca / "issued" / "bob.key").read_text() == "precious"
    assert not (ca / "issued" / "bob.pem").exists()


def test_issue_out_dir(ca, tmp_path):
    out = tmp_path / "creds"
    cert, key = vpki.issue(ca, "ci", "client", out_dir=out)
    assert (cert, key) == (out / "ci.pem", out / "ci.key")
    assert mode(key) == 0o600
    assert not (ca / "issued" / "ci.pem").exists()


@pytest.mark.parametrize("kwargs,words", [
    (dict(name="alice", kind="admin"), "kind"),
    (dict(name="../evil", kind="client"), "bad certificate name"),
    (dict(name="a/b", kind="client"), "bad certificate name"),
    (dict(name="", kind="client"), "bad certificate name"),
    (dict(name=".hidden", kind="client"), "bad certificate name"),
    (dict(name="h", kind="server", ip_addresses=["myhost"]), "not an IP address"),
    (dict(name="h", kind="server", dns_names=["10.0.0.1"]), "not a DNS name"),
    (dict(name="h", kind="server", days=0), "positive"),
    (dict(name="h", kind="server", key_usage_override=["root"]), "extended key usage"),
])
def test_issue_rejects_bad_input(ca, kwargs, words):
    with pytest.raises(UserError) as info:
        vpki.issue(ca, **kwargs)
    assert words in info.value.message
    assert not list((ca / "issued").iterdir())


def test_issue_without_ca_says_how_to_make_one(tmp_path):
    with pytest.raises(UserError) as info:
        vpki.issue(tmp_path / "none", "alice", "client")
    assert "no CA" in info.value.message
    assert "vproxy pki init" in info.value.hint


def test_missing_cryptography_is_a_user_error(ca, monkeypatch):
    monkeypatch.setitem(sys.modules, "cryptography", None)
    with pytest.raises(UserError) as info:
        vpki.issue(ca, "alice", "client")
    assert info.value.message == "vproxy pki needs the 'cryptography' package"
    assert info.value.hint == "pip install cryptography"


# --------------------------------------------------------------------------- revoke

def test_revoke_by_name_updates_crl_and_index(ca):
    cert_path, _ = vpki.issue(ca, "alice", "client")
    vpki.issue(ca, "bob", "client")
    serial = load(cert_path).serial_number
    number_before = ext(load_crl(ca / "crl.pem"), x509.CRLNumber).value.crl_number

    assert vpki.revoke(ca, "alice") == ca / "crl.pem"
    crl = load_crl(ca / "crl.pem")
    assert crl.is_signature_valid(load(ca / "ca.pem").public_key())
    assert crl.issuer == load(ca / "ca.pem").subject
    assert [r.serial_number for r in crl] == [serial]
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert ext(crl, x509.CRLNumber).value.crl_number > number_before
    status = {e.name: e.revoked for e in vpki.list_issued(ca)}
    assert status == {"alice": True, "bob": False}

    with pytest.raises(UserError) as info:
        vpki.revoke(ca, "alice")
    assert "already revoked" in info.value.message


def test_revoke_by_path_and_keeps_earlier_revocations(ca):
    a, _ = vpki.issue(ca, "alice", "client")
    b, _ = vpki.issue(ca, "bob", "client")
    vpki.revoke(ca, "alice")
    vpki.revoke(ca, str(b))
    crl = load_crl(ca / "crl.pem")
    assert {r.serial_number for r in crl} == {load(a).serial_number, load(b).serial_number}


def test_revoke_refuses_unknown_and_foreign(ca, tmp_path):
    with pytest.raises(UserError) as info:
        vpki.revoke(ca, "nobody")
    assert "no certificate named 'nobody'" in info.value.message
    other = tmp_path / "other"
    vpki.init_ca(other, common_name="other CA")
    foreign, _ = vpki.issue(other, "alice", "client")
    with pytest.raises(UserError) as info:
        vpki.revoke(ca, str(foreign))
    assert "not issued by the CA" in info.value.message


def test_update_crl_renews_validity_and_keeps_revocations(ca):
    cert, _ = vpki.issue(ca, "alice", "client")
    vpki.revoke(ca, "alice")
    vpki.update_crl(ca, days=7)
    crl = load_crl(ca / "crl.pem")
    assert crl.next_update_utc - dt.datetime.now(UTC) < dt.timedelta(days=7, minutes=1)
    assert [r.serial_number for r in crl] == [load(cert).serial_number]
    assert vpki.crl_next_update(ca) == crl.next_update_utc


# --------------------------------------------------------------------------- show

def test_show_valid_server(ca):
    cert_path, _ = vpki.issue(ca, "myhost", "server", dns_names=["myhost", "myhost.lan"],
                              ip_addresses=["127.0.0.1"])
    text = vpki.show(cert_path, pki_dir=ca)
    cert = load(cert_path)
    assert "CN=myhost" in text
    assert "server" in text
    assert "DNS:myhost, DNS:myhost.lan, IP:127.0.0.1" in text
    assert "CN=vproxy CA" in text
    assert "(valid, 824 days left)" in text
    assert ("%X" % cert.serial_number)[-6:] in text.replace(":", "")
    fp = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest().upper()
    assert fp in text.replace(":", "")
    assert "revoked      no" in text


def test_show_expired_not_yet_valid_revoked_and_ca(pki):
    assert "(expired)" in vpki.show(pki.expired.cert)
    assert "(not yet valid)" in vpki.show(pki.not_yet_valid.cert)
    text = vpki.show(pki.revoked.cert, pki_dir=pki.dir)
    assert "revoked      YES" in text
    lines = vpki.show(pki.revoked.cert).splitlines()          # no pki_dir: no claim made
    assert not any(line.startswith("revoked") for line in lines)
    assert "kind         CA" in vpki.show(pki.ca)
    assert "not issued by the CA" in vpki.show(pki.other_client.cert, pki_dir=pki.dir)
    text = vpki.show(pki.san_client.cert)
    assert "DNS:ci.example.com" in text and "IP:2001:db8::7" in text
    assert "URI:spiffe://example.com/ci" in text
    assert "kind         client" in text
    assert "kind         server" in vpki.show(pki.wrong_eku.cert)


def test_show_refuses_non_certificates(ca, tmp_path):
    with pytest.raises(UserError) as info:
        vpki.show(ca / "ca.key")
    assert "not a certificate" in info.value.message
    with pytest.raises(UserError) as info:
        vpki.show(tmp_path / "missing.pem")
    assert "No such file" in info.value.message


def test_validity_text():
    start = dt.datetime(2024, 1, 1, tzinfo=UTC)
    end = dt.datetime(2024, 1, 11, tzinfo=UTC)
    assert vpki.validity_text(start, end, now=start - dt.timedelta(seconds=1)) == \
        "(not yet valid)"
    assert vpki.validity_text(start, end, now=end + dt.timedelta(seconds=1)) == "(expired)"
    assert vpki.validity_text(start, end, now=start) == "(valid, 10 days left)"
    assert vpki.validity_text(start, end, now=end - dt.timedelta(hours=25)) == \
        "(valid, 1 day left)"


def test_default_pki_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("VPROXY_PKI_DIR", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert vpki.default_pki_dir() == tmp_path / ".config" / "vproxy" / "pki"
    monkeypatch.setenv("VPROXY_PKI_DIR", "/srv/pki")
    assert vpki.default_pki_dir() == Path("/srv/pki")


# --------------------------------------------------------------------------- the fixture

def test_fixture_certificates_are_what_they_say(pki):
    now = dt.datetime.now(UTC)
    assert load(pki.expired.cert).not_valid_after_utc < now
    assert load(pki.not_yet_valid.cert).not_valid_before_utc > now
    revoked_serial = load(pki.revoked.cert).serial_number
    assert load_crl(pki.crl).get_revoked_certificate_by_serial_number(revoked_serial)
    assert list(ext(load(pki.wrong_eku.cert), x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.SERVER_AUTH]
    ss = load(pki.self_signed.cert)
    assert ss.issuer == ss.subject
    assert load(pki.other_client.cert).subject == load(pki.alice.cert).subject
    assert load(pki.other_client.cert).issuer != load(pki.alice.cert).issuer


# --------------------------------------------------------------------------- CLI

def run(args, env=None):
    result = CliRunner().invoke(pki_group, args, env=env, catch_exceptions=False)
    return result


def test_cli_three_command_flow_gives_working_mtls(tmp_path):
    """The whole setup a new user does, then a real handshake with what it wrote."""
    env = {"VPROXY_PKI_DIR": str(tmp_path / "pki")}
    r = run(["init"], env)
    assert r.exit_code == 0, r.output
    assert "ca.pem" in r.output and "next: vproxy pki issue server HOST --dns HOST" in r.output
    r = run(["issue", "server", "myhost", "--dns", "localhost", "--ip", "127.0.0.1"], env)
    assert r.exit_code == 0, r.output
    assert "DNS:localhost, IP:127.0.0.1" in r.output
    assert "next:" in r.output and "vproxy pki issue client" in r.output
    r = run(["issue", "client", "alice"], env)
    assert r.exit_code == 0, r.output
    assert "alice.key" in r.output and "next: give alice" in r.output

    d = tmp_path / "pki"
    server = tls.server_context(str(d / "issued/myhost.pem"), str(d / "issued/myhost.key"),
                                str(d / "ca.pem"), str(d / "crl.pem"))
    client = tls.client_context(str(d / "issued/alice.pem"), str(d / "issued/alice.key"),
                                str(d / "ca.pem"))
    s, c = handshake(server, client, server_hostname="127.0.0.1")
    assert s.error is None and c.error is None
    assert s.identity.common_name == "alice"

    r = run(["revoke", "alice"], env)
    assert r.exit_code == 0, r.output
    assert "revoked client alice" in r.output
    server = tls.server_context(str(d / "issued/myhost.pem"), str(d / "issued/myhost.key"),
                                str(d / "ca.pem"), str(d / "crl.pem"))
    s, c = handshake(server, client, server_hostname="127.0.0.1")
    assert s.error is not None and s.error.verify_code == 23


def test_cli_user_errors_are_one_line_and_exit_2(tmp_path):
    d = str(tmp_path / "pki")
    r = run(["issue", "client", "alice", "--dir", d])
    assert r.exit_code == 2
    assert r.output.splitlines()[0].startswith("vproxy: error: no CA in ")
    assert r.output.splitlines()[1] == "hint: create the CA with: vproxy pki init --dir %s" % d
    assert "Traceback" not in r.output
    assert run(["init", "--dir", d]).exit_code == 0
    r = run(["init", "--dir", d])
    assert r.exit_code == 2 and "already exists; not overwriting it" in r.output
    r = run(["issue", "server", "h", "--ip", "not-an-ip", "--dir", d])
    assert r.exit_code == 2 and "vproxy: error: 'not-an-ip' is not an IP address" in r.output
    r = run(["issue", "laptop", "h", "--dir", d])        # click's own usage error
    assert r.exit_code == 2 and "server" in r.output


def test_cli_issue_force_out_days(tmp_path):
    d = str(tmp_path / "pki")
    out = tmp_path / "out"
    run(["init", "--dir", d])
    r = run(["issue", "client", "ci", "--dir", d, "--out", str(out), "--days", "3"])
    assert r.exit_code == 0, r.output
    cert = load(out / "ci.pem")
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 3
    assert run(["issue", "client", "ci", "--dir", d, "--out", str(out)]).exit_code == 2
    assert run(["issue", "client", "ci", "--dir", d, "--out", str(out),
                "--force"]).exit_code == 0
    assert load(out / "ci.pem").serial_number != cert.serial_number


def test_cli_show_list_revoke_crl(tmp_path):
    d = str(tmp_path / "pki")
    run(["init", "--dir", d])
    run(["issue", "server", "myhost", "--dir", d])
    run(["issue", "client", "alice", "--dir", d])
    r = run(["show", "alice", "--dir", d])
    assert r.exit_code == 0 and "CN=alice" in r.output and "revoked      no" in r.output
    r = run(["show", str(Path(d) / "issued" / "myhost.pem"), "--dir", d])
    assert r.exit_code == 0 and "DNS:myhost" in r.output
    r = run(["show", "nobody", "--dir", d])
    assert r.exit_code == 2 and "no certificate named 'nobody'" in r.output
    r = run(["revoke", "alice", "--dir", d])
    assert r.exit_code == 0 and "crl.pem" in r.output
    r = run(["list", "--dir", d])
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "STATUS", "EXPIRES", "SERIAL"]
    assert lines[1].split()[:3] == ["myhost", "server", "valid"]
    assert lines[2].split()[:3] == ["alice", "client", "revoked"]
    assert lines[-1].startswith("CRL ")
    r = run(["crl", "--dir", d, "--days", "10"])
    assert r.exit_code == 0, r.output
    assert vpki.crl_next_update(d) - dt.datetime.now(UTC) < dt.timedelta(days=10, minutes=1)


def test_cli_help_has_examples():
    r = run(["--help"])
    assert "vproxy pki issue server" in r.output and "vproxy pki issue client" in r.output
    r = run(["issue", "--help"])
    assert "{server|client} NAME" in r.output and "--dns" in r.output and "--force" in r.output
