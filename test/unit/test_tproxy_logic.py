"""Pure logic of the tproxy execution module: port ranges, multiport groups, validation, plans."""

from __future__ import annotations

import shutil
import subprocess
import sys

import mtproxy_common
import pytest
from modules import REPO, execution_module
from salt.exceptions import SaltInvocationError

tproxy = execution_module("tproxy")

Route, Rule, Mangle = tproxy.Route, tproxy.Rule, tproxy.Mangle


@pytest.mark.parametrize(
    ("ports", "ranges"),
    [
        ([4431], [(4431, 4431)]),
        ([4432, 4431], [(4431, 4432)]),
        ([4431, 4432, 4433, 4434], [(4431, 4434)]),
        ([4431, 4432, 4434, 4434, 4440], [(4431, 4432), (4434, 4434), (4440, 4440)]),
        ([1, 65535], [(1, 1), (65535, 65535)]),
    ],
)
def test_port_ranges(ports, ranges):
    assert tproxy.port_ranges(ports) == ranges


def test_multiport_groups_count_a_range_as_two_slots():
    singles = [(p, p) for p in range(1000, 1030, 2)]  # 15 singles: one rule
    assert tproxy.multiport_groups(singles) == [singles]
    sixteen = [*singles, (2000, 2000)]
    assert tproxy.multiport_groups(sixteen) == [singles, [(2000, 2000)]]
    ranges = [(p, p + 1) for p in range(1000, 1080, 10)]  # 8 ranges = 16 slots
    groups = tproxy.multiport_groups(ranges)
    assert groups == [ranges[:7], ranges[7:]]
    assert tproxy.multiport_arg(groups[0][:2]) == "1000:1001,1010:1011"
    assert tproxy.multiport_arg([(4431, 4431), (4433, 4434)]) == "4431,4433:4434"


def test_validate_normalises():
    spec = tproxy.validate("cell", ["4432", 4431, 4431], table="0x64", family="both")
    assert spec.ports == (4431, 4432)
    assert spec.table == 100
    assert spec.families == ("ipv4", "ipv6")
    assert tproxy.validate("cell", 4431).ports == (4431,)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ports": []}, "No ports given"),
        ({"ports": None}, "No ports given"),
        ({"ports": [0]}, "Port must be from 1 to 65535, not 0"),
        ({"ports": [65536]}, "Port must be from 1 to 65535, not 65536"),
        ({"ports": ["x"]}, "Port must be a number"),
        ({"ports": [True]}, "Port must be a number"),
        ({"method": "nat"}, "Unknown method 'nat'"),
        ({"family": "ipx"}, "Unknown family 'ipx'"),
        ({"mark": 0}, "Mark must be from 1 to 4294967295, not 0"),
        ({"mark": 2**32}, "Mark must be from 1"),
        ({"table": 0}, "Table must be from 1"),
        ({"table": 254}, "kernel's main table"),
        ({"table": 255}, "kernel's local table"),
        ({"table": 2**32}, "Table must be from 1"),
        ({"priority": 32766}, "Priority must be from 1 to 32765"),
        ({"tag": 4}, "Tag 4 is a routing protocol number the kernel uses"),
        ({"name": 'a"b'}, "cannot be used in an iptables comment"),
        ({"name": ""}, "Name must be a non-empty string"),
    ],
)
def test_validate_errors(kwargs, message):
    args = {"name": "cell", "ports": [4431, 4432], **kwargs}
    with pytest.raises(SaltInvocationError, match=message.replace("(", r"\(")):
        tproxy.validate(**args)


def test_desired_mark():
    spec = tproxy.validate("cell", [4431, 4432, 4434])
    tokens = tproxy.mangle_tokens([(4431, 4432), (4434, 4434)], 1, "mtproxy-formula tproxy: cell")
    assert tokens[4:6] == ("--sports", "4431:4432,4434")
    assert tokens[-2:] == ("--set-xmark", "0x1/0xffffffff")
    assert tproxy.desired(spec) == [
        Route("ipv4", 100, 201),
        Rule("ipv4", 100, 100, 201, fwmark=1),
        Mangle("ipv4", tokens),
    ]


