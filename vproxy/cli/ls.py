"""`vproxy ls`: the VMs of one or more agents, as a listing or JSON."""

import json
import sys

import click

from vproxy.errors import UserError
from .common import EXIT_UNREACHABLE, client_config, resolve_client, run_async, tls_options


@click.command(name="ls")
@click.argument("hosts", nargs=-1, metavar="[HOST[:PORT]...]")
@tls_options(server=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list, one object per host).")
def ls_command(hosts, as_json: bool, **tls_args) -> None:
    """List the VMs of one or more agents that you may open, with their state, their
    consoles, guest channels and VNC display, and who is attached to each. With no
    HOST, every host of the client configuration file.

    \b
    Example:
      vproxy ls vmhost1 vmhost2 --identity alice
    """
    if not hosts:
        config = client_config(tls_args)
        hosts = list(config.hosts)
        if not hosts:
            raise UserError("no HOST given, and no [hosts.NAME] in %s"
                            % (config.path or "the client configuration file"),
                            hint="vproxy ls HOST..., or name your hosts in "
                                 "~/.config/vproxy/client.toml (see vproxy.conf(5))")
    sys.exit(run_async(run_ls([resolve_client(h, tls_args) for h in hosts], as_json)))


async def run_ls(targets, as_json: bool) -> int:
    """targets: vproxy.client.config.Target objects (cli.common.resolve_client)."""
    import asyncio  # lazy: keeps --help fast

    async def one(target):
        host = target.name
        try:
            client = await target.connect()
        except UserError as e:
            return {"host": host, "error": e.message, "vms": []}
        try:
            return {"host": host, "error": "", "vms": await client.list_vms()}
        finally:
            await client.close()

    results = await asyncio.gather(*(one(t) for t in targets))
    if as_json:
        click.echo(json.dumps(list(results), indent=2))
    else:
        for result in results:
            click.echo(format_listing(result))
    return 0 if all(not r["error"] for r in results) else EXIT_UNREACHABLE


def _held(item: dict) -> str:
    """How a console or guest channel is held: "taken over", "adopted pty /dev/pts/3",
    "adopted socket PATH", or "" (not attached, nobody holds it)."""
    held = item.get("held", "")
    return "%s %s" % (held, item["held_where"]) if held and item.get("held_where") else held


def format_listing(result: dict) -> str:
    """One host's answer (see run_ls) as the lines `vproxy ls` prints."""
    lines = []
    if result["error"]:
        return "%s: error: %s" % (result["host"], result["error"])
    if not result["vms"]:
        return "%s: no VMs you may open" % result["host"]
    for vm in result["vms"]:
        aliases = vm.get("aliases") or []
        shared = "  (shared QMP, polled)" if vm.get("qmp_mode") == "shared" else ""
        lines.append("%s/%s%s  %s%s%s" % (result["host"], vm["vm"],
                                           " (alias %s)" % ", ".join(aliases) if aliases else "",
                                           vm["state"], shared,
                                           "  (%s)" % vm["error"] if vm.get("error") else ""))
        for con in vm.get("consoles", []):
            who = ", ".join(con["viewers"]) or "nobody attached"
            writer = "; writer %s" % con["writer"] if con.get("writer") else ""
            held = _held(con)
            lines.append("  console:%-22s %s%s, %d bytes buffered; %s%s"
                         % (con["id"], con["status"], " (%s)" % held if held else "",
                            con["buffered"], who, writer))
        for ch in vm.get("channels", []):
            held = _held(ch)
            lines.append("  channel:%-22s guest %s; %s%s" % (ch["name"], ch.get("guest", "?"),
                                                          ch.get("holder") or "free",
                                                          " (%s)" % held if held else ""))
        vnc = vm.get("vnc") or {}
        if vnc.get("available"):
            password = "; its VNC password is not needed" if vnc.get("auth") not in (None, "", "none") else ""
            lines.append("  vnc%-27s %d viewer(s)%s" % ("", vnc.get("viewers", 0), password))
        else:
            lines.append("  vnc%-27s none (%s)" % ("", vnc.get("reason", "no display")))
    return "\n".join(lines)
