"""The command line: click lives here and only here.

Commands wire options to library calls; the logic is in the library. A UserError
becomes one line ("vproxy: error: ...", then a hint) and its exit code, never a
traceback.
"""

import sys

import click

from vproxy.errors import UserError
from .common import EXIT_INTERRUPTED, client_config, resolve_client, resolve_tls, run_async, tls_options


def _version() -> str:
    from vproxy._version import version_line

    return version_line()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(message="%(version)s", version=_version())
@click.option("-v", "--verbose", count=True, help="More log output (repeat for debug).")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """Reach the consoles, guest channels and VNC display of QEMU VMs on other hosts
    over one mutually authenticated TLS connection.

    \b
    Quick start (one host):
      vproxy pki init
      vproxy pki issue server localhost --dns localhost --ip 127.0.0.1
      vproxy pki issue client alice
      vproxy serve --identity localhost &
      vproxy bench localhost --identity alice

    See vproxy(1) and vproxy COMMAND --help.
    """
    import logging

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="vproxy: %(name)s: %(message)s", stream=sys.stderr)
    ctx.obj = {"verbose": verbose}


@main.command()
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
              help="Serve every VM whose QMP socket is in DIR (NAME.qmp is VM NAME); "
                   "sockets that appear later are picked up.")
@click.option("--allow", "allow", multiple=True, metavar="IDENTITY",
              help="Give IDENTITY (a certificate CN or SAN glob) every right on every VM "
                   "(repeatable); finer rules go in the config file.")
@click.option("--console-ring", type=click.IntRange(4096), default=None, metavar="BYTES",
              help="Console history kept per console. [default: 1048576]")
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
          handshake_timeout, drain_timeout, metrics, resume_prelaunch, max_sessions_per_identity,
          max_sessions_per_address, builtin_channels, log_format, audit_log, local_socket, **tls_args) -> None:
    """Run the agent: accept mTLS sessions and serve the VMs' channels.

    Access is denied unless an ACL rule (config file, or --allow) grants it. The
    built-in channels sink, source and echo (used by `vproxy bench`) are open to any
    client whose certificate the CA signed, unless --builtin-channels says otherwise. SIGHUP reloads the certificates, CA, CRL,
    ACL and VM list; SIGTERM drains.

    \b
    Examples:
      vproxy serve --identity vmhost1 --vm web1=/run/qemu/web1.qmp --allow alice
      vproxy serve --config /etc/vproxy/agent.toml
    """
    from vproxy.agent.acl import Rule
    from vproxy.agent.server import Agent, AgentConfig
    from vproxy.net.address import parse_address
    from vproxy.agent.config import load_agent_config
    from vproxy.errors import UserError
    from .serve import make_reloader, run_agent

    file_config = load_agent_config(config_path)
    settings = file_config.settings
    cli_tls = dict(tls_args)  # for reloads: the command line over the file, as now
    overridden = {k for k, v in (("listen", listen), ("vm_dir", vm_dir), ("console_ring", console_ring),
                                 ("console_log_dir", console_log_dir), ("audit_log", audit_log),
                                 ("handshake_timeout", handshake_timeout), ("metrics", metrics),
                                 ("log_format", log_format), ("local_socket", local_socket),
                                 ("max_sessions_per_identity", max_sessions_per_identity),
                                 ("max_sessions_per_address", max_sessions_per_address),
                                 ("builtin_channels", builtin_channels)) if v}
    if resume_prelaunch is not None:
        overridden.add("resume_prelaunch")
    for key in ("identity", "cert", "key", "ca", "crl", "pki_dir"):
        if not tls_args.get(key) and settings.get(key):
            tls_args[key] = settings[key]
    host, port = parse_address(listen or settings.get("listen", "127.0.0.1:7443"), listening=True)
    local_socket = local_socket or settings.get("local_socket")
    if local_socket and not (listen or settings.get("listen")
                             or any(tls_args.get(k) for k in ("identity", "cert", "key"))):
        paths = {"cert": "", "key": "", "ca": "", "crl": None}  # local mode only: no TLS
    else:
        paths = resolve_tls(tls_args, server=True)
    vm_list = list(file_config.vms)
    for spec in vms:
        name, sep, qmp = spec.partition("=")
        if not sep or not name or not qmp:
            raise UserError("--vm %r: expected NAME=QMP_SOCKET_PATH" % spec,
                            hint="e.g. --vm web1=/run/qemu/web1.qmp")
        vm_list = [v for v in vm_list if v[0] != name] + [(name, qmp)]
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
        mux_config=mux_config(settings),
        local_socket=local_socket, **paths)
    reloader = make_reloader(config_path, cli_tls, allow, vms, drain_timeout, bool(paths["cert"]),
                             dict(settings), overridden)
    run_async(run_agent(Agent(config, acl=acl), audit_log or settings.get("audit_log"),
                        log_format=log_format or settings.get("log_format", "text"),
                        reloader=reloader))


@main.command(name="ls")
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
    from .serve import run_ls

    if not hosts:
        config = client_config(tls_args)
        hosts = list(config.hosts)
        if not hosts:
            raise UserError("no HOST given, and no [hosts.NAME] in %s"
                            % (config.path or "the client configuration file"),
                            hint="vproxy ls HOST..., or name your hosts in "
                                 "~/.config/vproxy/client.toml (see vproxy.conf(5))")
    sys.exit(run_async(run_ls([resolve_client(h, tls_args) for h in hosts], as_json)))


@main.command()
@click.argument("host", metavar="HOST[:PORT]")
@tls_options(server=False)
@click.option("--seconds", type=float, default=2.0, show_default=True,
              help="Duration of each throughput test.")
@click.option("--streams", type=click.IntRange(1, 10000), default=100, show_default=True,
              help="Concurrent echo streams to open at once.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def bench(host: str, seconds: float, streams: int, as_json: bool, **tls_args) -> None:
    """Measure the link to an agent: throughput each way, round-trip latency,
    concurrent streams. Uses the agent's built-in channels; needs no VM.

    \b
    Example:
      vproxy bench vmhost1 --identity alice --seconds 5
    """
    from .serve import run_bench

    code = run_async(run_bench(resolve_client(host, tls_args), seconds, streams, as_json))
    sys.exit(code)


def mux_config(settings):
    """The session limits the config file may set (max_streams), or the defaults."""
    if "max_streams" not in settings:
        return None
    from vproxy.mux import Config

    return Config(max_streams=settings["max_streams"])


def _add_optional_commands() -> None:
    from .forward import forward, vnc
    from .pki import pki

    main.add_command(pki)
    from .demo import completion, demo

    main.add_command(demo)
    main.add_command(completion)
    from .console import console; main.add_command(console)
    main.add_command(vnc)
    main.add_command(forward)


_add_optional_commands()


def entry() -> None:
    """Console-script entry point: run main() with vproxy's error handling."""
    try:
        # completion requests (see `vproxy completion`) whatever the program is called
        main(standalone_mode=False, complete_var="_VPROXY_COMPLETE")
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("vproxy: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except UserError as e:
        click.echo("vproxy: error: %s" % e.message, err=True)
        if e.hint:
            click.echo("hint: %s" % e.hint, err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("vproxy: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
