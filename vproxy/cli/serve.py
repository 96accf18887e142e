"""The long-running parts of `serve` and `bench`: signals, readiness, output."""

import asyncio
import json
import logging
import signal
from typing import Any, Callable, Dict, Optional, Sequence

import click

from .common import EXIT_UNREACHABLE, EXIT_USAGE


async def run_agent(agent, audit_path: Optional[str] = None, log_format: str = "text",
                    reloader: Optional[Callable[[], Any]] = None) -> int:
    """Run the agent until SIGTERM/SIGINT (then drain; a second signal cuts the drain
    short). SIGHUP reloads: reloader() returns the new vproxy.reload.Settings. With
    NOTIFY_SOCKET set, tells systemd (READY, RELOADING, STOPPING, STATUS)."""
    from vproxy.errors import UserError
    from vproxy.agent.logs import formatter_for, say, use_log_format
    from vproxy.agent.sdnotify import Notifier

    use_log_format(log_format)
    if audit_path:
        handler = logging.FileHandler(audit_path)
        handler.setFormatter(formatter_for(log_format, "%(asctime)s %(message)s"))
        audit = logging.getLogger("vproxy.audit")
        audit.addHandler(handler)
        audit.propagate = False
    logging.getLogger("vproxy.audit").setLevel(logging.INFO)
    notifier = Notifier()
    hup = asyncio.Event()
    loop = asyncio.get_event_loop()
    loop.add_signal_handler(signal.SIGHUP, hup.set)  # before start: SIGHUP's default kills
    await agent.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for address in agent.addresses:
        say("listening on %s" % address, log_format, address=address)
    if agent.metrics_server is not None:
        for address in agent.metrics_server.addresses:
            say("metrics and status on %s" % address, log_format, metrics=address)
    notifier.ready("serving on %s" % ", ".join(agent.addresses))

    async def reload_on_hup() -> None:
        while True:
            await hup.wait()
            hup.clear()
            notifier.reloading("reloading")
            try:
                outcome = await agent.reload(reloader or _no_reloader)
            except UserError as e:
                say("reload failed, keeping the previous settings: %s" % e.message, log_format,
                    level="error")
                notifier.ready("reload failed: %s" % e.message)
            except Exception as e:  # a bug: say so, keep serving
                logging.getLogger("vproxy.agent").exception("reload failed")
                say("reload failed: %s" % e, log_format, level="error")
                notifier.ready("reload failed: %s" % e)
            else:
                say(outcome.summary(), log_format, sessions_ended=outcome.sessions_ended,
                    streams_reset=outcome.streams_reset)
                notifier.ready("serving on %s; reloaded" % ", ".join(agent.addresses))

    reloading = asyncio.ensure_future(reload_on_hup())
    try:
        await stop.wait()
    finally:
        reloading.cancel()
    loop.add_signal_handler(signal.SIGHUP, lambda: say("SIGHUP ignored: the agent is shutting down",
                                                       log_format, level="warning"))
    draining = "draining %d session(s) for up to %g s" % (len(agent.sessions),
                                                           agent.config.drain_timeout)
    say("shutting down: %s" % draining, log_format)
    notifier.stopping("shutting down: %s" % draining)

    def cut_short() -> None:
        say("second signal: ending the drain now", log_format)
        for session in list(agent.sessions):
            session.close("the agent is shutting down")

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, cut_short)
    await agent.shutdown()
    notifier.close()
    return 0


def _no_reloader():
    from vproxy.errors import UserError

    raise UserError("this agent was not started with a way to reload its settings")


# Settings a reload cannot change: a changed value is reported, and waits for a restart.
RESTART_KEYS = ("listen", "local_socket", "vm_dir", "console_ring", "console_log_dir",
                "audit_log", "handshake_timeout", "metrics", "log_format", "resume_prelaunch",
                "max_sessions", "max_sessions_per_identity", "max_sessions_per_address",
                "max_streams", "builtin_channels")


