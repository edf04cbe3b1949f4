"""The ``tproxy`` state against a real kernel, inside the network namespaces of a bare test host.

Everything is read back from the kernel (``ip rule``, ``ip route show table``,
``iptables -t mangle -S OUTPUT``) inside the test host's namespace; the
machine's own rules, routes and tables are never touched. The data-path tests
run Debian's HAProxy with ``source 0.0.0.0 usesrc clientip`` in the host
namespace and check the client's address is what the backends see.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from testhost import REPO, VENV_BIN, TestHost

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

HAPROXY = "/usr/sbin/haproxy"
FRONTEND_PORT = 8443


def _mangle_rule(sports: str, name: str = "probe") -> str:
    return (
        f'-A OUTPUT -p tcp -m multiport --sports {sports} -m comment --comment "mtproxy-formula tproxy: {name}" '
        "-j MARK --set-xmark 0x1/0xffffffff"
    )


class TproxyKernel:
    """Runs the tproxy state in a bare test host (no cell here: no HAProxy, no replicas), reads the kernel back."""

    def __init__(self, host: TestHost):
        self.host = host
        # Our modules straight from the repository: no sync needed.
        self.config_dir = host.minion_config(module_dirs=[str(REPO / "_modules")], states_dirs=[str(REPO / "_states")])

    def state(self, fun: str, name: str = "probe", test: bool = False, **kwargs) -> dict:
        args = [f"{key}={json.dumps(value)}" for key, value in kwargs.items()]
        if test:
            args.append("test=True")
        out = self.host.salt_call(
            "state.single", f"tproxy.{fun}", f"name={name}", *args, check=False, config_dir=self.config_dir
        )
        assert isinstance(out, dict) and len(out) == 1, out
        return next(iter(out.values()))

    def present(self, **kwargs) -> dict:
        return self.state("present", **kwargs)

    def absent(self, **kwargs) -> dict:
        return self.state("absent", **kwargs)

    # -- kernel state, normalised -------------------------------------------
    def _lines(self, args: list[str]) -> list[str]:
        out = self.host.run(args).stdout
        return [" ".join(line.split()) for line in out.splitlines() if line.strip()]

    def rules(self, v6: bool = False) -> list[str]:
        return self._lines(["ip", *(["-6"] if v6 else []), "rule", "show"])

    def routes(self, table: int = 100, v6: bool = False) -> list[str]:
        args = ["ip", *(["-6"] if v6 else []), "route", "show", "table", str(table)]
        proc = self.host.run(args, check=False)
        if "table does not exist" in proc.stderr:  # an empty table, newer iproute2 says
            return []
        assert proc.returncode == 0, proc.stderr
        return [" ".join(line.split()) for line in proc.stdout.splitlines() if line.strip()]

    def mangle(self, v6: bool = False) -> list[str]:
        lines = self._lines(["ip6tables" if v6 else "iptables", "-w", "-t", "mangle", "-S", "OUTPUT"])
        return [line for line in lines if line.startswith("-A ")]

    def snapshot(self) -> dict:
        return {
            "rules": self.rules(),
            "rules6": self.rules(v6=True),
            "routes": self.routes(),
            "routes6": self.routes(v6=True),
            "mangle": self.mangle(),
            "mangle6": self.mangle(v6=True),
        }

    def ours(self, v6: bool = False) -> list[str]:
        """Our rules (the kernel's own ones left out)."""
        return [r for r in self.rules(v6) if "proto 201" in r]


DEFAULT_RULES = ["0: from all lookup local", "32766: from all lookup main", "32767: from all lookup default"]
DEFAULT_RULES6 = ["0: from all lookup local", "32766: from all lookup main"]
OUR_ROUTE = "local default dev lo proto 201 scope host"
OUR_ROUTE6 = "local default dev lo proto 201 metric 1024 pref medium"


@pytest.fixture
def kernel(netns_host) -> TproxyKernel:
    return TproxyKernel(netns_host)


# -- state behaviour -------------------------------------------------------------------


def test_present_mark(kernel):
    assert kernel.rules() == DEFAULT_RULES
    ret = kernel.present(ports=[4431, 4432])
    assert ret["result"] is True, ret
    assert ret["changes"] == {
        "added": [
            "ip route local 0.0.0.0/0 dev lo table 100 proto 201",
            "ip rule pref 100 fwmark 0x1 lookup 100 proto 201",
            "iptables -t mangle -A OUTPUT -p tcp -m multiport --sports 4431:4432 -m comment "
            "--comment 'mtproxy-formula tproxy: probe' -j MARK --set-xmark 0x1/0xffffffff",
        ]
    }
    assert kernel.rules() == [
        "0: from all lookup local",
        "100: from all fwmark 0x1 lookup 100 proto 201",
        "32766: from all lookup main",
        "32767: from all lookup default",
    ]
    assert kernel.routes() == [OUR_ROUTE]
    assert kernel.mangle() == [_mangle_rule("4431:4432")]
    # IPv6 untouched with family ipv4.
    assert kernel.rules(v6=True) == DEFAULT_RULES6
    assert kernel.routes(v6=True) == []
    assert kernel.mangle(v6=True) == []


def test_present_sport_with_custom_table_and_priority(kernel):
    ret = kernel.present(ports=[4431, 4432, 4434], method="sport", table=1234, priority=900)
    assert ret["result"] is True, ret
    assert kernel.ours() == [
        "900: from all ipproto tcp sport 4431-4432 lookup 1234 proto 201",
        "900: from all ipproto tcp sport 4434 lookup 1234 proto 201",
    ]
    assert kernel.routes(table=1234) == [OUR_ROUTE]
    assert kernel.mangle() == []  # no iptables at all


def test_test_mode_changes_nothing(kernel):
    before = kernel.snapshot()
    ret = kernel.present(ports=[4431, 4432], test=True)
    assert ret["result"] is None, ret
    assert "would be updated" in ret["comment"]
    assert kernel.snapshot() == before
    real = kernel.present(ports=[4431, 4432])
    assert real["changes"] == ret["changes"]  # exactly what test mode announced

    # A port change in test mode lists the swap, still touching nothing.
    before = kernel.snapshot()
    ret = kernel.present(ports=[4431, 4432, 4433, 4434], test=True)
    assert ret["result"] is None
    assert ret["changes"] == {
        "added": [
            "iptables -t mangle -A OUTPUT -p tcp -m multiport --sports 4431:4434 -m comment "
            "--comment 'mtproxy-formula tproxy: probe' -j MARK --set-xmark 0x1/0xffffffff"
        ],
        "removed": [
            "iptables -t mangle -A OUTPUT -p tcp -m multiport --sports 4431:4432 -m comment "
            "--comment 'mtproxy-formula tproxy: probe' -j MARK --set-xmark 0x1/0xffffffff"
        ],
    }
    assert kernel.snapshot() == before

    # absent in test mode too.
    ret = kernel.absent(test=True)
    assert ret["result"] is None
    assert len(ret["changes"]["removed"]) == 3
    assert kernel.snapshot() == before


@pytest.mark.parametrize("method", ["mark", "sport"])
def test_second_run_is_idempotent(kernel, method):
    assert kernel.present(ports=[4431, 4432], method=method, family="both")["result"] is True
    before = kernel.snapshot()
    ret = kernel.present(ports=[4431, 4432], method=method, family="both")
    assert ret["result"] is True
    assert ret["changes"] == {}
    assert "already in place" in ret["comment"]
    assert kernel.snapshot() == before
    # test mode on a host that is in place: True, not None.
    ret = kernel.present(ports=[4431, 4432], method=method, family="both", test=True)
    assert (ret["result"], ret["changes"]) == (True, {})


def test_port_set_change_mark(kernel):
    assert kernel.present(ports=[4431, 4432])["result"] is True
    ret = kernel.present(ports=[4431, 4432, 4433, 4434])
    assert ret["result"] is True
    assert ret["changes"]["added"] == [
        "iptables -t mangle -A OUTPUT -p tcp -m multiport --sports 4431:4434 -m comment "
        "--comment 'mtproxy-formula tproxy: probe' -j MARK --set-xmark 0x1/0xffffffff"
    ]
    assert ret["changes"]["removed"] == [
        "iptables -t mangle -A OUTPUT -p tcp -m multiport --sports 4431:4432 -m comment "
        "--comment 'mtproxy-formula tproxy: probe' -j MARK --set-xmark 0x1/0xffffffff"
    ]
    assert kernel.mangle() == [_mangle_rule("4431:4434")]
    assert kernel.ours() == ["100: from all fwmark 0x1 lookup 100 proto 201"]
    assert kernel.routes() == [OUR_ROUTE]

    ret = kernel.present(ports=[4431, 4432])
    assert ret["result"] is True
    assert len(ret["changes"]["added"]) == len(ret["changes"]["removed"]) == 1
    assert kernel.mangle() == [_mangle_rule("4431:4432")]
    assert kernel.ours() == ["100: from all fwmark 0x1 lookup 100 proto 201"]
    assert kernel.routes() == [OUR_ROUTE]


def test_port_set_change_sport(kernel):
    assert kernel.present(ports=[4431, 4432], method="sport")["result"] is True
    ret = kernel.present(ports=[4431, 4432, 4433, 4434], method="sport")
    assert ret["changes"] == {
        "added": ["ip rule pref 100 ipproto tcp sport 4431-4434 lookup 100 proto 201"],
        "removed": ["ip rule pref 100 ipproto tcp sport 4431-4432 lookup 100 proto 201"],
    }
    assert kernel.ours() == ["100: from all ipproto tcp sport 4431-4434 lookup 100 proto 201"]
    ret = kernel.present(ports=[4431, 4432], method="sport")
    assert ret["changes"] == {
        "added": ["ip rule pref 100 ipproto tcp sport 4431-4432 lookup 100 proto 201"],
        "removed": ["ip rule pref 100 ipproto tcp sport 4431-4434 lookup 100 proto 201"],
    }
    assert kernel.ours() == ["100: from all ipproto tcp sport 4431-4432 lookup 100 proto 201"]
    assert kernel.routes() == [OUR_ROUTE]


def test_method_and_family_switch_leave_nothing_stale(kernel):
    assert kernel.present(ports=[4431, 4432], family="both")["result"] is True
    assert kernel.mangle(v6=True) == [_mangle_rule("4431:4432")]
    ret = kernel.present(ports=[4431, 4432], method="sport")
    assert ret["result"] is True
    assert kernel.ours() == ["100: from all ipproto tcp sport 4431-4432 lookup 100 proto 201"]
    assert kernel.ours(v6=True) == []
    assert kernel.routes(v6=True) == []
    assert kernel.mangle() == kernel.mangle(v6=True) == []
    assert kernel.routes() == [OUR_ROUTE]


def test_more_than_fifteen_multiport_slots_split(kernel):
    ports = list(range(5000, 5040, 2))  # 20 single ports
    ret = kernel.present(ports=ports)
    assert ret["result"] is True, ret
    first, second = (",".join(map(str, ports[:15])), ",".join(map(str, ports[15:])))
    assert kernel.mangle() == [_mangle_rule(first), _mangle_rule(second)]
    assert kernel.present(ports=ports)["changes"] == {}


def test_absent_removes_exactly_ours(kernel):
    host = kernel.host
    clean = kernel.snapshot()
    assert kernel.present(ports=[4431, 4432], family="both")["result"] is True
    ours = {key: set(lines) - set(clean[key]) for key, lines in kernel.snapshot().items()}
    # Foreign state added afterwards, some of it deliberately like ours: same
    # table, same mark, same priority, a comment of another state name.
    host.run(["ip", "rule", "add", "pref", "100", "fwmark", "1", "lookup", "100"])
    host.run(["ip", "rule", "add", "pref", "300", "fwmark", "7", "lookup", "200"])
    host.run(["ip", "route", "add", "local", "10.9.0.0/16", "dev", "lo", "table", "100"])
    host.run(["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "200"])
    host.run([*MANGLE, "--sport", "4431", *SET_MARK_1])
    other = ["-m", "comment", "--comment", "mtproxy-formula tproxy: probe2"]
    host.run([*MANGLE, "-m", "multiport", "--sports", "4431:4432", *other, *SET_MARK_1])
    host.run(["ip", "-6", "rule", "add", "pref", "100", "fwmark", "1", "lookup", "100"])
    mixed = kernel.snapshot()

    ret = kernel.absent()
    assert ret["result"] is True, ret
    assert len(ret["changes"]["removed"]) == 6
    assert kernel.snapshot() == {key: [line for line in lines if line not in ours[key]] for key, lines in mixed.items()}

    ret = kernel.absent()
    assert (ret["result"], ret["changes"]) == (True, {})
    assert "already absent" in ret["comment"]


MANGLE = ["iptables", "-t", "mangle", "-A", "OUTPUT", "-p", "tcp"]
SET_MARK_1 = ["-j", "MARK", "--set-mark", "1"]


def _assert_refused(kernel, names: list[str], **kwargs) -> None:
    """present (real and test mode) fails, naming each foreign item, and changes nothing."""
    before = kernel.snapshot()
    for test in (True, False):
        ret = kernel.present(test=test, **kwargs)
        assert ret["result"] is False, ret
        assert ret["changes"] == {}
        assert "is already used by rules or routes that are not ours (not protocol 201)" in ret["comment"], ret
        for name in names:
            assert name in ret["comment"], ret["comment"]
    assert kernel.snapshot() == before
    assert kernel.ours() == []


def test_foreign_default_route_in_the_table_is_refused(kernel):
    """A multi-WAN host's default route in table 100: the kernel would answer our add with
    EEXIST; present fails naming the route instead of reporting a success without our route."""
    host = kernel.host
    host.run(["ip", "route", "add", "default", "via", host.client_address, "dev", host.host_if, "table", "100"])
    route = f"ip route default via {host.client_address} dev {host.host_if} table 100 proto boot"
    for method in ("mark", "sport"):
        _assert_refused(kernel, [route, "choose another table"], ports=[4431, 4432], method=method)
    assert kernel.routes() == [f"default via {host.client_address} dev {host.host_if}"]
    # Another table is free: that is the way out the comment points to.
    assert kernel.present(ports=[4431, 4432], table=101)["result"] is True
    assert kernel.routes(table=101) == [OUR_ROUTE]


def test_foreign_local_route_in_the_table_is_refused(kernel):
    # Even one that looks like ours: its owner may delete it under us.
    kernel.host.run(["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100"])
    _assert_refused(kernel, ["ip route local default dev lo table 100 proto boot"], ports=[4431], method="sport")


def test_foreign_rule_on_the_mark_is_refused(kernel):
    host = kernel.host
    host.run(["ip", "rule", "add", "fwmark", "1", "lookup", "200"])
    rule = "ip rule pref 32765 fwmark 0x1 lookup 200"
    _assert_refused(kernel, [rule, "choose another table or mark"], ports=[4431, 4432])
    # Method sport uses no mark; mark 2 is free.
    assert kernel.present(ports=[4431, 4432], method="sport")["result"] is True
    assert kernel.present(ports=[4431, 4432], mark=2)["result"] is True
    assert kernel.ours() == ["100: from all fwmark 0x2 lookup 100 proto 201"]


def test_foreign_rule_on_the_table_is_refused(kernel):
    kernel.host.run(["ip", "-6", "rule", "add", "pref", "500", "iif", "eth9", "lookup", "100"])
    _assert_refused(kernel, ["ip -6 rule pref 500 iif eth9 lookup 100"], ports=[4431], method="sport", family="both")
    # The IPv6 rule does not concern an IPv4-only return path.
    assert kernel.present(ports=[4431], method="sport")["result"] is True


def test_foreign_mangle_rule_setting_the_mark_is_refused(kernel):
    host = kernel.host
    host.run([*MANGLE, "--sport", "4431", *SET_MARK_1])
    other = ["-m", "comment", "--comment", "mtproxy-formula tproxy: probe2"]
    host.run([*MANGLE, "--sport", "4432", *other, *SET_MARK_1])
    names = [
        "iptables -t mangle -A OUTPUT -p tcp -m tcp --sport 4431 -j MARK --set-xmark 0x1/0xffffffff",
        '--comment "mtproxy-formula tproxy: probe2" -j MARK --set-xmark 0x1/0xffffffff',
    ]
    _assert_refused(kernel, names, ports=[4431, 4432])


def test_foreign_lists_only_what_is_not_ours(kernel):
    host = kernel.host

    def foreign(*args: str) -> list[str]:
        return host.salt_call("tproxy.foreign", *args, config_dir=kernel.config_dir)

    assert foreign("1", "100") == [] and foreign("1", "100", "family=both") == []  # the kernel's own rules only
    assert kernel.present(ports=[4431, 4432], family="both")["result"] is True
    assert foreign("1", "100", "family=both", "name=probe") == []
    # Our mangle rules are recognised by the state name in their comment.
    assert foreign("1", "100", "family=both", "name=probe2") == [
        f"{tool} -t mangle {_mangle_rule('4431:4432')}" for tool in ("iptables", "ip6tables")
    ]
    assert kernel.present(ports=[4431, 4432], method="sport", table=101)["result"] is True
    assert foreign("mark=None", "table=101", "method=sport") == []

    host.run(["ip", "rule", "add", "pref", "50", "fwmark", "1", "lookup", "200"])
    host.run(["ip", "route", "add", "blackhole", "10.0.0.0/8", "table", "101"])
    assert foreign("1", "101") == [
        "ip rule pref 50 fwmark 0x1 lookup 200",
        "ip route blackhole 10.0.0.0/8 table 101 proto boot",
    ]
    assert foreign("mark=None", "table=101", "method=sport") == ["ip route blackhole 10.0.0.0/8 table 101 proto boot"]
    assert foreign("1", "102") == ["ip rule pref 50 fwmark 0x1 lookup 200"]
    assert foreign("2", "102") == []


def test_watchdog_reports_a_route_it_cannot_restore(kernel, tmp_path):
    """The watchdog's ensure (keep_stale) skips the refusal; the kernel's EEXIST is then
    a success only if our route is there: here a foreign default route took its place."""
    host = kernel.host
    assert kernel.present(ports=[4431], method="sport")["result"] is True
    host.run(["ip", "route", "del", "local", "0.0.0.0/0", "dev", "lo", "table", "100"])
    host.run(["ip", "route", "add", "default", "via", host.client_address, "dev", host.host_if, "table", "100"])
    config = tmp_path / "return-path.json"
    config.write_text(json.dumps({"name": "probe", "ports": [4431], "method": "sport"}))
    script = "import json, sys, tproxy; print(json.dumps(tproxy.watch_once(sys.argv[1], {})))"
    proc = host.run([str(VENV_BIN / "python"), "-c", script, str(config)], env={"PYTHONPATH": str(REPO / "_modules")})
    status = json.loads(proc.stdout.splitlines()[-1])
    assert status["ok"] is False and "repaired" not in status, status
    assert status["error"] == (
        "Cannot add `ip route local 0.0.0.0/0 dev lo table 100 proto 201`: the kernel holds a conflicting entry "
        f"that is not ours: ip route default via {host.client_address} dev {host.host_if} table 100 proto boot"
    )
    assert kernel.routes() == [f"default via {host.client_address} dev {host.host_if}"]


def test_table_and_mark_change_leave_nothing_in_the_old_ones(kernel):
    assert kernel.present(ports=[4431, 4432])["result"] is True
    before = kernel.snapshot()
    ret = kernel.present(ports=[4431, 4432], table=101, test=True)
    assert ret["result"] is None, ret
    assert ret["changes"] == {
        "added": [
            "ip route local 0.0.0.0/0 dev lo table 101 proto 201",
            "ip rule pref 100 fwmark 0x1 lookup 101 proto 201",
        ],
        "removed": [
            "ip rule pref 100 fwmark 0x1 lookup 100 proto 201",
            "ip route local 0.0.0.0/0 dev lo table 100 proto 201",
        ],
    }
    assert kernel.snapshot() == before
    announced = ret["changes"]
    ret = kernel.present(ports=[4431, 4432], table=101)
    assert (ret["result"], ret["changes"]) == (True, announced), ret
    assert kernel.routes(table=100) == []
    assert kernel.routes(table=101) == [OUR_ROUTE]
    assert kernel.ours() == ["100: from all fwmark 0x1 lookup 101 proto 201"]
    assert kernel.present(ports=[4431, 4432], table=101)["changes"] == {}

    ret = kernel.present(ports=[4431, 4432], table=101, mark=2)
    assert ret["result"] is True
    assert kernel.ours() == ["100: from all fwmark 0x2 lookup 101 proto 201"]
    assert kernel.mangle() == [_mangle_rule("4431:4432").replace("0x1/", "0x2/")]

    # absent with the old table still finds ours in the new one (and every other).
    ret = kernel.absent(table=100)
    assert ret["result"] is True and len(ret["changes"]["removed"]) == 3, ret
    assert kernel.snapshot() == {**before, "rules": DEFAULT_RULES, "routes": [], "mangle": []}
    assert kernel.routes(table=101) == []


def test_ipv6(kernel):
    ret = kernel.present(ports=[4431, 4432], family="ipv6")
    assert ret["result"] is True, ret
    assert kernel.ours(v6=True) == ["100: from all fwmark 0x1 lookup 100 proto 201"]
    assert kernel.routes(v6=True) == [OUR_ROUTE6]
    assert kernel.mangle(v6=True) == [_mangle_rule("4431:4432")]
    assert kernel.rules() == DEFAULT_RULES and kernel.routes() == [] and kernel.mangle() == []

    ret = kernel.present(ports=[4431, 4432, 4433], family="ipv6", method="sport")
    assert ret["result"] is True
    assert kernel.ours(v6=True) == ["100: from all ipproto tcp sport 4431-4433 lookup 100 proto 201"]
    assert kernel.mangle(v6=True) == []

    assert kernel.absent(family="ipv6")["result"] is True
    assert kernel.rules(v6=True) == DEFAULT_RULES6
    assert kernel.routes(v6=True) == []


def test_check_and_ensure_for_a_watchdog(kernel):
    """The execution module restores what a firewall reload flushed."""
    host = kernel.host

    def call(*args):
        return host.salt_call(*args, config_dir=kernel.config_dir)

    assert kernel.present(ports=[4431, 4432])["result"] is True
    assert call("tproxy.check", "probe", "ports=[4431, 4432]") == {"ok": True, "missing": [], "stale": []}
    host.run(["iptables", "-t", "mangle", "-F", "OUTPUT"])
    report = call("tproxy.check", "probe", "ports=[4431, 4432]")
    assert report["ok"] is False
    assert len(report["missing"]) == 1 and "--sports 4431:4432" in report["missing"][0]
    assert kernel.mangle() == []
    assert call("tproxy.ensure", "probe", "ports=[4431, 4432]") == {"added": report["missing"]}
    assert kernel.mangle() == [_mangle_rule("4431:4432")]


@pytest.mark.parametrize(
    ("kwargs", "cause"),
    [
        pytest.param({"ports": []}, "No ports given", id="empty-ports"),
        pytest.param({"ports": [4431, 70000]}, "Port must be from 1 to 65535, not 70000", id="port-too-high"),
        pytest.param({"ports": [0]}, "Port must be from 1 to 65535, not 0", id="port-zero"),
        pytest.param({"mark": 0}, "Mark must be from 1 to 4294967295", id="mark-zero"),
        pytest.param({"table": 254}, "Table 254 is the kernel's main table", id="table-main"),
        pytest.param({"table": 4294967296}, "Table must be from 1 to 4294967295", id="table-too-high"),
        pytest.param({"method": "nat"}, "Unknown method 'nat'", id="unknown-method"),
        pytest.param({"family": "inet"}, "Unknown family 'inet'", id="unknown-family"),
        pytest.param(
            {"iptables": "/nonexistent/iptables"}, "The /nonexistent/iptables binary was not found", id="no-iptables"
        ),
    ],
)
def test_errors(kernel, kwargs, cause):
    before = kernel.snapshot()
    args = {"ports": [4431, 4432], **kwargs}
    for test in (False, True):
        ret = kernel.present(test=test, **args)
        assert ret["result"] is False, ret
        assert cause in ret["comment"], ret["comment"]
        assert ret["changes"] == {}
    assert kernel.snapshot() == before


def test_missing_iptables_is_fine_for_method_sport(kernel):
    ret = kernel.present(ports=[4431], method="sport", iptables="/nonexistent/iptables")
    assert ret["result"] is True, ret


def test_error_without_netlink_permission(kernel):
    """Root without CAP_NET_ADMIN: the kernel refuses, the comment says why."""
    host = kernel.host
    cmd = [
        "setpriv",
        "--inh-caps=-net_admin",
        "--bounding-set=-net_admin",
        str(VENV_BIN / "salt-call"),
        "--local",
        "--config-dir",
        str(kernel.config_dir),
        "--out=json",
        "--log-level=quiet",
        "state.single",
        "tproxy.present",
        "name=probe",
        "ports=[4431]",
        "method=sport",
    ]
    proc = host.run(cmd, check=False)
    ret = next(iter(json.loads(proc.stdout)["local"].values()))
    assert ret["result"] is False
    assert (
        "No permission to add `ip route local 0.0.0.0/0 dev lo table 100 proto 201` through netlink" in (ret["comment"])
    )
    assert "CAP_NET_ADMIN" in ret["comment"]
    assert kernel.routes() == [] and kernel.ours() == []


# -- data path: HAProxy usesrc clientip through the return path -------------------------------

BACKEND = """
import socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, port))
srv.listen(16)
while True:
    conn, peer = srv.accept()
    conn.sendall(f"{port} {peer[0]}\\n".encode())
    conn.close()
"""

CLIENT = """
import socket, sys
addr, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(count):
    try:
        with socket.create_connection((addr, port), timeout=5) as conn:
            print(conn.recv(100).decode().strip() or "EMPTY", flush=True)
    except OSError as exc:
        print(f"ERROR {exc}", flush=True)
"""


class DataPath:
    """HAProxy (usesrc clientip) and two peer-reporting backends in the host namespace."""

    def __init__(self, host: TestHost, workdir: Path):
        self.host = host
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen:
        out = open(self.workdir / log, "wb")  # noqa: SIM115 (the child keeps it)
        # nsenter execs the command (a net namespace needs no fork): the PID is the process's own.
        proc = subprocess.Popen(
            self.host.nsenter() + args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        out.close()
        self.procs.append(proc)
        return proc

    def _wait_listening(self, addr: str, port: int) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            out = self.host.run(["ss", "-Hltn", f"sport = :{port}"]).stdout
            if f"{addr}:{port}" in out:
                return
            for proc in self.procs:
                assert proc.poll() is None, f"a data-path process exited: {self.logs()}"
            time.sleep(0.05)
        raise AssertionError(f"nothing listens on {addr}:{port}: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"{p.name}: {p.read_text()[-2000:]}" for p in sorted(self.workdir.glob("*.log")))

    def start(self, backend_addr: str, ports: list[int]) -> None:
        (self.workdir / "backend.py").write_text(BACKEND)
        backend = ["/usr/bin/python3", str(self.workdir / "backend.py"), backend_addr]
        for port in ports:
            self._spawn([*backend, str(port)], f"be{port}.log")
        servers = "\n".join(f"    server s{port} {backend_addr}:{port}" for port in ports)
        config = self.workdir / "haproxy.cfg"
        # Runs as root (no `user`): usesrc clientip needs the privileges.
        config.write_text(
            f"""global
    maxconn 64

defaults
    mode tcp
    timeout connect 1s
    timeout client 5s
    timeout server 5s
    retries 1

frontend fe
    bind {self.host.address}:{FRONTEND_PORT}
    default_backend be

backend be
    balance roundrobin
    source 0.0.0.0 usesrc clientip
{servers}
"""
        )
        self._spawn([HAPROXY, "-db", "-f", str(config)], "haproxy.log")
        for port in ports:
            self._wait_listening(backend_addr, port)
        self._wait_listening(self.host.address, FRONTEND_PORT)

    def connect(self, count: int) -> list[str]:
        (self.workdir / "client.py").write_text(CLIENT)
        out = self.host.client_run(
            ["/usr/bin/python3", str(self.workdir / "client.py"), self.host.address, str(FRONTEND_PORT), str(count)],
            timeout=60,
        ).stdout
        return out.splitlines()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture
def datapath(netns_host, tmp_path):
    path = DataPath(netns_host, tmp_path)
    yield path
    path.stop()


@pytest.mark.parametrize(
    ("method", "backend"),
    [("mark", "host"), ("sport", "host"), ("sport", "127.0.0.1")],
    ids=["mark-host-address", "sport-host-address", "sport-loopback"],
)
def test_datapath_backends_see_the_client(kernel, datapath, method, backend):
    host = kernel.host
    backend_addr = host.address if backend == "host" else backend
    ports = [4431, 4432]
    datapath.start(backend_addr, ports)

    # Without the return path the backends' replies leave the host: nothing comes back.
    assert datapath.connect(2) == ["EMPTY", "EMPTY"], datapath.logs()

    assert kernel.present(ports=ports, method=method)["result"] is True
    replies = datapath.connect(4)
    assert sorted(replies) == sorted(f"{port} {host.client_address}" for port in ports * 2), datapath.logs()

    # And it is the state that made the difference: gone again after absent.
    assert kernel.absent()["result"] is True
    assert datapath.connect(1) == ["EMPTY"]


def test_datapath_mark_does_not_reach_loopback_backends(kernel, datapath):
    """docs/measurements.md §2: a 127.0.0.1 source is routed before mangle OUTPUT marks it; method sport is the fix."""
    datapath.start("127.0.0.1", [4431, 4432])
    assert kernel.present(ports=[4431, 4432], method="mark")["result"] is True
    assert datapath.connect(1) == ["EMPTY"]
    assert kernel.present(ports=[4431, 4432], method="sport")["result"] is True
    assert sorted(datapath.connect(2)) == [f"4431 {kernel.host.client_address}", f"4432 {kernel.host.client_address}"]


def test_sls_with_watch(kernel, tmp_path):
    """In an SLS, with a ``watch`` that fires: the state converges as it does
    without one (no mod_watch: present already restores whatever is missing)."""
    (tmp_path / "tp.sls").write_text(
        """
Something the return path watches changed:
  test.succeed_with_changes

Replies of the replicas return to HAProxy:
  tproxy.present:
    - name: probe
    - ports: [4431, 4432]
    - method: sport
    - watch:
      - test: Something the return path watches changed
"""
    )
    config_dir = kernel.host.minion_config(
        module_dirs=[str(REPO / "_modules")], states_dirs=[str(REPO / "_states")], file_roots={"base": [str(tmp_path)]}
    )
    out = kernel.host.salt_call("state.apply", "tp", config_dir=config_dir)
    ret = next(v for k, v in out.items() if k.startswith("tproxy_"))
    assert ret["result"] is True, ret
    assert ret["changes"] == {
        "added": [
            "ip route local 0.0.0.0/0 dev lo table 100 proto 201",
            "ip rule pref 100 ipproto tcp sport 4431-4432 lookup 100 proto 201",
        ]
    }
    assert kernel.ours() == ["100: from all ipproto tcp sport 4431-4432 lookup 100 proto 201"]
    assert kernel.routes() == [OUR_ROUTE]

    # Again, with the watched state changing again: nothing left to do.
    out = kernel.host.salt_call("state.apply", "tp", config_dir=config_dir)
    ret = next(v for k, v in out.items() if k.startswith("tproxy_"))
    assert (ret["result"], ret["changes"]) == (True, {}), ret
    assert "already in place" in ret["comment"]
