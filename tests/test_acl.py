"""The ACL and the agent's config file, without I/O."""

import pytest

from vproxy.agent.acl import Acl, Rule
from vproxy.agent.config import parse_agent_config
from vproxy.errors import ChannelRefused, UserError
from vproxy.mux import OpenRequest, RefuseCode
from vproxy.security.tls import Identity


def who(cn, *dns):
    return Identity(cn, tuple(dns), (), ())


def req(vm, channel, mode="rw"):
    return OpenRequest(vm, channel, mode)


ACL = Acl([
    Rule(("alice",), ("web*",), ("console", "vnc"), ("rw",)),
    Rule(("ops-*",), ("*",), ("*",), ("force", "hotplug")),
    Rule(("ci",), ("test-vm",), ("channel:org.vproxy.*",), ("rw", "hotplug")),
    Rule(("viewer",), ("*",), ("console:serial0",), ("ro",)),
])


@pytest.mark.parametrize("identity, request_, allowed", [
    (who("alice"), req("web1", "console"), True),
    (who("alice"), req("web1", "console:serial1", "ro"), True),   # rw includes ro
    (who("alice"), req("web1", "console", "force"), False),        # but not force
    (who("alice"), req("db1", "console"), False),                  # VM glob
    (who("alice"), req("web1", "channel:org.qemu.guest_agent.0"), False),
    (who("bob"), req("web1", "console"), False),                   # deny by default
    (who("x", "ops-1.example"), req("db1", "vnc", "force"), True),  # SAN matches
    (who("ops-2"), req("db1", "channel:anything", "hotplug"), True),
    (who("ci"), req("test-vm", "channel:org.vproxy.echo", "hotplug"), True),
    (who("ci"), req("test-vm", "channel:org.qemu.guest_agent.0"), False),
    (who("ci"), req("test-vm", "console", "ro"), False),
    (who("viewer"), req("any", "console:serial0", "ro"), True),
    (who("viewer"), req("any", "console:serial0", "rw"), False),
    (who("viewer"), req("any", "console", "ro"), False),           # only the named console
])
def test_acl_decisions(identity, request_, allowed):
    assert ACL.allows(identity, request_) is allowed


def test_refusal_says_who_what_and_why():
    with pytest.raises(ChannelRefused) as info:
        ACL.check(who("alice"), req("web1", "console", "force"))
    assert info.value.code == RefuseCode.FORBIDDEN
    assert info.value.message == "alice may not open console of VM web1: mode force is not granted (only ro, rw)"
    with pytest.raises(ChannelRefused) as info:
        ACL.check(who("mallory"), req("web1", "vnc"))
    assert info.value.message.endswith("no ACL rule grants it")


def test_a_vm_with_an_alias_is_matched_by_either_name():
    """A vm_dir VM known by its -name (web1) with its socket's name (100) as an alias:
    the agent passes both names, whichever was asked for."""
    acl = Acl([Rule(("alice",), ("web1",), ("*",), ("rw",)),
               Rule(("ci",), ("100",), ("console",), ("ro",)),
               Rule(("bob",), ("web2", "101"), ("*",), ("rw",))])
    names = ("web1", "100")
    for asked in names:
        assert acl.allows(who("alice"), req(asked, "console"), names)   # rule for the name
        assert acl.allows(who("ci"), req(asked, "console", "ro"), names)  # rule for the alias
        assert not acl.allows(who("ci"), req(asked, "console"), names)  # its modes still count
        assert not acl.allows(who("bob"), req(asked, "console"), names)  # another VM's rule
    # without the names (a VM the agent does not know) only the name asked for counts
    assert not acl.allows(who("alice"), req("100", "console"))
    with pytest.raises(ChannelRefused) as info:
        acl.check(who("bob"), req("100", "vnc"), names)
    assert info.value.message == "bob may not open vnc of VM 100: no ACL rule grants it"
    assert acl.visible_vms(who("ci"), ["web1", "web2"], {"web1": ["100"]}) == ["web1"]
    assert acl.visible_vms(who("bob"), ["web1"], {"web1": ["100"]}) == []


def test_visible_vms():
    assert ACL.visible_vms(who("alice"), ["web1", "db1", "web2"]) == ["web1", "web2"]
    assert ACL.visible_vms(who("nobody"), ["web1"]) == []


def test_config_file_parses_vms_and_rules():
    cfg = parse_agent_config({
        "listen": "0.0.0.0:7443", "vm_dir": "/run/q", "console_ring": 4096,
        "vm": [{"name": "web1", "qmp": "/run/web1.qmp"}],
        "allow": [{"identities": ["alice"], "vms": ["web1"], "modes": ["force"]}],
    })
    assert cfg.vms == [("web1", "/run/web1.qmp")]
    assert cfg.settings["console_ring"] == 4096
    assert cfg.acl.allows(who("alice"), req("web1", "vnc", "force"))


def test_config_file_per_vm_qmp_mode_and_adopt():
    """A [[vm]] may set its own qmp_mode and adopt over the global qmp and adopt; only
    the keys it sets are in vm_options, and the (name, path) pairs stay as they were."""
    cfg = parse_agent_config({
        "qmp": "exclusive", "adopt": ["pty", "socket"],
        "vm": [{"name": "pve100", "qmp": "/run/qemu-server/100.qmp", "qmp_mode": "shared"},
               {"name": "lv1", "qmp": "/run/lv1.qmp", "adopt": []},
               {"name": "plain", "qmp": "/run/plain.qmp"},
               {"name": "both", "qmp": "/run/both.qmp", "qmp_mode": "exclusive", "adopt": ["pty"]}],
    })
    assert cfg.vms == [("pve100", "/run/qemu-server/100.qmp"), ("lv1", "/run/lv1.qmp"),
                       ("plain", "/run/plain.qmp"), ("both", "/run/both.qmp")]
    assert cfg.vm_options == {"pve100": {"qmp_mode": "shared"}, "lv1": {"adopt": ()},
                              "both": {"qmp_mode": "exclusive", "adopt": ("pty",)}}
    assert cfg.settings["qmp"] == "exclusive"


