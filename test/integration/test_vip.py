"""Floating addresses between two cells (mtproxy.vip, issue 22).

Two test hosts, each with a cell and keepalived, and a client share one
Ethernet segment (testhost.Segment: a bridge in a namespace of its own).
Each host owns one virtual address and backs up the other's. When host A's
cell stops serving, or its cable is pulled, A's address moves to B, and new
connections to it succeed through B's cell with the client's own address
kept; when A is back, it takes its address back once (no flapping). The
measured times are printed (`-s`); the test asserts only wide bounds. The
tests share the two cells, in file order.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from cell import (
    BASE_PORT,
    KEEPALIVED,
    apply,
    changed,
    containers,
    holds,
    peers_through,
    vip_addresses,
    vip_move,
    vip_pillar,
    vrrp_transitions,
    wait_held,
)
from testhost import Segment, TestHost

pytestmark = pytest.mark.integration

# mtproxy includes mtproxy.vip: vip:enabled is the one switch.
SLS = "mtproxy"
PASSWORD = "Vr7.pw-x"
# A wide bound: the failover takes seconds (keepalived's check and adverts).
BOUND = 30.0


@dataclass
class Pair:
    a: TestHost
    b: TestHost
    segment: Segment
    pillars: dict[str, dict]
    results: list[dict]

    @property
    def vip_a(self) -> str:
        return self.segment.address(201)

    @property
    def vip_b(self) -> str:
        return self.segment.address(202)

    @property
    def client(self) -> list[str]:
        return self.segment.switch.nsenter(client=True)

    def pillar(self, host: TestHost) -> dict:
        return self.pillars[host.name]


@pytest.fixture(scope="module")
def pair(make_testhost, segment):
    a, b = make_testhost(), make_testhost()
    for host in (a, b):
        segment.join(host)
    addresses = vip_addresses(segment, [a, b])
    pillars = {h.name: vip_pillar(h, segment.ifname, addresses, vip={"password": PASSWORD}) for h in (a, b)}
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda h: apply(h, pillars[h.name], sls=SLS), (a, b)))
    yield Pair(a, b, segment, pillars, results)
    for host in (a, b):
        host.stop()


def assert_client_kept(pair: Pair, host: TestHost, address: str) -> None:
    """New connections to ``address`` reach ``host``'s replicas, which see the client's own address."""
    ports = [BASE_PORT, BASE_PORT + 1]
    peers = peers_through(host, ports, pair.client, address, connections=10)
    seen = {peer for port in ports for peer in peers[port]}
    assert sum(len(p) for p in peers.values()) == 10, peers
    assert seen == {pair.segment.client_address}, peers


def instance(router_id: int) -> str:
    return f"mtproxy_{router_id}"


def test_each_host_holds_its_own_address(pair):
    wait_held(pair.a, pair.vip_a)
    wait_held(pair.b, pair.vip_b)
    assert not holds(pair.a, pair.vip_b) and not holds(pair.b, pair.vip_a)
    assert_client_kept(pair, pair.a, pair.vip_a)
    assert_client_kept(pair, pair.b, pair.vip_b)


def test_second_apply_and_test_mode_change_nothing(pair):
    assert changed(apply(pair.a, pair.pillar(pair.a), sls=SLS, test=True)) == {}
    assert changed(apply(pair.a, pair.pillar(pair.a), sls=SLS)) == {}


def test_password_is_kept_out_of_every_output(pair):
    config = pair.a.workdir / "etc-mtproxy" / "keepalived" / "keepalived.conf"
    assert PASSWORD in config.read_text(), "the VRRP password is not in keepalived's config"
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    for host, result in zip((pair.a, pair.b), pair.results, strict=True):
        outputs = {
            "state output": json.dumps(result),
            "minion log": (host.salt_dir / "minion.log").read_text(errors="replace"),
            "docker inspect": host.docker("inspect", KEEPALIVED).stdout,
            "keepalived log": "".join(vars(host.docker("logs", KEEPALIVED))[k] for k in ("stdout", "stderr")),
            "ps": host.run(["ps", "-eo", "args"]).stdout,
        }
        leaked = [name for name, text in outputs.items() if PASSWORD in text]
        assert not leaked, f"the VRRP password shows in {leaked} of {host.name}"


def move_and_return(pair: Pair, cut, restore, label: str) -> dict:
    """Cut host A, check clients through B while B holds A's address, restore A
    (cell.vip_move); A takes its address back once."""

    def while_moved() -> None:
        # New connections to A's address: through B's cell, client address kept.
        assert_client_kept(pair, pair.b, pair.vip_a)
        assert holds(pair.b, pair.vip_b), "B lost its own address"

    figures = vip_move(pair.a, pair.b, pair.client, pair.vip_a, cut, restore, while_moved, timeout=BOUND)
    print(f"\nvip {label}: {json.dumps(figures)}")
    assert figures["clients_back_s"] is not None and figures["clients_back_s"] < BOUND, figures
    # One move back: each host enters MASTER for A's address at most once,
    # and B never lets go of its own.
    for host in (pair.a, pair.b):
        moves = figures["transitions_on_return"][host.name]
        masters = [state for name, state in moves if name == instance(51) and state == "MASTER"]
        assert len(masters) <= 1, f"{host.name} flapped: {moves}"
    assert (instance(52), "BACKUP") not in figures["transitions_on_return"][pair.b.name]
    assert holds(pair.a, pair.vip_a) and holds(pair.b, pair.vip_b)
    return figures


def test_a_cell_that_stops_serving_gives_its_address_to_the_peer(pair):
    move_and_return(
        pair,
        cut=lambda: pair.a.docker("stop", "mtproxy_haproxy"),
        restore=lambda: pair.a.docker("start", "mtproxy_haproxy"),
        label="cell stopped",
    )


def test_a_cut_link_moves_the_address_and_it_comes_back_once(pair):
    move_and_return(
        pair,
        cut=lambda: pair.segment.set_link(pair.a, up=False),
        restore=lambda: pair.segment.set_link(pair.a, up=True),
        label="link cut",
    )


def test_links_name_the_virtual_addresses(pair):
    # As an operator runs it: the pillar from the host's pillar files.
    pair.a.write_pillar(pair.pillar(pair.a))
    links = pair.a.salt_call("mtproxy.links")
    servers = {urllib.parse.parse_qs(urllib.parse.urlparse(link["tg"]).query)["server"][0] for link in links}
    assert servers == {pair.vip_a, pair.vip_b}


def test_an_unknown_interface_is_refused_before_anything_changes(pair):
    config = pair.a.workdir / "etc-mtproxy" / "keepalived" / "keepalived.conf"
    before = config.read_text()
    pillar = json.loads(json.dumps(pair.pillar(pair.a)))
    pillar["mtproxy"]["vip"]["interface"] = "nosuch0"
    result = apply(pair.a, pillar, sls="mtproxy.vip", check=False)
    assert "Pillar mtproxy:vip:interface is 'nosuch0': this host has no such interface" in json.dumps(result)
    assert config.read_text() == before


def test_a_config_change_reloads_keepalived_in_place(pair):
    before = containers(pair.a)[KEEPALIVED]["id"]
    pillar = json.loads(json.dumps(pair.pillar(pair.a)))
    pillar["mtproxy"]["vip"]["check_interval"] = 2
    config = pair.a.workdir / "etc-mtproxy" / "keepalived" / "keepalived.conf"
    before_text = config.read_text()
    # test=True says what would change, and changes nothing.
    would = changed(apply(pair.a, pillar, sls="mtproxy.vip", test=True))
    assert "Keepalived config is valid and in place" in json.dumps(would)
    assert config.read_text() == before_text
    since = time.time()
    result = apply(pair.a, pillar, sls="mtproxy.vip")
    assert "Keepalived config is valid and in place" in json.dumps(changed(result))
    assert containers(pair.a)[KEEPALIVED]["id"] == before, "keepalived was recreated, not reloaded"
    time.sleep(3.0)
    assert "interval 2" in config.read_text()
    logs = pair.a.docker("logs", "--since", f"{since:.3f}", KEEPALIVED)
    assert "Reload" in logs.stdout + logs.stderr, "keepalived did not reload"
    assert vrrp_transitions(pair.a, since) == [], "a reload moved an address"
    assert holds(pair.a, pair.vip_a) and holds(pair.b, pair.vip_b)


def test_clean_removes_it_and_the_peer_takes_the_address(pair):
    apply(pair.b, pair.pillar(pair.b), sls="mtproxy.clean")
    assert KEEPALIVED not in containers(pair.b)
    assert not (pair.b.workdir / "etc-mtproxy" / "keepalived").exists()
    assert not holds(pair.b, pair.vip_b)
    took = wait_held(pair.a, pair.vip_b, timeout=BOUND)
    print(f"\nvip: after mtproxy.clean on B, A held B's address within {took:.2f} s")
