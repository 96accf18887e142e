"""The client configuration file: named hosts, defaults, and who overrides whom.

Proves: [defaults] < [hosts.NAME] < environment < command line, through the real click
options of a client command; a certificate is taken whole (an identity from a higher
layer is not mixed with a cert from a lower one); HOST may be a name from the file, an
address, or unix:/path (local mode, no certificate needed); mistakes in the file name
the file and the key; `vproxy ls` with no HOST lists every host of the file.
"""

import json
import os
import subprocess
import sys
import textwrap

import click
import pytest
from click.testing import CliRunner

from vproxy.cli.common import resolve_client, tls_options
from vproxy.client.config import layer, load_client_config, parse_client_config
from vproxy.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@click.command()
@click.argument("host")
@tls_options(server=False)
def show(host, **tls_args):
    """What a client command would connect to, as JSON."""
    try:
        target = resolve_client(host, tls_args)
    except UserError as e:
        click.echo(json.dumps({"error": e.message}))
        return
    click.echo(json.dumps({"address": target.address, "local": target.local,
                           "server_name": target.server_name, **target.tls}))


@pytest.fixture
def pkidir(tmp_path):
    """A PKI directory layout with certificates for alice, bob and carol (contents do not
    matter here: only which files are chosen)."""
    pki = tmp_path / "pki"
    (pki / "issued").mkdir(parents=True)
    (pki / "ca.pem").write_text("ca")
    for name in ("alice", "bob", "carol"):
        (pki / "issued" / (name + ".pem")).write_text(name)
        (pki / "issued" / (name + ".key")).write_text(name)
    return pki


