"""Options and helpers shared by the commands."""

from pathlib import Path
from typing import Callable, Dict, Optional

import click

from vproxy.errors import UserError

EXIT_USAGE = 2  # a user error: bad option, missing file, refused by the agent
EXIT_UNREACHABLE = 3  # the agent could not be reached, or the session died
EXIT_INTERRUPTED = 130


def tls_options(server: bool) -> Callable:
    """--identity / --cert / --key / --ca / --crl / --pki-dir, with VPROXY_* defaults."""
    role = "this agent's server" if server else "your client"

    def decorate(f: Callable) -> Callable:
        options = [
            click.option("--identity", envvar="VPROXY_IDENTITY", metavar="NAME",
                         help="Use the certificate NAME issued by `vproxy pki issue`: "
                              "PKI_DIR/issued/NAME.pem and .key, and the CA of PKI_DIR "
                              "[env: VPROXY_IDENTITY]."),
            click.option("--cert", envvar="VPROXY_CERT", type=click.Path(dir_okay=False), metavar="FILE",
                         help="PEM certificate of %s [env: VPROXY_CERT]." % role),
            click.option("--key", envvar="VPROXY_KEY", type=click.Path(dir_okay=False), metavar="FILE",
                         help="Its PEM private key [env: VPROXY_KEY]."),
            click.option("--ca", envvar="VPROXY_CA", type=click.Path(dir_okay=False), metavar="FILE",
                         help="PEM CA certificate that signs the peers' certificates "
                              "(default: PKI_DIR/ca.pem) [env: VPROXY_CA]."),
            click.option("--crl", envvar="VPROXY_CRL", type=click.Path(dir_okay=False), metavar="FILE",
                         help="PEM certificate revocation list to check peers against "
                              "[env: VPROXY_CRL]."),
            click.option("--pki-dir", envvar="VPROXY_PKI_DIR", type=click.Path(file_okay=False),
                         metavar="PKI_DIR",
                         help="Where `vproxy pki` keeps the CA (default: ~/.config/vproxy/pki) "
                              "[env: VPROXY_PKI_DIR]."),
        ]
        if not server:
            options.append(click.option(
                "--client-config", envvar="VPROXY_CLIENT_CONFIG", type=click.Path(dir_okay=False),
                metavar="FILE",
                help="Client configuration file: named hosts and defaults (default: "
                     "~/.config/vproxy/client.toml if it exists) [env: VPROXY_CLIENT_CONFIG]."))
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def resolve_tls(args: Dict[str, Optional[str]], server: bool,
                host: Optional[str] = None) -> Dict[str, Optional[str]]:
    """Turn the TLS options into cert/key/ca/crl paths, or a UserError saying what's missing.

    For a client, the client configuration file (--client-config) comes first: its
    [defaults], then the [hosts.HOST] table if `host` names one, then the environment,
    then the flags. Use resolve_client() to also turn HOST into its address."""
    if not server:
        return _client_settings(args, host)[1]
    return _paths(args, server)


def resolve_client(host: str, args: Dict[str, Optional[str]]):
    """HOST (a name from the client config, HOST[:PORT], or unix:/PATH) and the TLS
    options -> a vproxy.client.config.Target; `await target.connect()` gives a Client."""
    from vproxy.client.config import Target

    address, paths, server_name = _client_settings(args, host)
    return Target(host, address, paths, server_name)


def client_config(args: Dict[str, Optional[str]]):
    from vproxy.client.config import load_client_config

    return load_client_config(args.get("client_config"))


def _client_settings(args: Dict[str, Optional[str]], host: Optional[str]):
    from vproxy.client.config import TLS_KEYS, host_address, host_settings, is_local_address, layer

    config = client_config(args)
    address = host_address(config, host) if host else ""
    if address and is_local_address(address):
        return address, {}, None  # local mode: the agent's unix socket, no certificates
    settings = host_settings(config, host or "")
    env, flags = _split_by_source(args, TLS_KEYS)
    settings = layer(layer(settings, env), flags)
    return address, _paths(settings, server=False), settings.get("server_name")


def _split_by_source(args: Dict[str, Optional[str]], keys) -> tuple:
    """(from the environment, from the command line): click merged them, its context
    still knows which was which."""
    from click.core import ParameterSource

    ctx = click.get_current_context(silent=True)
    env, flags = {}, {}
    for key in keys:
        value = args.get(key)
        if not value:
            continue
        source = ctx.get_parameter_source(key) if ctx is not None else None
        (env if source == ParameterSource.ENVIRONMENT else flags)[key] = value
    return env, flags


def _paths(args: Dict[str, Optional[str]], server: bool) -> Dict[str, Optional[str]]:
    from vproxy.security.pki import default_pki_dir

    pki_dir = Path(args.get("pki_dir") or default_pki_dir()).expanduser()
    cert, key, ca, crl = args.get("cert"), args.get("key"), args.get("ca"), args.get("crl")
    identity = args.get("identity")
    if identity:
        cert = cert or str(pki_dir / "issued" / (identity + ".pem"))
        key = key or str(pki_dir / "issued" / (identity + ".key"))
        if not Path(cert).exists():
            kind = "server" if server else "client"
            raise UserError("no certificate for identity %r in %s" % (identity, pki_dir / "issued"),
                            hint="issue one with: vproxy pki issue %s %s" % (kind, identity))
    if not cert:
        example = ("vproxy serve --identity HOST" if server else
                   "--identity NAME, or identity = \"NAME\" in ~/.config/vproxy/client.toml")
        raise UserError("no certificate given: use --identity NAME, or --cert and --key",
                        hint="make one with vproxy pki issue, then e.g. %s" % example)
    if not key:
        raise UserError("--cert given without --key")
    if not ca:
        ca = str(pki_dir / "ca.pem")
        if not Path(ca).exists():
            raise UserError("no CA certificate: %s does not exist and --ca was not given" % ca,
                            hint="give --ca FILE, or create a CA with: vproxy pki init")
    if crl is None and server and (pki_dir / "crl.pem").exists() and not args.get("ca"):
        crl = str(pki_dir / "crl.pem")  # the PKI's own CRL comes with its CA
    return {"cert": cert, "key": key, "ca": ca, "crl": crl}


def run_async(coro) -> int:
    """Run a coroutine to completion; Ctrl-C ends it quietly."""
    import asyncio  # lazy: --help never runs a coroutine, and asyncio brings ssl

    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        click.echo("vproxy: interrupted", err=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
