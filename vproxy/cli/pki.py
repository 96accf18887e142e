"""`vproxy pki`: the command-line face of vproxy.security.pki. Only wiring and messages live here.

The group is importable on its own (`from vproxy.cli.pki import pki`) and prints
a UserError as "vproxy: error: ..." plus "hint: ..." with exit status 2 by itself.
"""

from __future__ import annotations

import datetime as _dt
import os
import shlex
from pathlib import Path
from typing import Any, Optional, Tuple

import click

from vproxy.security import pki as _pki
from vproxy.errors import UserError


def report_user_error(error: UserError) -> None:
    """Print a UserError the way every vproxy command does: one line, then a hint."""
    click.echo("vproxy: error: %s" % error.message, err=True)
    if error.hint:
        click.echo("hint: %s" % error.hint, err=True)


class _PkiGroup(click.Group):
    """A group whose subcommands' UserErrors become one-line messages and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as e:
            report_user_error(e)
            raise click.exceptions.Exit(e.exit_code) from None


_DIR_HELP = ("PKI directory (default: $VPROXY_PKI_DIR, else ~/.config/vproxy/pki).")


def _dir_option(f: Any) -> Any:
    return click.option("--dir", "pki_dir", metavar="PKI_DIR", default=None,
                        type=click.Path(file_okay=False), help=_DIR_HELP)(f)


def _resolve(pki_dir: Optional[str]) -> Tuple[Path, str]:
    """The directory to use, and " --dir X" to repeat in next-step hints (if given)."""
    if pki_dir is None:
        return _pki.default_pki_dir(), ""
    return Path(pki_dir).expanduser(), " --dir %s" % _quote(pki_dir)


def _quote(text: str) -> str:
    return shlex.quote(str(text))


def _date(value: Optional[_dt.datetime]) -> str:
    if value is None:
        return "(no end)"
    return value.astimezone(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _until(not_after: _dt.datetime) -> str:
    now = _dt.datetime.now(_dt.timezone.utc)
    if not_after < now:
        return "expired %s" % _date(not_after)
    return "valid until %s" % _date(not_after)


@click.group(name="pki", cls=_PkiGroup)
def pki() -> None:
    """Run a small certificate authority for vproxy.

    Every agent and every client needs a certificate from the same CA: the agent
    proves it is the host you meant, the client's certificate name (CN) is who it
    is for the agent's access rules. Three commands set everything up:

    \b
      vproxy pki init
      vproxy pki issue server myhost --dns myhost.example.com --ip 192.0.2.10
      vproxy pki issue client alice

    \b
    Then give the agent ca.pem, crl.pem and its issued/myhost.{pem,key};
    give alice ca.pem and issued/alice.{pem,key}.

    Files live in PKI_DIR (--dir, $VPROXY_PKI_DIR, default ~/.config/vproxy/pki):
    ca.pem, ca.key (mode 0600, never copy it anywhere), crl.pem, index.json and
    issued/NAME.pem + issued/NAME.key. Nothing is overwritten without --force.
    """


@pki.command("init")
@_dir_option
@click.option("--cn", "common_name", default="vproxy CA", show_default=True,
              help="Common name of the CA certificate.")
@click.option("--days", type=int, default=_pki.DEFAULT_CA_DAYS, show_default=True,
              help="Validity of the CA certificate, in days.")
@click.option("--crl-days", type=int, default=_pki.DEFAULT_CRL_DAYS, show_default=True,
              help="Validity of the CRL, in days (renew it with: vproxy pki crl).")
@click.option("--force", is_flag=True,
              help="Replace an existing CA (everything it issued stops working).")
def init_command(pki_dir: Optional[str], common_name: str, days: int, crl_days: int,
                 force: bool) -> None:
    """Create a new CA: ca.pem, ca.key and an empty crl.pem.

    \b
    Examples:
      vproxy pki init
      vproxy pki init --dir ./pki --cn "lab CA"
    """
    directory, again = _resolve(pki_dir)
    ca = _pki.init_ca(directory, common_name=common_name, days=days, force=force,
                      crl_days=crl_days)
    click.echo("wrote CA certificate  %s  (CN=%s, valid %d days)" % (ca, common_name, days))
    click.echo("wrote CA private key  %s  (mode 0600; keep it here, never copy it)"
               % (directory / _pki.CA_KEY))
    click.echo("wrote CRL             %s  (empty, valid %d days)"
               % (directory / _pki.CRL, crl_days))
    click.echo("next: vproxy pki issue server HOST --dns HOST%s" % again)


@pki.command("issue")
@click.argument("kind", type=click.Choice(_pki.KINDS), metavar="{server|client}")
@click.argument("name")
@click.option("--dns", "dns_names", multiple=True, metavar="D",
              help="DNS name to put in the certificate (repeatable).")
@click.option("--ip", "ip_addresses", multiple=True, metavar="A",
              help="IP address to put in the certificate (repeatable).")
@click.option("--uri", "uris", multiple=True, metavar="U",
              help="URI to put in the certificate (repeatable).")
@click.option("--days", type=int, default=_pki.DEFAULT_CERT_DAYS, show_default=True,
              help="Validity in days.")
@_dir_option
@click.option("--out", "out_dir", metavar="DIR", type=click.Path(file_okay=False),
              default=None, help="Write NAME.pem and NAME.key here instead of "
                                 "PKI_DIR/issued.")
@click.option("--force", is_flag=True, help="Replace existing NAME.pem / NAME.key.")
def issue_command(kind: str, name: str, dns_names: Tuple[str, ...],
                  ip_addresses: Tuple[str, ...], uris: Tuple[str, ...], days: int,
                  pki_dir: Optional[str], out_dir: Optional[str], force: bool) -> None:
    """Issue a server or client certificate signed by the CA.

    A server certificate names the host clients connect to: give every name
    and address they will use with --dns and --ip (without either, NAME is used).
    A client certificate's identity is its NAME (the CN), which the agent's
    access rules match.

    \b
    Examples:
      vproxy pki issue server myhost --dns myhost --dns myhost.example.com --ip 127.0.0.1
      vproxy pki issue client alice
      vproxy pki issue client ci-job --days 30 --out ./ci-creds
    """
    directory, again = _resolve(pki_dir)
    cert, key = _pki.issue(directory, name, kind, dns_names=dns_names,
                           ip_addresses=ip_addresses, uris=uris, days=days,
                           out_dir=out_dir, force=force)
    entry = _pki.list_issued(directory)[-1]
    sans = ", ".join(["DNS:%s" % d for d in dns_names] + ["IP:%s" % a for a in ip_addresses]
                     + ["URI:%s" % u for u in uris])
    if kind == "server" and not sans:
        sans = ("IP:%s" if _pki.looks_like_ip(name) else "DNS:%s") % name
    detail = "CN=%s%s; %s" % (name, "; " + sans if sans else "", _until(entry.not_after))
    click.echo("wrote %s certificate  %s  (%s)" % (kind, cert, detail))
    click.echo("wrote %s key          %s  (mode 0600)" % (kind, key))
    ca, crl = directory / _pki.CA_CERT, directory / _pki.CRL
    if kind == "server":
        click.echo("next: copy %s, %s, %s and %s to %s for `vproxy serve`;"
                   % (ca, crl, cert, key, name))
        click.echo("      then: vproxy pki issue client NAME%s" % again)
    else:
        click.echo("next: give %s the files %s, %s and %s (to connect to any agent of "
                   "this CA)" % (name, cert, key, ca))


@pki.command("revoke")
@click.argument("target", metavar="NAME|CERT")
@_dir_option
def revoke_command(target: str, pki_dir: Optional[str]) -> None:
    """Revoke a certificate (by file, or every certificate issued under NAME).

    The CA re-signs crl.pem; agents refuse a revoked client once they use the
    new crl.pem.

    \b
    Examples:
      vproxy pki revoke alice
      vproxy pki revoke ./old/alice.pem
    """
    directory, _ = _resolve(pki_dir)
    before = {(e.serial, e.name) for e in _pki.list_issued(directory) if e.revoked}
    crl = _pki.revoke(directory, target)
    for entry in _pki.list_issued(directory):
        if entry.revoked and (entry.serial, entry.name) not in before:
            click.echo("revoked %s %s (serial %s)" % (entry.kind, entry.name, entry.serial_hex))
    click.echo("wrote CRL  %s  (valid until %s)" % (crl, _date(_pki.crl_next_update(directory))))
    click.echo("next: copy %s to every agent host that checks it" % crl)


@pki.command("show")
@click.argument("cert", metavar="CERT|NAME")
@_dir_option
def show_command(cert: str, pki_dir: Optional[str]) -> None:
    """Show a certificate: names, kind, issuer, validity, fingerprint, revocation.

    CERT is a certificate file, or the NAME of a certificate the CA issued.

    \b
    Examples:
      vproxy pki show alice
      vproxy pki show ~/.config/vproxy/pki/ca.pem
    """
    directory, _ = _resolve(pki_dir)
    has_ca = (directory / _pki.CA_CERT).exists()
    path = Path(cert).expanduser()
    if not path.exists() and has_ca and os.sep not in cert:
        found = _pki.find_issued(directory, cert)
        if found is None:
            raise UserError("no file %s and no certificate named %r in %s"
                            % (cert, cert, directory), hint="see: vproxy pki list")
        path = found
    click.echo(_pki.show(path, pki_dir=directory if has_ca else None), nl=False)


@pki.command("list")
@_dir_option
def list_command(pki_dir: Optional[str]) -> None:
    """List the certificates the CA issued, and when the CRL runs out."""
    directory, again = _resolve(pki_dir)
    if not (directory / _pki.CA_CERT).exists():
        raise UserError("no CA in %s" % directory,
                        hint="create one with: vproxy pki init%s" % again)
    entries = _pki.list_issued(directory)
    now = _dt.datetime.now(_dt.timezone.utc)
    rows = [("NAME", "KIND", "STATUS", "EXPIRES", "SERIAL")]
    for e in entries:
        status = "revoked" if e.revoked else ("expired" if e.not_after < now else "valid")
        rows.append((e.name, e.kind, status, _date(e.not_after), e.serial_hex[:23]))
    if len(rows) == 1:
        click.echo("no certificates issued yet; next: vproxy pki issue server HOST "
                   "--dns HOST%s" % again)
    else:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for r in rows:
            click.echo("  ".join(r[i].ljust(widths[i]) for i in range(len(widths)))
                       + "  " + r[-1])
    next_update = _pki.crl_next_update(directory)
    click.echo("CRL %s: valid until %s" % (directory / _pki.CRL, _date(next_update)))


@pki.command("crl")
@_dir_option
@click.option("--days", type=int, default=None,
              help="Validity of the new CRL in days (default: as before).")
def crl_command(pki_dir: Optional[str], days: Optional[int]) -> None:
    """Re-sign crl.pem with a fresh validity (before the old one runs out).

    \b
    Example:
      vproxy pki crl --days 365
    """
    directory, _ = _resolve(pki_dir)
    crl = _pki.update_crl(directory, days=days)
    click.echo("wrote CRL  %s  (valid until %s)" % (crl, _date(_pki.crl_next_update(directory))))
    click.echo("next: copy %s to every agent host that checks it" % crl)