def write_config(tmp_path, text):
    path = tmp_path / "client.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def resolve(args, env=None):
    env = dict(env or {})
    for name in ("VPROXY_IDENTITY", "VPROXY_CERT", "VPROXY_KEY", "VPROXY_CA", "VPROXY_CRL",
                 "VPROXY_PKI_DIR", "VPROXY_CLIENT_CONFIG"):
        env.setdefault(name, None)  # the caller's environment must not leak in
    result = CliRunner().invoke(show, args, env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_precedence_file_defaults_then_host_then_env_then_flag(tmp_path, pkidir):
    config = write_config(tmp_path, """
        [defaults]
        identity = "alice"
        pki_dir = "%s"

        [hosts.vmhost1]
        address = "vmhost1.example:7443"
        identity = "bob"

        [hosts.vmhost2]
        address = "192.0.2.7"
        server_name = "vmhost2.example"
    """ % pkidir)
    issued = pkidir / "issued"
    base = ["--client-config", config]
    # [defaults] alone
    got = resolve(["vmhost2"] + base)
    assert got["address"] == "192.0.2.7" and got["server_name"] == "vmhost2.example"
    assert got["cert"] == str(issued / "alice.pem") and got["ca"] == str(pkidir / "ca.pem")
    # the host's table beats [defaults]
    assert resolve(["vmhost1"] + base)["cert"] == str(issued / "bob.pem")
    # the environment beats the file
    assert resolve(["vmhost1"] + base, {"VPROXY_IDENTITY": "carol"})["cert"] == str(issued / "carol.pem")
    # a flag beats the environment
    got = resolve(["vmhost1", "--identity", "alice"] + base, {"VPROXY_IDENTITY": "carol"})
    assert got["cert"] == str(issued / "alice.pem")
    # the config file itself may come from the environment
    assert resolve(["vmhost1"], {"VPROXY_CLIENT_CONFIG": config})["address"] == "vmhost1.example:7443"


def test_a_certificate_is_taken_whole(tmp_path, pkidir):
    config = write_config(tmp_path, """
        [hosts.h]
        address = "h.example"
        cert = "certs/h.pem"
        key = "certs/h.key"
        ca = "%s/ca.pem"
    """ % pkidir)
    got = resolve(["h", "--client-config", config])
    # relative paths are relative to the file
    assert got["cert"] == str(tmp_path / "certs" / "h.pem") and got["key"] == str(tmp_path / "certs" / "h.key")
    # an identity from the environment replaces the file's cert AND key
    got = resolve(["h", "--client-config", config],
                  {"VPROXY_IDENTITY": "bob", "VPROXY_PKI_DIR": str(pkidir)})
    assert got["cert"] == str(pkidir / "issued" / "bob.pem") and got["key"] == str(pkidir / "issued" / "bob.key")
    # and a cert on the command line replaces an identity from the environment
    got = resolve(["h", "--client-config", config, "--cert", "/x.pem", "--key", "/x.key"],
                  {"VPROXY_IDENTITY": "bob", "VPROXY_PKI_DIR": str(pkidir)})
    assert got["cert"] == "/x.pem" and got["key"] == "/x.key"


def test_layer():
    assert layer({"identity": "a", "ca": "c"}, {"cert": "x", "key": "y"}) == {"ca": "c", "cert": "x", "key": "y"}
    assert layer({"cert": "x", "key": "y"}, {"identity": "b"}) == {"identity": "b"}
    assert layer({"ca": "c"}, {"ca": None}) == {"ca": "c"}


def test_host_forms(tmp_path, pkidir):
    config = write_config(tmp_path, """
        [defaults]
        identity = "alice"
        pki_dir = "%s"
        [hosts.here]
        address = "unix:/run/vproxy/agent.sock"
    """ % pkidir)
    base = ["--client-config", config]
    here = resolve(["here"] + base)
    assert here["local"] and here["address"] == "unix:/run/vproxy/agent.sock" and "cert" not in here
    assert resolve(["unix:/tmp/a.sock"])["local"]  # no certificate needed, none configured
    assert resolve(["/tmp/a.sock"])["local"]
    plain = resolve(["other.example:7444"] + base)  # not a name in the file: an address
    assert plain["address"] == "other.example:7444" and not plain["local"]
    assert plain["cert"] == str(pkidir / "issued" / "alice.pem")


@pytest.mark.parametrize("text, message", [
    ("[hosts.a]\nadress = 'x'\n", "[hosts.a]: unknown key 'adress'"),
    ("[defaults]\naddress = 'x'\n", "[defaults]: unknown key 'address'"),
    ("[hosts.a]\nport = 7443\n", "unknown key 'port'"),
    ("[hosts.a]\naddress = 7443\n", "address must be a non-empty string"),
    ("[hosts.a]\nkey = 'k.pem'\n", "key without cert"),
    ("hosts = 1\n", "hosts must be tables"),
    ("[host.a]\n", "unknown key(s) host"),
    ("[hosts.a\n", "is not valid TOML"),
])
def test_mistakes_name_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "client.toml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_client_config(str(path))
    assert message in info.value.message and str(path) in info.value.message


def test_missing_files(tmp_path, monkeypatch):
    with pytest.raises(UserError) as info:
        load_client_config(str(tmp_path / "nope.toml"))
    assert "does not exist" in info.value.message
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert load_client_config(None).hosts == {}  # the default file is optional
    (tmp_path / "vproxy").mkdir()
    (tmp_path / "vproxy" / "client.toml").write_text("[hosts.a]\n[hosts.b]\n")
    config = load_client_config(None)
    assert list(config.hosts) == ["a", "b"] and config.path.endswith("vproxy/client.toml")
    assert parse_client_config({}).hosts == {}


def test_ls_without_host_lists_every_host_of_the_file(pki, tmp_path):
    """Two agents, one over TLS and one local-only, both named in the file."""
    sock = tmp_path / "a.sock"
    env = dict(os.environ, PYTHONPATH=ROOT)
    for name in ("VPROXY_IDENTITY", "VPROXY_CERT", "VPROXY_KEY", "VPROXY_CA", "VPROXY_CLIENT_CONFIG"):
        env.pop(name, None)
    tls_agent = subprocess.Popen(
        [sys.executable, "-m", "vproxy", "serve", "--listen", "127.0.0.1:0", "--cert", pki.server.cert,
         "--key", pki.server.key, "--ca", pki.ca], stderr=subprocess.PIPE, text=True, env=env)
    local_agent = subprocess.Popen([sys.executable, "-m", "vproxy", "serve", "--local-socket", str(sock)],
                                   stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = tls_agent.stderr.readline()
        assert "listening on" in line, line
        address = line.split("listening on ")[1].strip()
        line = local_agent.stderr.readline()
        assert "listening on unix:%s" % sock in line, line
        config = write_config(tmp_path, """
            [defaults]
            cert = "%s"
            key = "%s"
            ca = "%s"
            [hosts.tls]
            address = "%s"
            [hosts.local]
            address = "unix:%s"
            [hosts.down]
            address = "127.0.0.1:1"
        """ % (pki.alice.cert, pki.alice.key, pki.ca, address, sock))
        out = subprocess.run([sys.executable, "-m", "vproxy", "ls", "--json", "--client-config", config],
                             capture_output=True, text=True, env=env, timeout=60)
        hosts = json.loads(out.stdout)
        assert [h["host"] for h in hosts] == ["tls", "local", "down"]
        assert hosts[0]["error"] == "" and hosts[1]["error"] == "" and "cannot connect" in hosts[2]["error"]
        assert out.returncode == 3  # one host unreachable
        out = subprocess.run([sys.executable, "-m", "vproxy", "ls", "tls", "local", "--client-config", config],
                             capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == ["tls: no VMs you may open", "local: no VMs you may open"]
        # no HOST and no hosts in the file: one clear line
        empty = write_config(tmp_path, "[defaults]\n")
        out = subprocess.run([sys.executable, "-m", "vproxy", "ls", "--client-config", empty],
                             capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 2 and out.stderr.startswith("vproxy: error: no HOST given")
    finally:
        for proc in (tls_agent, local_agent):
            proc.terminate()
            proc.wait(15)
    assert not sock.exists()


def test_the_api_resolves_as_the_cli_does(tmp_path, pkidir, monkeypatch):
    """vproxy.api.connect() reads the same file with the same precedence: a host entry's
    address, certificate and server_name, the CRL of [defaults]; the environment beats
    the file, an argument beats the environment; a client gets no default CRL."""
    import vproxy.api
    from vproxy.api.credentials import resolve_target_for_api

    (tmp_path / "crl.pem").write_text("crl")
    (pkidir / "crl.pem").write_text("the PKI's own CRL: only the agent takes it by default")
    config = write_config(tmp_path, """
        [defaults]
        identity = "alice"
        pki_dir = "%s"
        crl = "crl.pem"

        [hosts.vmhost1]
        address = "vmhost1.example:7443"
        identity = "bob"
        server_name = "agent.example"

        [hosts.here]
        address = "unix:/run/vproxy/agent.sock"
    """ % pkidir)
    for name in ("VPROXY_HOST", "VPROXY_IDENTITY", "VPROXY_CERT", "VPROXY_KEY", "VPROXY_CA",
                 "VPROXY_CRL", "VPROXY_PKI_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VPROXY_CLIENT_CONFIG", config)
    issued = pkidir / "issued"
    got = vproxy.api.resolve_credentials("vmhost1")
    assert got == {"address": "vmhost1.example:7443", "cert": str(issued / "bob.pem"),
                   "key": str(issued / "bob.key"), "ca": str(pkidir / "ca.pem"),
                   "crl": str(tmp_path / "crl.pem")}
    assert resolve_target_for_api("vmhost1").server_name == "agent.example"
    # the same answer as the command line's, for the same file
    cli = resolve(["vmhost1", "--client-config", config])
    assert {k: cli[k] for k in ("address", "cert", "key", "ca", "crl")} == got
    # not a name in the file: an address, with [defaults]
    other = vproxy.api.resolve_credentials("other.example")
    assert other["address"] == "other.example" and other["cert"] == str(issued / "alice.pem")
    # the environment beats the file, an argument beats the environment
    monkeypatch.setenv("VPROXY_IDENTITY", "carol")
    assert vproxy.api.resolve_credentials("vmhost1")["cert"] == str(issued / "carol.pem")
    assert vproxy.api.resolve_credentials("vmhost1", identity="alice")["cert"] == str(issued / "alice.pem")
    monkeypatch.setenv("VPROXY_HOST", "vmhost1")
    assert vproxy.api.resolve_credentials()["address"] == "vmhost1.example:7443"
    # no CRL set anywhere: a client checks none (PKI_DIR/crl.pem is the agent's default)
    config = write_config(tmp_path, '[defaults]\nidentity = "alice"\npki_dir = "%s"\n' % pkidir)
    monkeypatch.setenv("VPROXY_CLIENT_CONFIG", config)
    assert vproxy.api.resolve_credentials("vmhost1")["crl"] is None
    # a local-mode host: no certificate needed
    config = write_config(tmp_path, '[hosts.here]\naddress = "unix:/run/vproxy/agent.sock"\n')
    monkeypatch.setenv("VPROXY_CLIENT_CONFIG", config)
    monkeypatch.delenv("VPROXY_IDENTITY")
    assert vproxy.api.resolve_credentials("here") == {
        "address": "unix:/run/vproxy/agent.sock", "cert": None, "key": None, "ca": None, "crl": None}
    # a file the entry names must exist
    config = write_config(tmp_path, '[defaults]\nidentity = "alice"\npki_dir = "%s"\ncrl = "gone.pem"\n'
                          % pkidir)
    monkeypatch.setenv("VPROXY_CLIENT_CONFIG", config)
    with pytest.raises(UserError, match="CRL .*gone.pem: no such file"):
        vproxy.api.resolve_credentials("vmhost1")


def test_the_api_connects_in_local_mode(tmp_path):
    """A unix:/PATH address (or a host entry that has one) needs no certificate, for the
    API as for the CLI."""
    import vproxy.api

    sock = tmp_path / "a.sock"
    env = dict(os.environ, PYTHONPATH=ROOT)
    agent = subprocess.Popen([sys.executable, "-m", "vproxy", "serve", "--local-socket", str(sock)],
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = agent.stderr.readline()
        assert "listening on unix:%s" % sock in line, line
        with vproxy.api.connect("unix:%s" % sock) as client:
            assert client.address == "unix:%s" % sock and client.list_vms() == []
    finally:
        agent.terminate()
        agent.wait(15)