def test_desired_sport_both_families():
    spec = tproxy.validate("cell", [4431, 4432, 4434], method="sport", family="both", table=7, priority=50)
    assert tproxy.desired(spec) == [
        Route("ipv4", 7, 201),
        Rule("ipv4", 50, 7, 201, sport=(4431, 4432)),
        Rule("ipv4", 50, 7, 201, sport=(4434, 4434)),
        Route("ipv6", 7, 201),
        Rule("ipv6", 50, 7, 201, sport=(4431, 4432)),
        Rule("ipv6", 50, 7, 201, sport=(4434, 4434)),
    ]


def test_diff_port_change_adds_before_it_removes():
    old = tproxy.desired(tproxy.validate("cell", [4431, 4432], method="sport"))
    new = tproxy.desired(tproxy.validate("cell", [4431, 4432, 4433, 4434], method="sport"))
    add, remove = tproxy.diff(new, old)
    assert add == [Rule("ipv4", 100, 100, 201, sport=(4431, 4434))]
    assert remove == [Rule("ipv4", 100, 100, 201, sport=(4431, 4432))]
    assert tproxy.diff(new, new) == ([], [])


def test_diff_orders_and_dedups():
    want = tproxy.desired(tproxy.validate("cell", [4431, 4432]))
    route, rule, mangle = want
    stale_rule = Rule("ipv4", 100, 100, 201, sport=(1, 2))
    # A duplicate of ours goes, the wanted copy stays.
    add, remove = tproxy.diff(want, [mangle, mangle, stale_rule])
    assert add == [route, rule]
    assert remove == [mangle, stale_rule]  # mangle before rules before routes


def test_diff_table_change_moves_ours():
    old = tproxy.desired(tproxy.validate("cell", [4431, 4432], table=100))
    new = tproxy.desired(tproxy.validate("cell", [4431, 4432], table=101))
    add, remove = tproxy.diff(new, old)
    assert add == [Route("ipv4", 101, 201), Rule("ipv4", 100, 101, 201, fwmark=1)]
    assert remove == [Rule("ipv4", 100, 100, 201, fwmark=1), Route("ipv4", 100, 201)]


def test_rule_with_extra_selectors_is_never_wanted():
    ours = Rule("ipv4", 100, 100, 201, fwmark=1)
    edited = ours._replace(extra="FRA_IIFNAME=eth0")
    assert tproxy.diff([ours], [edited]) == ([ours], [edited])


def test_parse_mangle_takes_only_our_exact_comment():
    out = "\n".join(
        [
            "-P OUTPUT ACCEPT",
            '-A OUTPUT -p tcp -m multiport --sports 4431:4432 -m comment --comment "mtproxy-formula tproxy: cell"'
            " -j MARK --set-xmark 0x1/0xffffffff",
            '-A OUTPUT -p tcp -m comment --comment "mtproxy-formula tproxy: cell2" -j MARK --set-xmark 0x1/0xffffffff',
            "-A OUTPUT -p tcp -m tcp --sport 4431 -j MARK --set-xmark 0x1/0xffffffff",
        ]
    )
    found = tproxy.parse_mangle(out, "ipv4", "mtproxy-formula tproxy: cell")
    spec = tproxy.validate("cell", [4431, 4432])
    assert found == [tproxy.desired(spec)[2]]


def test_describe():
    assert tproxy.describe(Route("ipv6", 100, 201)) == "ip -6 route local ::/0 dev lo table 100 proto 201"
    assert tproxy.describe(Rule("ipv4", 100, 100, 201, fwmark=1)) == "ip rule pref 100 fwmark 0x1 lookup 100 proto 201"
    assert (
        tproxy.describe(Rule("ipv4", 9, 100, 201, sport=(4431, 4431)))
        == "ip rule pref 9 ipproto tcp sport 4431 lookup 100 proto 201"
    )
    mangle = tproxy.desired(tproxy.validate("a b", [4431]))[2]
    assert tproxy.describe(mangle).startswith("iptables -t mangle -A OUTPUT -p tcp -m multiport --sports 4431 ")
    assert "--comment 'mtproxy-formula tproxy: a b'" in tproxy.describe(mangle)


