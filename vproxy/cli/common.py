"""Options and helpers shared by the commands."""

from dataclasses import replace
from typing import Callable, Dict, Optional, Tuple

import click
from click.core import ParameterSource

from vproxy.client.config import TLS_KEYS, ClientConfig, Target, load_client_config
from vproxy.client.credentials import resolve_target
from vproxy.security.certfiles import TlsFiles, Wording, certificate_files

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


#: What the command line says is missing (the flags it has); the agent's hint differs.
CLIENT_WORDING = Wording(
    no_certificate="no certificate given: use --identity NAME, or --cert and --key",
    no_certificate_hint="make one with vproxy pki issue, then e.g. --identity NAME, or "
                        "identity = \"NAME\" in ~/.config/vproxy/client.toml",
    no_key="--cert given without --key",
    no_ca="no CA certificate: {path} does not exist and --ca was not given",
    no_ca_hint="give --ca FILE, or create a CA with: vproxy pki init")
SERVER_WORDING = replace(
    CLIENT_WORDING,
    no_certificate_hint="make one with vproxy pki issue, then e.g. vproxy serve --identity HOST")


def resolve_tls(args: Dict[str, Optional[str]], server: bool,
                host: Optional[str] = None) -> TlsFiles:
    """Turn the TLS options into cert/key/ca/crl paths, or a UserError saying what's missing.

    For a client, the client configuration file (--client-config) comes first: its
    [defaults], then the [hosts.HOST] table if `host` names one, then the environment,
    then the flags (vproxy.client.credentials). Use resolve_client() to also turn HOST
    into its address."""
    if not server:
        return resolve_client(host or "", args).tls
    return certificate_files(args, server=True, wording=SERVER_WORDING)


def resolve_client(host: str, args: Dict[str, Optional[str]]) -> Target:
    """HOST (a name from the client config, HOST[:PORT], or unix:/PATH) and the TLS
    options -> a vproxy.client.config.Target; `await target.connect()` gives an AgentClient."""
    environment, flags = _split_by_source(args, TLS_KEYS)
    return resolve_target(host, client_config(args), environment=environment, arguments=flags,
                          wording=CLIENT_WORDING)


def client_config(args: Dict[str, Optional[str]]) -> ClientConfig:
    return load_client_config(args.get("client_config"))


def _split_by_source(args: Dict[str, Optional[str]],
                     keys: Tuple[str, ...]) -> Tuple[Dict[str, str], Dict[str, str]]:
    """(from the environment, from the command line): click merged them, its context
    still knows which was which."""
    ctx = click.get_current_context(silent=True)
    env: Dict[str, str] = {}
    flags: Dict[str, str] = {}
    for key in keys:
        value = args.get(key)
        if not value:
            continue
        source = ctx.get_parameter_source(key) if ctx is not None else None
        (env if source == ParameterSource.ENVIRONMENT else flags)[key] = value
    return env, flags


def run_async(coro) -> int:
    """Run a coroutine to completion; Ctrl-C ends it quietly."""
    import asyncio  # lazy: --help never runs a coroutine, and asyncio brings ssl

    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        click.echo("vproxy: interrupted", err=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
