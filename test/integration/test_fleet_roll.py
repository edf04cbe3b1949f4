"""Fleet roll (issue 22): the orchestration mtproxy.orchestrate.rolling, run by a
real salt-master over two real salt-minions, each minion in a test host with
its own dockerd and cell.

- A change rolls host by host: host 2's change starts only after host 1's
  cell serves the new way, and while the roll runs a client load against
  each cell never sees both cells failing at the same moment.
- A change that breaks the first host stops the roll there: the second host
  is untouched (same containers, same files, same rules) and serving.

The master probes each cell's frontend over its link to the host (routes to
the hosts' client-facing addresses are set in the master's namespace).
Wall times are printed (`-s` shows them), never asserted.
"""

from __future__ import annotations

import datetime
import json
import threading
import time

import pytest
from cell import (
    BASE_PORT,
    Load,
    assert_cell_serves,
    containers,
    held_clients_pillar,
    host_snapshot,
    replica_peers,
    servers,
    timed,
)
from saltdaemons import salt_cluster
from testhost import LINK_NETWORK, NETWORK

pytestmark = pytest.mark.integration

ROLL = "mtproxy.orchestrate.rolling"
ABSENT_IMAGE = "mtproxy-formula/absent:local"


@pytest.fixture(scope="module")
def fleet(make_testhost):
    """Two cells of 2 replicas deployed through the master; the master routes to
    each host's client-facing address over its link."""
    with salt_cluster(make_testhost, held_clients_pillar) as (master, hosts, pillars):
        for host in hosts:
            via = f"{LINK_NETWORK}.{host.index}.2"
            master.host.run(["ip", "route", "add", f"{NETWORK}.{host.index}.0/24", "via", via])
        master.salt("*", "saltutil.sync_all")
        returns = master.salt("*", "state.apply", "mtproxy", timeout=600)
        for host in hosts:
            assert isinstance(returns.get(host.name), dict), returns
            assert_cell_serves(host, pillars[host.name], 2, connections=6)
        yield master, hosts


def roll(master, *args: str) -> tuple[int, dict]:
    """``salt-run state.orchestrate mtproxy.orchestrate.rolling ARGS``: its exit code
    and its states by ID (each with ``__run_num__``, ``result``, ``comment``)."""
    code, out = timed(f"roll {' '.join(args)}", master.salt_run, "state.orchestrate", ROLL, *args)
    print(f"  exit {code}")
    results = next(iter(out["data"].values()))
    assert isinstance(results, dict), json.dumps(out)[:5000]
    states = {v["__id__"]: v for v in results.values()}
    for state_id, state in sorted(states.items(), key=lambda s: s[1]["__run_num__"]):
        print(f"  {state['duration'] / 1000:7.1f} s  {state['result']!s:5}  {state_id}")
    return code, states


def apply_id(host) -> str:
    return f"mtproxy is applied on {host.name}"


def serves_id(host) -> str:
    return f"Cell on {host.name} serves"


def created(host, name: str) -> float:
    """When container ``name`` was created, as a Unix time."""
    text = host.docker("inspect", "-f", "{{.Created}}", name).stdout.strip()
    seconds, _, fraction = text.rstrip("Z").partition(".")
    stamp = datetime.datetime.fromisoformat(seconds).replace(tzinfo=datetime.UTC)
    return stamp.timestamp() + float("0." + (fraction or "0"))


class Watch:
    """Polls each cell's HAProxy (admin socket) until stopped: per host, the Unix
    times at which it had how many replicas UP after a real check."""

    def __init__(self, hosts: list, pillars: dict):
        self.hosts, self.pillars = hosts, pillars
        self.seen: dict[str, list[tuple[float, int]]] = {h.name: [] for h in hosts}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            for host in self.hosts:
                try:
                    rows = servers(host, self.pillars[host.name])
                    up = sum(r["status"] == "UP" and r["check_status"].startswith("L4OK") for r in rows.values())
                except Exception:  # an unreadable socket counts as nothing UP
                    up = 0
                self.seen[host.name].append((time.time(), up))
            time.sleep(0.2)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=30)

    def first(self, host, up: int) -> float:
        """The first time ``host`` was seen with ``up`` replicas UP."""
        return next(t for t, n in self.seen[host.name] if n >= up)