class FakeMsg(dict):
    """Just enough of pyroute2's netlink messages: fields, ``attrs`` and get_attr."""

    def get_attr(self, name):
        return dict(self["attrs"]).get(name)


class FakeRuleMsg(FakeMsg):
    """A fibmsg (ip rule)."""

    def __init__(self, attrs, **fields):
        super().__init__({"attrs": attrs, "src_len": 0, "dst_len": 0, "tos": 0, "flags": 0, "action": 1, **fields})


class FakeRouteMsg(FakeMsg):
    """An rtmsg (ip route); unicast, protocol boot unless told."""

    def __init__(self, attrs, **fields):
        super().__init__({"attrs": attrs, "dst_len": 0, "table": 252, "proto": 3, "type": 1, **fields})


# The kernel's own rules: never foreign users of a table or mark.
KERNEL_RULES = [
    FakeRuleMsg([("FRA_TABLE", table), ("FRA_PROTOCOL", 2), ("FRA_PRIORITY", prio)], table=table)
    for table, prio in ((255, None), (254, 32766), (253, 32767))
]
FOREIGN_DEFAULT = FakeRouteMsg([("RTA_TABLE", 100), ("RTA_GATEWAY", "198.18.5.2"), ("RTA_OIF", 3)])
OUR_ROUTE = FakeRouteMsg([("RTA_TABLE", 100), ("RTA_OIF", 1)], proto=201, type=2)


def _rule(prio, table, **extra):
    attrs = [("FRA_TABLE", table), ("FRA_PRIORITY", prio), ("FRA_PROTOCOL", extra.pop("proto", 0))]
    return FakeRuleMsg(attrs + list(extra.items()), table=table if table < 256 else 252)


@pytest.mark.parametrize(
    ("msg", "table", "mark", "uses"),
    [
        (KERNEL_RULES[0], 100, 1, False),
        (KERNEL_RULES[1], 100, 1, False),
        (_rule(50, 100), 100, None, True),
        (_rule(50, 100), 101, None, False),
        (_rule(50, 200, FRA_FWMARK=1), 100, 1, True),
        (_rule(50, 200, FRA_FWMARK=1), 100, None, False),  # method sport: no mark
        (_rule(50, 200, FRA_FWMARK=1, FRA_FWMASK=0xFF), 100, 0x101, True),
        (_rule(50, 200, FRA_FWMARK=0x100, FRA_FWMASK=0xFF00), 100, 1, False),
        (_rule(50, 200, FRA_FWMARK=7), 100, 1, False),
        (_rule(50, 200, FRA_FWMARK=0, FRA_FWMASK=0), 100, 1, True),  # fwmark 0/0 matches every mark
        (_rule(50, 100, FRA_FWMARK=7), 101, 1, False),
        (FakeRuleMsg([("FRA_TABLE", 100)], table=100, action=6), 100, None, False),  # blackhole: no lookup
    ],
)
def test_rule_uses(msg, table, mark, uses):
    assert tproxy.rule_uses(msg, table, mark) is uses


