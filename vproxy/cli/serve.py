"""`vproxy serve`: run the agent.

The command lays its options over the agent's config file (vproxy.agent.config) and
hands an AgentConfig to vproxy.agent.server.Agent; run_agent() adds what only a
long-running process needs: signals (SIGHUP reloads, SIGTERM drains, a second signal
cuts the drain short), readiness for systemd, and the audit log. make_reloader() reads
the file again on SIGHUP with the same command line laid over it.
"""

import logging
from typing import Any, Callable, Collection, Dict, Optional, Sequence, Tuple

import click

from vproxy.errors import UserError
from vproxy.security.certfiles import TlsFiles

from .common import resolve_tls, run_async, tls_options


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), metavar="FILE",
              envvar="VPROXY_CONFIG",
              help="Agent configuration file (TOML, see vproxy.conf(5)); options given here "
                   "override it [env: VPROXY_CONFIG].")
@click.option("--listen", "listen", default=None, metavar="ADDR",
              help="Address and port to listen on (HOST:PORT; [::] or 0.0.0.0 for all). "
                   "[default: 127.0.0.1:7443]")
@tls_options(server=True)
@click.option("--vm", "vms", multiple=True, metavar="NAME=QMP",
              help="Serve the VM NAME whose QEMU listens for QMP on the unix socket QMP "
                   "(repeatable).")
@click.option("--vm-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Serve every VM whose QMP socket is in DIR (NAME.qmp is VM NAME, or VM N "
                   "with the alias NAME when its QEMU has -name N); other files are ignored, "
                   "sockets that appear later are picked up.")
@click.option("--allow", "allow", multiple=True, metavar="IDENTITY",
              help="Give IDENTITY (a certificate CN or SAN glob) every right on every VM "
                   "(repeatable); finer rules go in the config file.")
@click.option("--console-ring", type=click.IntRange(4096), default=None, metavar="BYTES",
              help="Console history kept per console, at most (memory grows with the output "
                   "up to this). [default: 1048576]")
@click.option("--console-log-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Also append each console's output to DIR/VM.CONSOLE.log.")
@click.option("--handshake-timeout", type=float, default=None, metavar="SECONDS",
              help="Drop a connection whose TLS handshake takes longer. [default: 5]")
@click.option("--drain-timeout", type=click.FloatRange(0), default=None, metavar="SECONDS",
              help="On SIGTERM, let open streams finish for this long. [default: 10]")
@click.option("--metrics", "metrics", default=None, metavar="ADDR",
              help="Serve GET /metrics (Prometheus) and /status (JSON) on ADDR: "
                   "127.0.0.1:PORT, PORT, or unix:PATH (loopback or unix only).")
@click.option("--resume-prelaunch/--no-resume-prelaunch", default=None,
              help="Resume (QMP cont) a VM whose QEMU was started with -S and never ran, once "
                   "its consoles are taken over, so that boot output is captured from the "
                   "first byte. Not for VMs something else resumes (libvirt). [default: off]")
@click.option("--qmp", "qmp_mode", type=click.Choice(["exclusive", "shared"]), default=None,
              help="How the agent uses the VMs' QMP sockets (--vm, --vm-dir and the config "
                   "file's VMs): \"exclusive\" holds one connection per VM and gets events; "
                   "\"shared\" connects for each command and lets go at once, polling the VM's "
                   "state every 2 s, for sockets something else also uses (Proxmox's "
                   "/var/run/qemu-server/VMID.qmp); a config file's [[vm]] with its own "
                   "qmp_mode keeps it. [default: exclusive]")
@click.option("--adopt", "adopt", default=None, metavar="KINDS",
              help="Which chardevs made by others a console or guest channel adopts, without "
                   "changing them: \"pty,socket\", \"pty\", \"socket\" or \"none\" (a pty is "
                   "opened as virsh console does, for consoles only; a socket server on this host "
                   "is connected to as its client); a config file's [[vm]] with its own adopt "
                   "keeps it. [default: pty,socket]")
@click.option("--max-sessions-per-identity", type=click.IntRange(1), default=None, metavar="N",
              help="Refuse a client identity more than N concurrent sessions (GOAWAY "
                   "OVERLOADED, naming the identity and the limit). [default: no limit]")
@click.option("--max-sessions-per-address", type=click.IntRange(1), default=None, metavar="N",
              help="Refuse a source IP address more than N concurrent TLS sessions (GOAWAY "
                   "OVERLOADED, naming the address and the limit); the local socket is not "
                   "counted. [default: no limit]")
@click.option("--builtin-channels", type=click.Choice(["everyone", "acl", "off"]), default=None,
              help="Who may open the built-in channels sink, source and echo (vproxy bench): "
                   "every client, the identities an ACL rule grants \"bench\", or nobody. "
                   "[default: everyone]")
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="Log lines as text, or as one JSON object per line. [default: text]")
@click.option("--audit-log", type=click.Path(dir_okay=False), metavar="FILE",
              help="Append one audit line per channel open to FILE (default: stderr).")
