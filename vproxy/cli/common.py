"""Options and helpers shared by the commands."""

import os
from pathlib import Path
from typing import Callable, Dict, Optional

import click

from ..errors import UserError

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
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def resolve_tls(args: Dict[str, Optional[str]], server: bool) -> Dict[str, Optional[str]]:
    """Turn the TLS options into cert/key/ca/crl paths, or a UserError saying what's missing."""
    from ..pki import default_pki_dir

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
        example = "vproxy serve --identity HOST" if server else "--identity NAME"
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
    import asyncio

    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        click.echo("vproxy: interrupted", err=True)
        raise SystemExit(EXIT_INTERRUPTED)