def test_describe_foreign_rules_and_routes():
    rule = _rule(32765, 200, FRA_FWMARK=1, FRA_FWMASK=0xFFFFFFFF)
    assert tproxy.describe_rule_msg(rule, "ipv4") == "ip rule pref 32765 fwmark 0x1 lookup 200"
    rule = _rule(10, 100, proto=4, FRA_FWMARK=1, FRA_FWMASK=0xFF, FRA_IIFNAME="eth1")
    rule["src_len"], rule["attrs"] = 24, [*rule["attrs"], ("FRA_SRC", "198.18.0.0")]
    assert (
        tproxy.describe_rule_msg(rule, "ipv6")
        == "ip -6 rule pref 10 from 198.18.0.0/24 fwmark 0x1/0xff iif eth1 lookup 100 proto static"
    )
    assert tproxy.describe_route_msg(FOREIGN_DEFAULT, "ipv4", {3: "eth1"}) == (
        "ip route default via 198.18.5.2 dev eth1 table 100 proto boot"
    )
    blackhole = FakeRouteMsg([("RTA_TABLE", 100), ("RTA_DST", "10.0.0.0"), ("RTA_PRIORITY", 5)], type=6, dst_len=8)
    assert (
        tproxy.describe_route_msg(blackhole, "ipv6", {})
        == "ip -6 route blackhole 10.0.0.0/8 table 100 proto boot metric 5"
    )


def test_foreign_mangle_sets_the_mark_without_our_comment():
    ours = '"mtproxy-formula tproxy: cell"'
    out = "\n".join(
        [
            "-P PREROUTING ACCEPT",
            "-N DIVERT",
            f"-A OUTPUT -p tcp -m comment --comment {ours} -j MARK --set-xmark 0x1/0xffffffff",
            '-A OUTPUT -p tcp -m comment --comment "mtproxy-formula tproxy: cell2" -j MARK --set-xmark 0x1/0xffffffff',
            "-A PREROUTING -p tcp -j TPROXY --on-port 1234 --on-ip 0.0.0.0 --tproxy-mark 0x1/0x1",
            "-A DIVERT -j CONNMARK --set-xmark 0x1/0xffffffff",
            "-A OUTPUT -p udp -m udp --dport 9 -j MARK --set-xmark 0x7/0xffffffff",
            "-A OUTPUT -p tcp -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
        ]
    )
    found = tproxy.foreign_mangle(out, "ipv6", 1, "mtproxy-formula tproxy: cell")
    assert found == [
        'ip6tables -t mangle -A OUTPUT -p tcp -m comment --comment "mtproxy-formula tproxy: cell2" '
        "-j MARK --set-xmark 0x1/0xffffffff",
        "ip6tables -t mangle -A PREROUTING -p tcp -j TPROXY --on-port 1234 --on-ip 0.0.0.0 --tproxy-mark 0x1/0x1",
        "ip6tables -t mangle -A DIVERT -j CONNMARK --set-xmark 0x1/0xffffffff",
    ]
    assert tproxy.foreign_mangle(out, "ipv4", 7, "x")[0].startswith("iptables -t mangle -A OUTPUT -p udp")
    assert tproxy.foreign_mangle(out, "ipv4", 2, "x") == []


class FakeKernel:
    """An IPRoute whose ``route add`` answers EEXIST, with the rules and routes it dumps."""

    def __init__(self, routes, rules=KERNEL_RULES):
        self.routes, self.rules = routes, rules

    def link_lookup(self, ifname):
        return [1]

    def get_links(self):
        return [FakeMsg({"index": 3, "attrs": [("IFLA_IFNAME", "eth1")]})]

    def get_rules(self, family):
        return self.rules

    def get_routes(self, family):
        return self.routes

    def route(self, verb, **kwargs):
        raise tproxy.NetlinkError(tproxy.EEXIST, "File exists")


def test_eexist_is_success_only_if_our_route_is_there():
    route = Route("ipv4", 100, 201)
    assert tproxy._apply(FakeKernel([OUR_ROUTE]), [route], [], {}) == {"added": [tproxy.describe(route)]}
    with pytest.raises(tproxy.CommandExecutionError) as caught:
        tproxy._apply(FakeKernel([FOREIGN_DEFAULT]), [route], [], {})
    assert caught.value.error == (
        "Cannot add `ip route local 0.0.0.0/0 dev lo table 100 proto 201`: the kernel holds a conflicting entry "
        "that is not ours: ip route default via 198.18.5.2 dev eth1 table 100 proto boot"
    )
    assert caught.value.info == {}
    # Ours, but in another table, does not count either.
    elsewhere = FakeRouteMsg([("RTA_TABLE", 101), ("RTA_OIF", 1)], proto=201, type=2)
    with pytest.raises(tproxy.CommandExecutionError, match="none found on a re-read"):
        tproxy._apply(FakeKernel([elsewhere]), [route], [], {})