@click.option("--local-socket", type=click.Path(dir_okay=False), metavar="PATH",
              help="Also listen on the unix socket PATH, without TLS, for local users: the "
                   "ACL names them uid:N and user:NAME. Without a certificate, only there.")
def serve(config_path, listen, vms, vm_dir, allow, console_ring, console_log_dir,
          handshake_timeout, drain_timeout, metrics, resume_prelaunch, qmp_mode, adopt,
          max_sessions_per_identity,
          max_sessions_per_address, builtin_channels, log_format, audit_log, local_socket,
          **tls_args) -> None:
    """Run the agent: accept mTLS sessions and serve the VMs' channels.

    Access is denied unless an ACL rule (config file, or --allow) grants it. The
    built-in channels sink, source and echo (used by `vproxy bench`) are open to any
    client whose certificate the CA signed, unless --builtin-channels says otherwise.
    SIGHUP reloads the certificates, CA, CRL, ACL and VM list; SIGTERM drains.

    \b
    Examples:
      vproxy serve --identity vmhost1 --vm web1=/run/qemu/web1.qmp --allow alice
      vproxy serve --config /etc/vproxy/agent.toml
      vproxy serve --identity vmhost1 --vm-dir /var/run/qemu-server --qmp shared
    """
    # lazy: the agent brings asyncio, ssl and QEMU's modules, which --help does without
    from vproxy.agent.acl import Rule
    from vproxy.agent.config import load_agent_config
    from vproxy.agent.server import Agent, AgentConfig
    from vproxy.net.address import parse_address

    file_config = load_agent_config(config_path)
    settings = file_config.settings
    cli_tls = dict(tls_args)  # for reloads: the command line over the file, as now
    overridden = {k for k, v in (("listen", listen), ("vm_dir", vm_dir), ("console_ring", console_ring),
                                 ("console_log_dir", console_log_dir), ("audit_log", audit_log),
                                 ("handshake_timeout", handshake_timeout), ("metrics", metrics),
                                 ("log_format", log_format), ("local_socket", local_socket),
                                 ("max_sessions_per_identity", max_sessions_per_identity),
                                 ("max_sessions_per_address", max_sessions_per_address),
                                 ("builtin_channels", builtin_channels), ("qmp", qmp_mode)) if v}
    if resume_prelaunch is not None:
        overridden.add("resume_prelaunch")
    if adopt is not None:
        overridden.add("adopt")
        adopt_kinds = parse_adopt(adopt)
    else:
        adopt_kinds = tuple(settings.get("adopt", ("pty", "socket")))
    for key in ("identity", "cert", "key", "ca", "crl", "pki_dir"):
        if not tls_args.get(key) and settings.get(key):
            tls_args[key] = settings[key]
    host, port = parse_address(listen or settings.get("listen", "127.0.0.1:7443"), listening=True)
    local_socket = local_socket or settings.get("local_socket")
    if local_socket and not (listen or settings.get("listen")
                             or any(tls_args.get(k) for k in ("identity", "cert", "key"))):
        paths: TlsFiles = {"cert": "", "key": "", "ca": "", "crl": None}  # local mode only: no TLS
    else:
        paths = resolve_tls(tls_args, server=True)
    vm_list = list(file_config.vms)
    for spec in vms:
        name, sep, qmp = spec.partition("=")
        if not sep or not name or not qmp:
            raise UserError("--vm %r: expected NAME=QMP_SOCKET_PATH" % spec,
                            hint="e.g. --vm web1=/run/qemu/web1.qmp")
        vm_list = [v for v in vm_list if v[0] != name] + [(name, qmp)]
    vm_options = vm_options_after(file_config.vm_options, vms)
    acl = file_config.acl
    if allow:
        acl.rules.append(Rule(tuple(allow), ("*",), ("*",), ("force", "hotplug")))
    config = AgentConfig(
        listen_host=host, listen_port=port,
        drain_timeout=drain_timeout if drain_timeout is not None else settings.get("drain_timeout", 10.0),
        metrics=metrics or settings.get("metrics"),
        handshake_timeout=handshake_timeout or settings.get("handshake_timeout", 5.0),
        vms=vm_list, vm_dir=vm_dir or settings.get("vm_dir"),
        console_ring=console_ring or settings.get("console_ring", 1 << 20),
        console_log_dir=console_log_dir or settings.get("console_log_dir"),
        max_sessions=settings.get("max_sessions", 4096),
        max_sessions_per_identity=(max_sessions_per_identity
                                   or settings.get("max_sessions_per_identity")),
        max_sessions_per_address=(max_sessions_per_address
                                  or settings.get("max_sessions_per_address")),
        builtin_channels=builtin_channels or settings.get("builtin_channels", "everyone"),
        resume_prelaunch=(resume_prelaunch if resume_prelaunch is not None
                          else settings.get("resume_prelaunch", False)),
        qmp=qmp_mode or settings.get("qmp", "exclusive"),
        adopt=adopt_kinds, vm_options=vm_options,
        mux_config=mux_config(settings),
        local_socket=local_socket, **paths)
    reloader = make_reloader(config_path, cli_tls, allow, vms, drain_timeout, bool(paths["cert"]),
                             dict(settings), overridden)
    run_async(run_agent(Agent(config, acl=acl), audit_log or settings.get("audit_log"),
                        log_format=log_format or settings.get("log_format", "text"),
                        reloader=reloader))


