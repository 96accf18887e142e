"""Reloading a running agent (SIGHUP): certificates, key, CA, CRL, ACL and VM list.

A reload happens in two steps:
1. prepare: read and check everything (the new SSLContext, the CA and CRL files for
   vproxy.security.crl, the ACL already parsed by the caller). Any failure raises UserError and
   nothing has changed: the agent keeps its previous settings.
2. apply, which cannot fail on bad input: new handshakes get the new SSLContext; live
   sessions are judged by the new CA and CRL and streams by the new ACL; the VM list
   follows the configuration.

What happens to what is already connected:
- A TLS session whose client certificate the new CRL revokes, or whose issuing CA is
  gone from the new CA file, ends at once: GOAWAY SHUTDOWN with the reason, then close.
  (The new SSLContext would refuse that certificate; vproxy.security.crl says why it can tell.)
- A handshake still under way when the reload happens finishes with the old context;
  the agent judges such a session by the new CA and CRL when it arrives
  (vproxy.agent.AgentSession.connection_made calls stale_session_reason()).
- An open VM stream that the new ACL no longer allows is reset with CANCEL and the
  message "access revoked by the agent's new ACL". Built-in channels need no ACL.
- A VM dropped from the configuration: its streams are reset (CHANNEL_GONE), then the
  agent lets go of its QMP socket. A VM added is served from now on.
- Everything else keeps flowing: a session is never ended just because of a reload.
"""

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from vproxy.security import crl as crlmod
from vproxy.security import tls
from vproxy.errors import ChannelRefused, UserError
from vproxy.mux import ResetCode

if TYPE_CHECKING:  # the agent imports this module
    from .server import Agent

log = logging.getLogger("vproxy.agent")

ACL_REVOKED = "access revoked by the agent's new ACL"


@dataclass
class Settings:
    """What a reload may change. Paths are re-read even when unchanged (rotated files)."""

    cert: str = ""                # "" for an agent without TLS (local socket only)
    key: str = ""
    ca: str = ""
    crl: Optional[str] = None
    acl: Any = None               # vproxy.agent.acl.Acl (None: no VM access at all)
    vms: Optional[List[Tuple[str, str]]] = None  # None: leave the VM list alone
    vm_options: Optional[Dict[str, Dict[str, Any]]] = None  # per VM: qmp_mode, adopt (None: as they are)
    drain_timeout: Optional[float] = None
    needs_restart: List[str] = field(default_factory=list)  # changed keys a reload ignores


