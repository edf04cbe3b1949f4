"""Zero-drop operations under load (issue 6): a replica that dies costs no new
connection and comes back by itself; a scale-down drains the replicas it
removes and says how many sessions they still had.

Load comes from the client namespace (test/loadgen.py as a subprocess): about
20 new connections/s plus 40 long-lived ones. The replicas are real
mtprotoproxy processes, which accept a connection and wait silently for a
handshake; loadgen therefore runs connect-only (``--no-echo --hold``): a new
connection must stay open and silent for ``HOLD`` seconds (HAProxy closes the
client side when it finds no server), a long-lived one for the whole run. The
cell gets a long handshake timeout so that the replicas themselves keep idle
clients.

Measured numbers are printed (run with ``-s``), never asserted as timings.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest
from cell import (
    HOLD,
    LONG,
    Load,
    apply,
    changed,
    containers,
    held_clients_pillar,
    servers,
    wait_servers_up,
    wait_status,
)

pytestmark = pytest.mark.integration

KILLS = ("mtproxy_1", "mtproxy_2", "mtproxy_1")


def container_info(host, name: str) -> dict:
    out = host.docker("inspect", "--format", "{{json .State}}|{{.RestartCount}}", name).stdout.strip()
    state, restarts = out.rsplit("|", 1)
    return {**json.loads(state), "RestartCount": int(restarts)}


@pytest.fixture(scope="module")
def cell(testhost):
    pillar = held_clients_pillar(testhost)
    apply(testhost, pillar)
    wait_servers_up(testhost, pillar, ["mtproxy_1", "mtproxy_2"])
    return testhost, pillar


def test_killed_replica_costs_no_new_connection_and_comes_back(cell):
    host, pillar = cell
    measured = []
    for victim in KILLS:
        wait_servers_up(host, pillar, ["mtproxy_1", "mtproxy_2"])
        before = container_info(host, victim)
        load = Load(host)
        try:
            time.sleep(1)
            # A crash: SIGKILL to the container's init. (After `docker kill`, the
            # replica stayed down in our runs: Docker took it for a manual stop.)
            host.run(["kill", "-KILL", str(before["Pid"])])
            # From here on the replica is dead: whatever connects now is "new".
            killed_wall = time.time()
            killed_at = time.monotonic()
            wait_status(host, pillar, victim, "DOWN")
            down_after = time.monotonic() - killed_at
            # The restart policy brings it back, HAProxy's checks take it in again.
            try:
                wait_servers_up(host, pillar, ["mtproxy_1", "mtproxy_2"], timeout=60)
            except AssertionError as exc:
                raise AssertionError(f"{exc}; container: {container_info(host, victim)}") from exc
            up_after = time.monotonic() - killed_at
            after = container_info(host, victim)
            assert after["Running"] and after["RestartCount"] > before["RestartCount"], after
            # ...and it gets clients again (leastconn prefers the empty server).
            stot = int(servers(host, pillar)[victim]["stot"])
            time.sleep(1.5)
            assert int(servers(host, pillar)[victim]["stot"]) > stot
            time.sleep(HOLD)
        finally:
            report = load.stop() if load.proc.poll() is None else {}
            load.kill()
        # A connection open on the victim when it died is cut with it (its
        # client reconnects); a new one must never fail for want of a server.
        failed_after = [t for t in report["new"]["failed_started"] if t >= killed_wall]
        cut = len(report["new"]["failed_started"]) - len(failed_after)
        measured.append(
            {
                "victim": victim,
                "failed_new_after_kill": len(failed_after),
                "open_on_victim_cut": cut,
                "down_seen_after_s": round(down_after, 2),
                "up_after_s": round(up_after, 2),
                "new": report["new"],
                "long": {k: report["long"][k] for k in ("opened", "failed", "survived", "errors")},
            }
        )
        print("\nfailover:", json.dumps(measured[-1]))
        assert report["new"]["attempted"] > 0
        assert failed_after == [], report["new"]
        # The long-lived connections on the surviving replica survive.
        assert report["long"]["survived"] > 0, report["long"]


class ServerWatch:
    """Polls HAProxy in a thread while an apply runs. :attr:`fewest_up` is the
    lowest number of UP replicas seen; :attr:`drain_stot` holds, for each
    server seen in DRAIN, its total sessions when first and last seen so."""

    def __init__(self, host, pillar):
        self.host, self.pillar = host, pillar
        self.fewest_up: int | None = None
        self.polls = 0
        self.drain_stot: dict[str, list[int]] = {}
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._poll()
        except BaseException as exc:  # stop() re-raises it: a dead watcher must not pass quietly
            self.error = exc

    def _poll(self) -> None:
        while not self.done.is_set():
            try:
                rows = servers(self.host, self.pillar)
            except (subprocess.SubprocessError, OSError):
                time.sleep(0.05)
                continue  # a socket mid-reload: the next poll tells
            up = sum(1 for row in rows.values() if row["status"] == "UP")
            self.fewest_up = up if self.fewest_up is None else min(self.fewest_up, up)
            for name, row in rows.items():
                if row["status"].startswith("DRAIN"):
                    seen = self.drain_stot.setdefault(name, [int(row["stot"])] * 2)
                    seen[1] = int(row["stot"])
            self.polls += 1
            time.sleep(0.05)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=10)
        if self.error:
            raise self.error


def test_scale_down_drains_the_removed_replicas_and_reports_what_was_left(cell):
    host, _ = cell
    four = held_clients_pillar(host, replicas=4)
    apply(host, four)
    wait_servers_up(host, four, ["mtproxy_1", "mtproxy_2", "mtproxy_3", "mtproxy_4"])
    two = held_clients_pillar(host, replicas=2)
    load = Load(host)
    watch = None
    try:
        time.sleep(1)
        on_removed = {n: int(servers(host, four)[n]["scur"]) for n in ("mtproxy_3", "mtproxy_4")}
        assert all(on_removed.values()), f"no long-lived connection on a replica to remove: {on_removed}"
        # test=True only announces the drains: the replicas keep serving.
        would = changed(apply(host, two, test=True))
        for name in on_removed:
            assert would[f"Extra replica {name} is drained"] == {"state": {"old": "ready", "new": "drain"}}, would
        assert {n: servers(host, four)[n]["status"] for n in on_removed} == {n: "UP" for n in on_removed}

        watch = ServerWatch(host, four)
        result = apply(host, two)
        time.sleep(HOLD)
    finally:
        if watch:
            watch.stop()
        report = load.stop() if load.proc.poll() is None else {}
        load.kill()
    by_id = {v["__id__"]: v for v in result.values()}
    drains = {n: by_id[f"Extra replica {n} is drained"] for n in ("mtproxy_3", "mtproxy_4")}
    outcomes = {n: d["changes"] for n, d in drains.items()}
    print(
        "\nscale-down:",
        json.dumps(
            {
                "sessions_before": on_removed,
                "drains": outcomes,
                "stot_while_draining": watch.drain_stot,
                "new": report["new"],
            }
        ),
    )
    for name, outcome in outcomes.items():
        assert drains[name]["comment"].startswith(f"mtproxy_replicas/{name} drained: no new clients;")
        assert outcome["state"] == {"old": "ready", "new": "drain"}, outcome
        # The long-lived clients outlast the 5 s drain_timeout: the output says how many were left.
        assert outcome["sessions"]["old"] > 0 and outcome["sessions"]["new"] > 0, outcome
    # No new connection reached a replica once it was draining.
    assert set(watch.drain_stot) >= {"mtproxy_3", "mtproxy_4"}, watch.drain_stot
    for name, (first, last) in watch.drain_stot.items():
        assert last == first, f"{name} got {last - first} new sessions while draining"
    # Drained first, then reloaded without them, then removed.
    reload_state = by_id["HAProxy reloads gracefully when its config changes"]
    for name, drain in drains.items():
        removal = by_id[f"Extra replica {name} is removed"]
        assert drain["__run_num__"] < reload_state["__run_num__"] < removal["__run_num__"]
    assert set(containers(host)) == {"mtproxy_1", "mtproxy_2", "mtproxy_haproxy"}
    assert set(servers(host, two)) == {"mtproxy_1", "mtproxy_2"}
    # New clients never noticed; those that landed on a draining replica
    # before its drain ended their 4 s (< drain_timeout) uncut: no failure.
    assert report["new"]["attempted"] > 0
    assert report["new"]["failed"] == 0, report["new"]
    # The steady state is change-free again.
    assert changed(apply(host, two)) == {}


def test_option_change_replaces_replicas_one_at_a_time_under_load(cell):
    host, _ = cell
    two = held_clients_pillar(host, replicas=2)
    apply(host, two)
    wait_servers_up(host, two, ["mtproxy_1", "mtproxy_2"])
    ids_before = {name: info["id"] for name, info in containers(host).items()}
    changed_env = held_clients_pillar(host, replicas=2, replica_environment={"ZERO_DROP": "1"})
    load = Load(host)
    watch = ServerWatch(host, two)
    try:
        time.sleep(1)
        result = apply(host, changed_env)
        time.sleep(HOLD)
    finally:
        watch.stop()
        report = load.stop() if load.proc.poll() is None else {}
        load.kill()
    by_id = {v["__id__"]: v for v in result.values()}
    drains = {
        name: by_id[f"Replica {name} is drained before it is replaced"]["changes"]
        for name in ("mtproxy_1", "mtproxy_2")
    }
    print(
        "\nrolling replacement:",
        json.dumps({"fewest_up": watch.fewest_up, "polls": watch.polls, "drains": drains, "new": report["new"]}),
    )
    ids_after = {name: info["id"] for name, info in containers(host).items()}
    assert ids_after["mtproxy_1"] != ids_before["mtproxy_1"] and ids_after["mtproxy_2"] != ids_before["mtproxy_2"]
    assert ids_after["mtproxy_haproxy"] == ids_before["mtproxy_haproxy"]
    # One at a time: replica 2 is drained only once replica 1 is back.
    order = [
        by_id[state]["__run_num__"]
        for state in (
            "Replica mtproxy_1 is drained before it is replaced",
            "Replica mtproxy_1 is running on port 4431",
            "Replica mtproxy_1 is back in HAProxy",
            "Replica mtproxy_2 is drained before it is replaced",
            "Replica mtproxy_2 is running on port 4432",
            "Replica mtproxy_2 is back in HAProxy",
        )
    ]
    assert order == sorted(order)
    assert watch.polls > 0 and watch.fewest_up >= 1
    assert all(drain["state"] == {"old": "ready", "new": "drain"} for drain in drains.values()), drains
    # The watcher saw the rollout itself: both replicas in DRAIN at some poll.
    assert {"mtproxy_1", "mtproxy_2"} <= set(watch.drain_stot), watch.drain_stot
    assert report["new"]["attempted"] > 0
    assert report["new"]["failed"] == 0, report["new"]
    wait_servers_up(host, changed_env, ["mtproxy_1", "mtproxy_2"])
    assert changed(apply(host, changed_env)) == {}


def test_config_changing_applies_under_load_keep_every_connection(cell):
    """10 applies that each change the HAProxy config (balance toggled): each
    reloads HAProxy; no new connection fails and every long-lived one survives."""
    host, _ = cell
    pillars = [held_clients_pillar(host, replicas=2, haproxy={"balance": b}) for b in ("roundrobin", "leastconn")]
    apply(host, pillars[1])
    wait_servers_up(host, pillars[1], ["mtproxy_1", "mtproxy_2"])
    haproxy_id = containers(host)["mtproxy_haproxy"]["id"]
    load = Load(host)
    reloads = 0
    try:
        for i in range(10):
            result = apply(host, pillars[i % 2])
            reloads += "HAProxy reloads gracefully when its config changes" in changed(result)
        time.sleep(HOLD)
    finally:
        report = load.stop() if load.proc.poll() is None else {}
        load.kill()
    print("\nconfig applies:", json.dumps({"reloads": reloads, "new": report["new"], "long": report["long"]}))
    assert reloads == 10
    assert containers(host)["mtproxy_haproxy"]["id"] == haproxy_id
    assert report["new"]["attempted"] > 0
    assert report["new"]["failed"] == 0, report["new"]
    assert report["long"]["opened"] == LONG
    assert report["long"]["failed"] == 0 and report["long"]["survived"] == LONG, report["long"]
