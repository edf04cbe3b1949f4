"""Foreign routing state (issue 16), with real parts in a test host: a
``tproxy:table`` or ``tproxy:mark`` that rules or routes not of this formula
use is refused at render, before anything changes, naming what uses it; a
table change on a live cell moves the return path and leaves nothing of ours
in the old table. The tests share one host and run in file order: first on
the empty host, then on a deployed cell.

Load: test/cell.py ``Load`` (20 new connections/s plus 40 long-lived ones)
during the table change; its failed-connection counts are printed (``-s``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cell import (
    HOLD,
    Load,
    apply,
    assert_cell_serves,
    changed,
    containers,
    ip_rules,
    mangle_output,
    table_routes,
)
from cell import held_clients_pillar as cell_pillar

pytestmark = pytest.mark.integration

REPLICAS = 2


def files(pillar: dict) -> dict[str, list[str]]:
    """What exists at each path the formula writes to (folders listed)."""
    settings = pillar["mtproxy"]
    paths = [settings[key] for key in ("config_dir", "run_dir", "sysctl_config", "secret_file")]
    paths.append(settings["boot"]["unit_dir"])
    return {
        p: sorted(str(f) for f in Path(p).rglob("*")) if Path(p).is_dir() else [str(Path(p).exists())] for p in paths
    }


def snapshot(host, pillar: dict) -> dict:
    return {
        "containers": containers(host),
        "rules": ip_rules(host),
        "rules6": host.run(["ip", "-6", "rule", "show"]).stdout,
        "table100": table_routes(host, 100),
        "table101": table_routes(host, 101),
        "mangle": mangle_output(host),
        "files": files(pillar),
    }


def assert_refused_at_render(result, names: list[str], key: str) -> str:
    """The apply failed at render (no state ran), naming the pillar key and each foreign item."""
    text = json.dumps(result)
    assert not isinstance(result, dict) or not any("__id__" in v for v in result.values()), text[:5000]
    assert f"mtproxy:{key}" in text, text[:5000]
    for name in names:
        assert name in text, text[:5000]
    return text


@pytest.fixture(scope="module")
def host(testhost):
    return testhost


def foreign_items(host) -> list[tuple[list[str], str, str]]:
    """(`ip` arguments adding it, how the refusal names it, the pillar key refused)."""
    via = ["via", host.client_address, "dev", host.host_if]
    return [
        (
            # A multi-WAN host's second uplink: our route would meet EEXIST.
            ["route", "add", "default", *via, "table", "100"],
            f"ip route default via {host.client_address} dev {host.host_if} table 100 proto boot",
            "tproxy:table",
        ),
        (
            ["rule", "add", "fwmark", "1", "lookup", "200"],
            "ip rule pref 32765 fwmark 0x1 lookup 200",
            "tproxy:mark",
        ),
    ]


@pytest.mark.parametrize("which", [0, 1], ids=["default-route-in-table-100", "rule-on-fwmark-1"])
def test_foreign_routing_refused_before_deploy(host, which):
    add, name, key = foreign_items(host)[which]
    pillar = cell_pillar(host, replicas=REPLICAS)
    host.run(["ip", *add])
    try:
        before = snapshot(host, pillar)
        assert before["containers"] == {}
        for test in (True, False):
            result = apply(host, pillar, test=test, check=False)
            assert_refused_at_render(result, [name], key)
        after = snapshot(host, pillar)
        assert after == before
        assert "proto 201" not in after["rules"] and "mtproxy-formula" not in after["mangle"], after
    finally:
        host.run(["ip", add[0], "del", *add[2:]])


def test_deploys_once_the_foreign_routing_is_gone(host):
    pillar = cell_pillar(host, replicas=REPLICAS)
    apply(host, pillar)
    assert_cell_serves(host, pillar, REPLICAS)
    assert "fwmark 0x1 lookup 100 proto 201" in ip_rules(host)
    assert "local default dev lo proto 201" in table_routes(host, 100)


def test_live_table_change_to_a_used_table_is_refused(host):
    pillar = cell_pillar(host, replicas=REPLICAS)
    host.run(["ip", "route", "add", "blackhole", "10.0.0.0/8", "table", "101"])
    try:
        before = snapshot(host, pillar)
        result = apply(host, cell_pillar(host, replicas=REPLICAS, tproxy={"table": 101}), check=False)
        assert_refused_at_render(result, ["ip route blackhole 10.0.0.0/8 table 101 proto boot"], "tproxy:table")
        assert snapshot(host, pillar) == before
    finally:
        host.run(["ip", "route", "del", "blackhole", "10.0.0.0/8", "table", "101"])
    assert_cell_serves(host, pillar, REPLICAS)


def test_live_table_change_moves_the_return_path(host):
    pillar = cell_pillar(host, replicas=REPLICAS, tproxy={"table": 101})
    assert changed(apply(host, pillar, test=True))  # announced...
    assert "proto 201" in table_routes(host, 100) and table_routes(host, 101) == ""  # ...not done
    load = Load(host)
    try:
        time.sleep(1)
        result = apply(host, pillar)
        time.sleep(HOLD)
    finally:
        report = load.stop() if load.proc.poll() is None else {}
        load.kill()
    print("\ntable 100 -> 101:", json.dumps({"new": report["new"], "long": report["long"]}))
    assert report["new"]["attempted"] > 0
    assert report["new"]["failed"] == 0, report["new"]
    assert report["long"]["failed"] == 0, report["long"]
    assert report["long"]["survived"] == report["long"]["wanted"], report["long"]
    removed = [line for changes in changed(result).values() for line in (changes or {}).get("removed", [])]
    assert "ip route local 0.0.0.0/0 dev lo table 100 proto 201" in removed, changed(result)
    # Nothing of ours is left in table 100; the rule looks up 101.
    assert table_routes(host, 100) == ""
    assert "local default dev lo proto 201" in table_routes(host, 101)
    rules = [line for line in ip_rules(host).splitlines() if "proto 201" in line]
    assert rules == ["100:\tfrom all fwmark 0x1 lookup 101 proto 201"], ip_rules(host)
    assert_cell_serves(host, pillar, REPLICAS)
    assert changed(apply(host, pillar)) == {}