def make_reloader(config_path: Optional[str], cli_tls: Dict[str, Any], allow: Sequence[str],
                  vm_specs: Sequence[str], drain_timeout: Optional[float], tls_enabled: bool,
                  started: Dict[str, Any], overridden: Sequence[str] = ()) -> Callable[[], Any]:
    """What `serve` gives run_agent for SIGHUP: read the config file again and lay this
    command line's options over it, as at start; returns vproxy.reload.Settings.
    started: the file's settings at start, overridden: the keys the command line set
    (to report the file's changes that need a restart)."""

    def load():
        from vproxy.agent.acl import Rule
        from vproxy.agent.config import load_agent_config
        from vproxy.agent.reload import Settings
        from .common import resolve_tls

        file_config = load_agent_config(config_path)
        settings = file_config.settings
        paths: Dict[str, Any] = {"cert": "", "key": "", "ca": "", "crl": None}
        if tls_enabled:
            tls_args = dict(cli_tls)
            for key in ("identity", "cert", "key", "ca", "crl", "pki_dir"):
                if not tls_args.get(key) and settings.get(key):
                    tls_args[key] = settings[key]
            paths = resolve_tls(tls_args, server=True)
        acl = file_config.acl
        if allow:
            acl.rules.append(Rule(tuple(allow), ("*",), ("*",), ("force", "hotplug")))
        vms = list(file_config.vms)
        for spec in vm_specs:  # checked at start
            name, _, qmp = spec.partition("=")
            vms = [v for v in vms if v[0] != name] + [(name, qmp)]
        changed = [k for k in RESTART_KEYS
                   if k not in overridden and settings.get(k) != started.get(k)]
        return Settings(acl=acl, vms=vms, needs_restart=changed,
                        drain_timeout=(drain_timeout if drain_timeout is not None
                                       else settings.get("drain_timeout", 10.0)),
                        **paths)

    return load


async def run_bench(target, seconds: float, streams: int, as_json: bool) -> int:
    """target: a vproxy.clientconfig.Target (cli.common.resolve_client)."""
    from vproxy.client import bench as benchmark
    from vproxy.errors import ChannelRefused, SessionClosed

    host = target.name
    client = await target.connect()
    try:
        result = await benchmark.run(client, seconds, streams)
    except SessionClosed as e:
        click.echo("vproxy: error: the session to %s ended: %s" % (host, e.reason), err=True)
        return EXIT_UNREACHABLE
    except ChannelRefused as e:  # builtin_channels = acl or off on that agent
        click.echo("vproxy: error: %s refused: %s" % (host, e.message), err=True)
        return EXIT_USAGE
    finally:
        await client.close()
    if as_json:
        click.echo(json.dumps(result.as_dict()))
    else:
        r = result
        click.echo("vproxy bench %s" % host)
        click.echo("  upload      %9.1f MB/s" % r.upload_mbps)
        click.echo("  download    %9.1f MB/s" % r.download_mbps)
        click.echo("  round trip  %9.1f us median, %.1f us p99 (%d samples, 1 byte)"
                   % (r.rtt_p50_us, r.rtt_p99_us, r.rtt_samples))
        click.echo("  ping        %9.1f us" % r.ping_us)
        click.echo("  streams     %9d of %d echoed intact in %.3f s"
                   % (r.streams_ok, r.streams, r.streams_seconds))
    return 0 if result.streams_ok == result.streams else 1


async def run_ls(targets, as_json: bool) -> int:
    """targets: vproxy.clientconfig.Target objects (cli.common.resolve_client)."""
    from vproxy.errors import UserError

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


def format_listing(result: dict) -> str:
    lines = []
    if result["error"]:
        return "%s: error: %s" % (result["host"], result["error"])
    if not result["vms"]:
        return "%s: no VMs you may open" % result["host"]
    for vm in result["vms"]:
        lines.append("%s/%s  %s%s" % (result["host"], vm["vm"], vm["state"],
                                       "  (%s)" % vm["error"] if vm.get("error") else ""))
        for con in vm.get("consoles", []):
            who = ", ".join(con["viewers"]) or "nobody attached"
            writer = "; writer %s" % con["writer"] if con.get("writer") else ""
            lines.append("  console:%-22s %s, %d bytes buffered; %s%s"
                         % (con["id"], con["status"], con["buffered"], who, writer))
        for ch in vm.get("channels", []):
            lines.append("  channel:%-22s guest %s; %s" % (ch["name"], ch.get("guest", "?"),
                                                        ch.get("holder") or "free"))
        vnc = vm.get("vnc") or {}
        if vnc.get("available"):
            lines.append("  vnc%-27s %d viewer(s)" % ("", vnc.get("viewers", 0)))
        else:
            lines.append("  vnc%-27s none (%s)" % ("", vnc.get("reason", "no display")))
    return "\n".join(lines)