def mux_config(settings):
    """The session limits the config file may set (max_streams), or the defaults."""
    if "max_streams" not in settings:
        return None
    from vproxy.mux import Config  # lazy: keeps --help fast

    return Config(max_streams=settings["max_streams"])


async def run_agent(agent, audit_path: Optional[str] = None, log_format: str = "text",
                    reloader: Optional[Callable[[], Any]] = None) -> int:
    """Run the agent until SIGTERM/SIGINT (then drain; a second signal cuts the drain
    short). SIGHUP reloads: reloader() returns the new vproxy.agent.reload.Settings. With
    NOTIFY_SOCKET set, tells systemd (READY, RELOADING, STOPPING, STATUS)."""
    # lazy: asyncio and the agent's modules are for running it, not for --help
    import asyncio
    import signal
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
    raise_open_files_limit(log_format)
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


def raise_open_files_limit(log_format: str = "text") -> Optional[Tuple[int, int]]:
    """Raise the soft limit on open files (RLIMIT_NOFILE) to the hard limit, and say so.

    The agent holds two descriptors per VM (its QMP connection and each console's end),
    more per guest channel, plus one per session: 1,000 VMs do not fit the soft limit
    of 1024 many systems start services with, while the hard limit is usually far
    higher. Returns (old, new) when it raised the limit, None when it did not."""
    try:
        import resource  # lazy: POSIX only, and only the agent needs it
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20  # the kernel's usual nr_open
    if soft == resource.RLIM_INFINITY or soft >= target:
        return None
    from vproxy.agent.logs import say  # lazy: with the agent's modules, not for --help

    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        say("open files limit stays %d (cannot raise it to %d: %s)" % (soft, target, e), log_format,
            level="warning", nofile=soft)
        return None
    say("open files limit raised from %d to %d (the hard limit)" % (soft, target), log_format,
        nofile=target)
    return soft, target


def _no_reloader():
    raise UserError("this agent was not started with a way to reload its settings")


# Settings a reload cannot change: a changed value is reported, and waits for a restart.
RESTART_KEYS = ("listen", "local_socket", "vm_dir", "console_ring", "console_log_dir",
                "audit_log", "handshake_timeout", "metrics", "log_format", "resume_prelaunch",
                "max_sessions", "max_sessions_per_identity", "max_sessions_per_address",
                "max_streams", "builtin_channels", "qmp", "adopt")


def vm_options_after(vm_options: Dict[str, Dict[str, Any]], vm_specs: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """The [[vm]] tables' own settings (qmp_mode, adopt), less those of the VMs a --vm
    NAME=QMP replaces: such a VM takes the global --qmp and --adopt (or the file's)."""
    replaced = {spec.partition("=")[0] for spec in vm_specs}
    return {name: dict(options) for name, options in vm_options.items() if name not in replaced}


def parse_adopt(value: str) -> Tuple[str, ...]:
    """--adopt: "pty,socket", "pty", "socket" or "none"."""
    kinds = tuple(k.strip() for k in value.split(",") if k.strip())
    if kinds == ("none",):
        return ()
    if not kinds or not all(k in ("pty", "socket") for k in kinds):
        raise UserError("--adopt %r: expected pty, socket, pty,socket or none" % value,
                        hint="e.g. --adopt pty,socket (the default) or --adopt none")
    return kinds


def make_reloader(config_path: Optional[str], cli_tls: Dict[str, Any], allow: Sequence[str],
                  vm_specs: Sequence[str], drain_timeout: Optional[float], tls_enabled: bool,
                  started: Dict[str, Any], overridden: Collection[str] = ()) -> Callable[[], Any]:
    """What `serve` gives run_agent for SIGHUP: read the config file again and lay this
    command line's options over it, as at start; returns vproxy.agent.reload.Settings.
    started: the file's settings at start, overridden: the keys the command line set
    (to report the file's changes that need a restart)."""

    def load():
        # lazy: the agent's modules (ssl among them) are not for --help
        from vproxy.agent.acl import Rule
        from vproxy.agent.config import load_agent_config
        from vproxy.agent.reload import Settings

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
        return Settings(acl=acl, vms=vms, vm_options=vm_options_after(file_config.vm_options, vm_specs),
                        needs_restart=changed,
                        drain_timeout=(drain_timeout if drain_timeout is not None
                                       else settings.get("drain_timeout", 10.0)),
                        **paths)

    return load