def test_a_change_rolls_host_by_host_with_a_cell_serving_throughout(fleet):
    master, (one, two) = fleet
    wanted = {h.name: held_clients_pillar(h, replicas=3) for h in (one, two)}
    master.set_pillar(wanted)
    before = {h.name: containers(h) for h in (one, two)}

    # test=True: each host's apply says what it would change, nothing changes.
    code, states = roll(master, "test=True")
    assert code == 0, states
    for host in (one, two):
        assert states[apply_id(host)]["result"] is None, states[apply_id(host)]
        assert host.name in states[apply_id(host)]["changes"]["ret"], states[apply_id(host)]
        assert containers(host) == before[host.name]

    loads = [Load(h, rate=10, long=10) for h in (one, two)]
    watch = Watch([one, two], wanted)
    try:
        code, states = roll(master)
    finally:
        watch.stop()
        reports = [load.stop(settle=1) for load in loads]
    for host, report in zip((one, two), reports, strict=True):
        new, long = report["new"], report["long"]
        print(f"  load on {host.name}: new {new['failed']} failed of {new['attempted']}, long {long['failed']} failed")
    assert code == 0, json.dumps(states, indent=1)[:5000]
    assert all(s["result"] is True for s in states.values()), states

    # In order: host 1 applied and serving, then host 2.
    order = [apply_id(one), serves_id(one), f"Modules on {two.name} are synced from the master", apply_id(two)]
    runs = [states[i]["__run_num__"] for i in (*order, serves_id(two))]
    assert runs == sorted(runs), runs
    one_serving = watch.first(one, 3)
    assert created(one, "mtproxy_3") < one_serving < created(two, "mtproxy_3")
    print(f"  host 2's change started {created(two, 'mtproxy_3') - one_serving:.1f} s after host 1 served 3 replicas")

    # At every moment one cell served: the cells never failed a new connection in
    # the same second, and HAProxy never had both cells without a replica UP.
    fails = [report["new"]["failed_at"] for report in reports]
    assert not [(a, b) for a in fails[0] for b in fails[1] if abs(a - b) < 1], fails
    seen = [watch.seen[h.name] for h in (one, two)]
    for at, up in seen[0]:
        other = [n for t, n in seen[1] if abs(t - at) < 0.5]
        assert up or any(other), f"no cell had a replica UP around {at}"

    for host in (one, two):
        assert_cell_serves(host, wanted[host.name], 3, connections=6)

    # A second roll changes nothing on either host.
    code, states = roll(master)
    assert code == 0
    for host in (one, two):
        assert states[apply_id(host)]["changes"] == {}, states[apply_id(host)]


def test_a_change_that_breaks_the_first_host_stops_the_roll(fleet):
    master, (one, two) = fleet
    good = {h.name: held_clients_pillar(h, replicas=3) for h in (one, two)}
    master.set_pillar(good)
    untouched = host_snapshot(two, good[two.name])
    # An image no host has (and no registry to pull it from), for every host.
    bad = {"mtproxy_roll": {"targets": [one.name, two.name], "pillar": {"mtproxy": {"image": ABSENT_IMAGE}}}}
    code, states = roll(master, "pillar=" + json.dumps(bad))

    assert code != 0
    assert states[apply_id(one)]["result"] is False
    assert one.name in states[apply_id(one)]["comment"]
    stop = states[f"The roll stops at {one.name} when it fails there"]
    assert stop["result"] is False
    assert f"stopped at {one.name}" in stop["comment"] and f"Not touched: {two.name}." in stop["comment"]
    # Nothing ran on host 2: no sync, no apply, no probe.
    for state_id in (f"Modules on {two.name} are synced from the master", apply_id(two), serves_id(two)):
        assert states[state_id]["result"] is False and "requisite failed" in states[state_id]["comment"]
        assert states[state_id]["changes"] == {}, states[state_id]
    assert host_snapshot(two, good[two.name]) == untouched
    assert_cell_serves(two, good[two.name], 3, connections=6)
    # The first host still serves: its rollout halted at the first replica, which
    # it had drained (no image to replace it with); the others take the clients.
    assert not any(c["image"] == ABSENT_IMAGE for c in containers(one).values())
    rows = servers(one, good[one.name])
    assert [rows[n]["status"] for n in ("mtproxy_2", "mtproxy_3")] == ["UP", "UP"], rows
    peers = replica_peers(one, [BASE_PORT + 1, BASE_PORT + 2], connections=6)
    assert sum(len(p) for p in peers.values()) == 6, peers

    # Without the bad pillar the roll goes through: host 1 takes its replica back.
    code, states = roll(master)
    assert code == 0, states
    back = states[apply_id(one)]["changes"]["ret"][one.name]
    assert any(s["__id__"] == "Replica mtproxy_1 is back in HAProxy" and s["changes"] for s in back.values())
    assert states[apply_id(two)]["changes"] == {}
    for host in (one, two):
        assert_cell_serves(host, good[host.name], 3, connections=6)


def test_a_cell_that_does_not_serve_fails_its_wait_naming_the_host(fleet):
    master, (one, _) = fleet
    # Nothing listens on port 1 of the host: the master's probe is refused.
    code, out = master.salt_run("mtproxy_fleet.wait_serving", one.name, "port=1", "timeout=5")
    assert code == 1, out
    assert out["serving"] is False
    assert f"the cell on {one.name} does not serve" in out["Error"] and "refused" in out["Error"], out