def test_rule_from_kernel_message():
    base = [("FRA_TABLE", 100), ("FRA_SUPPRESS_PREFIXLEN", 0xFFFFFFFF), ("FRA_PROTOCOL", 201)]
    sport = [("FRA_PRIORITY", 100), ("FRA_SPORT_RANGE", "4431:4431"), ("FRA_IP_PROTO", 6)]
    # Newer kernels add FRA_SPORT_MASK (28), which pyroute2 0.9.7 cannot decode.
    unknown28 = ("UNKNOWN", {"header": {"length": 6, "type": 28}})
    rule = tproxy._rule_from(FakeRuleMsg([*base, *sport, unknown28]), "ipv4", 100, 201)
    assert rule == Rule("ipv4", 100, 100, 201, sport=(4431, 4431))
    # pyroute2 gives no priority for the kernel's priority 0.
    mark = [("FRA_FWMARK", 1), ("FRA_FWMASK", 0xFFFFFFFF)]
    assert tproxy._rule_from(FakeRuleMsg([*base, *mark]), "ipv4", 100, 201) == Rule("ipv4", 0, 100, 201, fwmark=1)
    # Whatever we never set makes a rule unwanted.
    odd = [
        [("FRA_FWMARK", 1), ("FRA_FWMASK", 0xFF)],
        [*mark, ("FRA_IP_PROTO", 17)],
        [*mark, ("FRA_IIFNAME", "eth0")],
        [*mark, ("UNKNOWN", {"header": {"length": 8, "type": 40}})],
    ]
    for attrs in odd:
        assert tproxy._rule_from(FakeRuleMsg([*base, *attrs]), "ipv4", 100, 201).extra, attrs
    assert tproxy._rule_from(FakeRuleMsg([*base, *mark], src_len=8), "ipv4", 100, 201).extra == "src_len=8"


class FakeIPRoute:
    """Records netlink calls; refuses the ``fail_at``-th one like the kernel without CAP_NET_ADMIN."""

    def __init__(self, fail_at: int):
        self.calls: list[tuple[str, dict]] = []
        self.fail_at = fail_at

    def link_lookup(self, ifname):
        return [1]

    def _call(self, verb, **kwargs):
        self.calls.append((verb, kwargs))
        if len(self.calls) == self.fail_at:
            raise tproxy.NetlinkError(1, "Operation not permitted")

    route = rule = _call


def test_apply_reports_what_was_done_before_a_failure():
    old = tproxy.desired(tproxy.validate("cell", [4431, 4432], method="sport"))
    new = tproxy.desired(tproxy.validate("cell", [4431], method="sport"))
    add, remove = tproxy.diff(new, old)
    assert len(add) == 1 and len(remove) == 1
    ipr = FakeIPRoute(fail_at=2)
    with pytest.raises(tproxy.CommandExecutionError) as caught:
        tproxy._apply(ipr, add, remove, {})
    assert caught.value.info == {"added": ["ip rule pref 100 ipproto tcp sport 4431 lookup 100 proto 201"]}
    assert caught.value.error.startswith(
        "No permission to delete `ip rule pref 100 ipproto tcp sport 4431-4432 lookup 100 proto 201` through netlink"
    )
    assert [verb for verb, _ in ipr.calls] == ["add", "delete"]  # added first, then removed


def test_ensure_refuses_an_unknown_option_before_reading_the_kernel(monkeypatch):
    def no_kernel():
        raise AssertionError("the kernel was read")

    monkeypatch.setattr(tproxy, "IPRoute", no_kernel, raising=False)
    with pytest.raises(SaltInvocationError) as caught:
        tproxy.ensure("cell", [4431], tabel=101)
    assert str(caught.value) == (
        "Unknown argument tabel: use method, mark, table, family, priority, tag, iptables, ip6tables"
    )