@dataclass
class Outcome:
    sessions_ended: int = 0
    streams_reset: int = 0
    vms_added: List[str] = field(default_factory=list)
    vms_removed: List[str] = field(default_factory=list)
    needs_restart: List[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = ["reloaded certificates, CA, CRL and ACL"]
        if self.sessions_ended:
            parts.append("ended %d session(s)" % self.sessions_ended)
        if self.streams_reset:
            parts.append("reset %d stream(s)" % self.streams_reset)
        if self.vms_added:
            parts.append("VMs added: %s" % ", ".join(self.vms_added))
        if self.vms_removed:
            parts.append("VMs removed: %s" % ", ".join(self.vms_removed))
        if self.needs_restart:
            parts.append("changed but needing a restart: %s" % ", ".join(self.needs_restart))
        return "; ".join(parts)


@dataclass
class _Prepared:
    settings: Settings
    context: Any = None           # ssl.SSLContext, or None for an agent without TLS
    trust: Optional[crlmod.Trust] = None


def prepare(agent: "Agent", settings: Settings) -> _Prepared:
    """Read and check the new settings; UserError (nothing applied) if anything is wrong."""
    prepared = _Prepared(settings)
    if agent.uses_tls:
        if not settings.cert:
            raise UserError("the new configuration gives the agent no certificate; "
                            "turning TLS off needs a restart")
        prepared.context = tls.server_context(settings.cert, settings.key, settings.ca,
                                              settings.crl)
        prepared.trust = crlmod.Trust.load(settings.ca, settings.crl)
    return prepared


async def apply(agent: "Agent", prepared: _Prepared) -> Outcome:
    settings = prepared.settings
    outcome = Outcome(needs_restart=list(settings.needs_restart))
    config = agent.config
    if prepared.context is not None:
        agent.use_tls(prepared.context, prepared.trust)
        config.cert, config.key, config.ca, config.crl = (settings.cert, settings.key,
                                                          settings.ca, settings.crl)
    agent.acl = settings.acl
    if settings.drain_timeout is not None:
        config.drain_timeout = settings.drain_timeout

    if prepared.trust is not None:
        for agent_session in list(agent.sessions):
            why = session_reason(agent_session, prepared.trust)
            if why is not None:
                agent_session.end("%s: %s" % (agent_session.peer_identity, why))
                outcome.sessions_ended += 1

    for stream in list(agent.streams):
        session = stream.session
        if session.closed.done() or stream.closed:
            continue
        if not stream.request.vm:  # a built-in channel: builtin_channels decides
            try:
                agent.authorize_builtin(session.peer_identity, stream.request)
                continue
            except ChannelRefused:
                pass
        elif settings.acl is not None and settings.acl.allows(session.peer_identity, stream.request,
                                                              agent.vm_names(stream.request.vm)):
            continue
        log.warning("%s: stream %d (%s): %s", session.name, stream.stream_id,
                    stream.request.describe(), ACL_REVOKED)
        stream.reset(ResetCode.CANCEL, ACL_REVOKED)
        outcome.streams_reset += 1

    if settings.vms is not None:
        await _apply_vms(agent, settings.vms, outcome, settings.vm_options)
    return outcome


def session_reason(session: Any, trust: crlmod.Trust) -> Optional[str]:
    """Why this (TLS) session may not go on under `trust`, or None."""
    transport = session.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None  # a local-socket session: no certificate to judge
    return stale_session_reason(ssl_object, trust)


def stale_session_reason(ssl_object: Any, trust: crlmod.Trust) -> Optional[str]:
    """Why a peer admitted by ssl_object's (older) context is not admitted by `trust`."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    try:
        cert = crlmod.parse_certificate(der)
        before = crlmod.Trust(cas=[crlmod.parse_certificate(d)
                                   for d in ssl_object.context.get_ca_certs(binary_form=True)])
    except crlmod.CertificateFormatError as e:
        log.warning("cannot read a peer's certificate to judge it after a reload: %s", e)
        return None
    serial = (ssl_object.getpeercert() or {}).get("serialNumber")
    if serial is not None and int(serial, 16) != cert.serial:  # cannot happen; be sure
        log.warning("peer certificate serial mismatch: %s vs %X", serial, cert.serial)
    return crlmod.still_trusted(cert, before, trust)


async def _apply_vms(agent: "Agent", vms: List[Tuple[str, str]], outcome: Outcome,
                     vm_options: Optional[Dict[str, Dict[str, Any]]] = None) -> None:
    """Make the configured VM list `vms` (VMRegistry.reconfigure: VMs found in --vm-dir
    stay unless a configured VM takes their name; a VM that goes has its streams reset
    with "VM x was removed from the agent's configuration"; a VM whose own qmp_mode or
    adopt changed is restarted in the registry: its streams are reset with "VM x was
    restarted in the agent with new settings" and it counts as added)."""
    registry = agent.registry
    if registry is None:
        if not vms or "vm" in agent.providers:
            agent.config.vms = list(vms)
            if vm_options is not None:
                agent.config.vm_options = dict(vm_options)
            return  # no QEMU layer (or a provider of the caller's own): nothing to do
        # lazy: qemu.qmp only when the agent serves VMs
        from vproxy.agent.qemu.provider import QemuProvider
        from vproxy.agent.qemu.vms import VMRegistry

        c = agent.config
        registry = VMRegistry([], None, ring_size=c.console_ring, log_dir=c.console_log_dir,
                              resume_prelaunch=c.resume_prelaunch, qmp_mode=c.qmp, adopt=c.adopt,
                              vm_options=vm_options if vm_options is not None else c.vm_options)
        await registry.start()
        agent.registry = registry
        agent.providers["vm"] = QemuProvider(registry)
    added, removed = await registry.reconfigure(vms, vm_options=vm_options)
    outcome.vms_added.extend(added)
    outcome.vms_removed.extend(n for n in removed if n not in added)
    agent.config.vms = list(vms)
    if vm_options is not None:
        agent.config.vm_options = dict(vm_options)
    agent.metrics.watch_vms(registry)


async def reload_agent(agent: "Agent", settings: Settings) -> Outcome:
    return await apply(agent, prepare(agent, settings))


__all__ = ["Settings", "Outcome", "ACL_REVOKED", "prepare", "apply", "reload_agent",
           "session_reason", "stale_session_reason"]