@pytest.mark.parametrize("data, needle", [
    ({"lisen": "x"}, "unknown key 'lisen'"),
    ({"console_ring": "big"}, "console_ring has the wrong type"),
    ({"qmp": "/run/x.qmp"}, "qmp must be \"exclusive\" or \"shared\", not '/run/x.qmp'"),
    ({"vm": [{"name": "a"}]}, "[[vm]] #1: needs name"),
    ({"vm": [{"name": "a", "qmp": "/x"}, {"name": "a", "qmp": "/y"}]}, "configured twice"),
    ({"vm": [{"name": "a", "qmp": "/x", "mode": "shared"}]}, "[[vm]] 'a': unknown key 'mode'"),
    ({"vm": [{"name": "a", "qmp": "/x", "qmp_mode": "polled"}]},
     "[[vm]] 'a': qmp_mode must be \"exclusive\" or \"shared\", not 'polled'"),
    ({"vm": [{"name": "a", "qmp": "/x", "adopt": ["file"]}]}, "[[vm]] 'a': adopt must list some of"),
    ({"vm": [{"name": "a", "qmp": "/x", "adopt": "pty"}]}, "[[vm]] 'a': adopt must list some of"),
    ({"qmp_mode": "shared"}, "unknown key 'qmp_mode': the QMP mode of every VM is qmp = \"shared\""),
    ({"allow": [{"vms": ["*"]}]}, "needs identities"),
    ({"allow": [{"identities": ["a"], "modes": ["write"]}]}, "unknown mode(s) write"),
    ({"allow": [{"identities": ["a"], "channels": ["serial"]}]}, "unknown channel 'serial'"),
    ({"allow": [{"identities": "a", "hosts": ["x"]}]}, "unknown key(s) hosts"),
])
def test_config_errors_name_the_key(data, needle):
    with pytest.raises(UserError) as info:
        parse_agent_config(data, "agent.toml")
    assert needle in info.value.message and info.value.message.startswith("agent.toml")


def test_hotplug_and_force_need_their_own_grant():
    acl = Acl([Rule(("dev",), ("*",), ("channel", "console"), ("rw",))])
    assert acl.allows(who("dev"), req("vm1", "channel:org.example.x", "rw"))
    with pytest.raises(ChannelRefused) as info:
        acl.check(who("dev"), req("vm1", "channel:org.example.x", "hotplug"))
    assert info.value.message.endswith("mode hotplug is not granted (only ro, rw)")
    with pytest.raises(ChannelRefused) as info:
        acl.check(who("dev"), req("vm1", "console", "force"))
    assert "mode force is not granted" in info.value.message


# --------------------------------------------------------------------------- bench (built-ins)

BENCH_ACL = Acl([
    Rule(("alice",), ("web*",), ("console", "bench"), ("ro",)),   # bench whatever vms, modes
    Rule(("carol",), ("*",), ("bench:echo",), ("rw",)),            # only echo
    Rule(("admin",), ("*",), ("*",), ("force", "hotplug")),        # what --allow makes
    Rule(("webops",), ("web*",), ("*",), ("rw",)),                 # "*" on some VMs only
    Rule(("monitor",), ("*",), ("bench",), ("rw",)),               # bench and nothing else
])


@pytest.mark.parametrize("name, channel, granted", [
    ("alice", "sink", True), ("alice", "source", True), ("alice", "echo", True),
    ("carol", "echo", True), ("carol", "source", False), ("carol", "sink", False),
    ("admin", "source", True),
    ("webops", "echo", False),
    ("monitor", "source", True),
    ("bob", "echo", False),
])
def test_bench_grants(name, channel, granted):
    assert BENCH_ACL.allows_bench(who(name), channel) is granted


def test_bench_entries_grant_no_vm_and_show_none():
    """A bench-only rule opens nothing of a VM and makes no VM visible in `vproxy ls`;
    "bench" is not a VM's channel whatever the rule."""
    assert not BENCH_ACL.allows(who("monitor"), req("web1", "console"))
    assert BENCH_ACL.visible_vms(who("monitor"), ["web1", "db1"]) == []
    assert BENCH_ACL.visible_vms(who("alice"), ["web1", "db1"]) == ["web1"]
    assert not BENCH_ACL.allows(who("admin"), req("web1", "bench"))
    assert BENCH_ACL.allows(who("admin"), req("web1", "vnc", "force"))


def test_config_file_accepts_bench_entries():
    cfg = parse_agent_config({"allow": [{"identities": ["ci-*"], "channels": ["bench:e*"]}],
                              "builtin_channels": "acl"})
    assert cfg.settings["builtin_channels"] == "acl"
    assert cfg.acl.allows_bench(who("ci-1"), "echo")
    assert not cfg.acl.allows_bench(who("ci-1"), "source")
    for bad in ("ACL", "none", ""):
        with pytest.raises(UserError) as info:
            parse_agent_config({"builtin_channels": bad}, "agent.toml")
        assert info.value.message == ('agent.toml: builtin_channels must be "everyone", "acl" or '
                                      '"off", not %r' % bad)
    with pytest.raises(UserError) as info:
        parse_agent_config({"builtin_channels": True}, "agent.toml")
    assert "builtin_channels has the wrong type (bool)" in info.value.message