def test_the_arguments_salt_adds_on_the_command_line_are_dropped():
    # salt-call passes __pub_* to a function that takes **kwargs.
    options = {"method": "sport", "table": 101, "__pub_fun": "tproxy.check", "__pub_jid": "1"}
    assert tproxy._spec("cell", [4431], options) == tproxy.validate("cell", [4431], method="sport", table=101)


CELL = {
    "ports": [4432, 4431],
    "config_dir": "/etc/mtproxy",
    "run_dir": "/run/mtproxy",
    "tproxy": {"method": "sport", "mark": 1, "table": 100, "family": "ipv4", "ports": [4431, 4432]},
    "boot": {
        "python": "/opt/mtproxy/venv/bin/python3",
        "unit_dir": "/etc/systemd/system",
        "unit_name": "mtproxy-return-path.service",
        "watchdog_unit_name": "mtproxy-return-path-watchdog.service",
        "watch_interval": 3,
    },
}


def test_the_return_path_is_built_once_for_the_states_and_the_units():
    built = mtproxy_common.return_path(CELL)
    assert built["arguments"] == {
        "name": "mtproxy",
        "ports": [4431, 4432],
        "method": "sport",
        "mark": 1,
        "table": 100,
        "family": "ipv4",
    }
    # The units restore what the state puts in place: the script validates the same arguments.
    assert tproxy.validate(**built["arguments"]) == tproxy.validate("mtproxy", [4431, 4432], method="sport")
    script, config = "/etc/mtproxy/bin/tproxy.py", "/etc/mtproxy/return-path.json"
    assert built["ensure"] == f"/opt/mtproxy/venv/bin/python3 {script} ensure --config {config}"
    assert built["watch"] == (
        f"/opt/mtproxy/venv/bin/python3 {script} watch --config {config} --interval 3"
        " --status /run/mtproxy/return-path.status"
    )
    assert (built["script"], built["config"], built["shared"]) == (script, config, "/etc/mtproxy/bin/mtproxy_common.py")
    assert built["watchdog_unit"] == "/etc/systemd/system/mtproxy-return-path-watchdog.service"
    # During an apply (host.sls) the ports also cover the replicas still listening elsewhere.
    assert mtproxy_common.return_path(CELL, ports=[4433, 4431, 4433])["arguments"]["ports"] == [4431, 4433]


# Where the scripts run without Salt: beside the shared module (config_dir/bin), in Salt's
# extension modules (check_cmd from modules/, the module in utils/), in the formula's tree.
LAYOUTS = {
    "config_dir/bin": ("bin", "bin"),
    "extension modules": ("modules", "utils"),
    "formula tree": ("_modules", "_utils"),
}
PROBE = """
import sys
sys.path.insert(0, sys.argv[1])  # what `python3 FOLDER/tproxy.py` does
import haproxy_runtime, tproxy
try:
    tproxy.validate("cell", [])
except tproxy.SaltInvocationError as exc:
    print(type(exc).__module__, haproxy_runtime.CommandExecutionError.__module__, exc)
"""


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_scripts_find_the_shared_module_without_salt(tmp_path, layout):
    scripts, shared = (tmp_path / folder for folder in LAYOUTS[layout])
    for folder in (scripts, shared):
        folder.mkdir(exist_ok=True)
    for name in ("tproxy.py", "haproxy_runtime.py"):
        shutil.copy(REPO / "_modules" / name, scripts / name)
    shutil.copy(REPO / "_utils" / "mtproxy_common.py", shared)
    # -S: no site-packages, so neither Salt nor pyroute2, as on a host's bare python3.
    proc = subprocess.run(
        [sys.executable, "-S", "-c", PROBE, str(scripts)], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert proc.stdout.strip() == (
        "mtproxy_common mtproxy_common No ports given: ports must list at least one replica port"
    ), proc.stderr
