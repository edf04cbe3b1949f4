"""Real MTProto traffic through the cell (issue 17): client sessions from the
client namespace, through HAProxy and real mtprotoproxy replicas, to a
stand-in data centre in the test host that echoes every byte.

The replicas run a test-only image derived from the locally built one
(test/standin_dc.py): its data-centre list names the test host's own
address, where the stand-in listens on port 443. Nothing leaves the test
host. The clients (test/traffic.py) are Telethon's MTProxy transports for
classic and ``dd`` secrets and our own fake-TLS client for ``ee``; every
packet must come back byte-identical.

How the replica's view of the client is observed: in transparent mode, the
replica's own sockets (``ss`` in the test host) have the client namespace's
address as their peer. In both modes, a handshake replayed from the client
namespace makes mtprotoproxy log ``Active fingerprinting detected from
<address>``: the address it believes the client has.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cell import (
    BASE_PORT,
    FRONTEND_PORT,
    admin_command,
    admin_socket,
    apply,
    cell_pillar,
    changed,
    containers,
    replays_detected,
    replica_names,
    send_replayed_handshake,
    wait_servers_up,
    wait_status,
)
from standin_dc import StandIn, derive_image

pytestmark = pytest.mark.integration

SECRET = "3f9a0c5e7b21d48e96a1c0f2b7d35e84"
TLS_DOMAIN = "tls.example.test"
TRAFFIC = Path(__file__).resolve().parents[1] / "traffic.py"
TRANSPORTS = ("abridged", "intermediate", "secure", "tls")  # classic, classic, secure (dd), tls (ee)
SESSIONS, PACKETS = 20, 50
SESSION = re.compile(r" src=[\d.]+:(\d+) .*?\bsrv=(\S+)")


def traffic_pillar(host, image: str, client_ip: str = "tproxy", **overrides) -> dict:
    # The tests switch client_ip between them on one cell: a live switch needs
    # haproxy:allow_restart (it interrupts new connections until complete).
    haproxy = {"allow_restart": True, **overrides.pop("haproxy", {})}
    return cell_pillar(
        host,
        image=image,
        secret=SECRET,
        modes=["classic", "secure", "tls"],
        tls_domain=TLS_DOMAIN,
        client_ip=client_ip,
        haproxy=haproxy,
        **overrides,
    )


class Traffic:
    """test/traffic.py in the client namespace against the cell's frontend;
    :attr:`ports` are the sessions' local ports once all are connected."""

    def __init__(self, host, transport: str = "secure", *args: str, stdin: bool = False):
        cmd = [sys.executable, str(TRAFFIC), host.address, str(FRONTEND_PORT), SECRET, "--transport", transport]
        cmd += ["--tls-domain", TLS_DOMAIN, *args] + (["--stdin"] if stdin else [])
        self.proc = subprocess.Popen(
            [*host.nsenter(client=True), *cmd],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stderr.readline()
        if '"ready"' not in line:
            self.kill()
            raise AssertionError(f"traffic.py did not get ready: {line}{self.proc.stderr.read()[-3000:]}")
        self.ports: list[int | None] = json.loads(line)["ready"]

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def report(self, timeout: float = 300) -> dict:
        """Close stdin (ending open-ended sessions) and return the report."""
        out, err = self.proc.communicate(timeout=timeout)
        if self.proc.returncode != 0:
            raise AssertionError(f"traffic.py exited {self.proc.returncode}: {err[-3000:]}")
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def peers_by_replica(host, count: int) -> dict[int, list[tuple[str, int]]]:
    """(address, port) of the peers of each replica's established sockets, by replica number."""
    ports = {BASE_PORT + i: i + 1 for i in range(count)}
    seen: dict[int, list[tuple[str, int]]] = {n: [] for n in ports.values()}
    for row in host.run(["ss", "-Htn", "state", "established"]).stdout.splitlines():
        local, peer = row.split()[-2:]
        replica = ports.get(int(local.rsplit(":", 1)[1]))
        if replica:
            address, port = peer.rsplit(":", 1)
            seen[replica].append((address, int(port)))
    return seen


def addresses_replicas_log(host, count: int, replays: int = 6) -> set[str]:
    """Replay one handshake from the client namespace; the addresses the replicas log it from."""
    since = time.time()
    send_replayed_handshake(host, FRONTEND_PORT, replays, SECRET)
    return replays_detected(host, count, since)


def server_of_client_port(host, pillar: dict) -> dict[int, str]:
    """HAProxy's sessions (``show sess``): the client's source port -> the replica it relays to."""
    out = admin_command(admin_socket(pillar), "show sess")
    return {int(port): server for port, server in SESSION.findall(out)}


def container_pid(host, name: str) -> int:
    return int(host.docker("inspect", "--format", "{{.State.Pid}}", name).stdout)


@pytest.fixture(scope="module")
def standin(testhost):
    image = derive_image(testhost)
    dc = StandIn(testhost)
    yield testhost, image, dc
    dc.stop()


def test_the_test_image_is_marked_and_points_only_at_the_test_host(standin):
    host, image, _ = standin
    labels = host.docker("image", "inspect", "--format", "{{json .Config.Labels}}", image).stdout
    assert json.loads(labels) == {"mtproxy-formula.test-only": "stand-in-dc"}
    # Both copies of the code: the entry point and the module.
    listed = host.docker(
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "grep",
        image,
        "-h",
        "TG_DATACENTERS_V4 =",
        "/usr/local/bin/mtprotoproxy",
        "/usr/local/bin/mtprotoproxy.py",
    ).stdout
    assert re.findall(r"'([\d.]+)'", listed) == [host.address] * 10, listed


@pytest.mark.parametrize("client_ip", ["tproxy", "proxy_protocol"])
def test_every_transport_round_trips_through_the_cell(standin, client_ip):
    """20 sessions x 50 packets per transport, byte-identical, the stand-in
    sees each session, the replicas see the client's own address."""
    host, image, dc = standin
    pillar = traffic_pillar(host, image, client_ip)
    apply(host, pillar)
    wait_servers_up(host, pillar, replica_names(2))
    assert {c["image"] for n, c in containers(host).items() if n != "mtproxy_haproxy"} == {image}
    measured = {}
    for transport in TRANSPORTS:
        before = dc.wait_idle()
        traffic = Traffic(host, transport, "--sessions", str(SESSIONS), "--packets", str(PACKETS), stdin=True)
        try:
            peers = peers_by_replica(host, 2)
            traffic.go()
            report = traffic.report()
        finally:
            traffic.kill()
        after = dc.wait_idle()
        measured[transport] = {k: report[k] for k in ("sessions", "failed", "packets", "mismatches", "seconds")}
        errors = [s["error"] for s in report["each"] if s["error"]]
        assert errors == [], errors
        assert report["packets"] == SESSIONS * PACKETS and report["mismatches"] == 0, measured[transport]
        # Every session reached the stand-in through a replica, with the transport's tag.
        assert after["sessions"] - before["sessions"] == SESSIONS, (before, after)
        tag = "secure" if transport == "tls" else transport
        assert after["tags"][tag] - before["tags"].get(tag, 0) == SESSIONS, after
        assert after["bytes_out"] == after["bytes_in"]
        if client_ip == "tproxy":
            # The replicas' own sockets of the sessions have the client's address.
            held = [address for peer_list in peers.values() for address, _ in peer_list]
            # (HAProxy's own health checks may show up too: they are not counted.)
            assert held.count(host.client_address) == SESSIONS, peers
            assert all(peers[n] for n in (1, 2)), f"a replica got no session: {peers}"
    print(f"\nreal traffic ({client_ip}):", json.dumps(measured))
    assert addresses_replicas_log(host, 2) == {host.client_address}


def test_a_killed_replica_costs_only_its_own_sessions(standin):
    """SIGKILL a replica mid-stream: sessions on the other one go on without an
    error, the killed one's fail, and their reconnects succeed at once."""
    host, image, _ = standin
    pillar = traffic_pillar(host, image)
    apply(host, pillar)
    wait_servers_up(host, pillar, replica_names(2))
    traffic = Traffic(
        host, "secure", "--sessions", str(SESSIONS), "--packets", "0", "--interval", "0.05", "--reconnect", stdin=True
    )
    try:
        servers = server_of_client_port(host, pillar)
        on = {n: {port for port in traffic.ports if servers.get(port) == f"mtproxy_{n}"} for n in (1, 2)}
        assert on[1] and on[2] and on[1] | on[2] == set(traffic.ports), (on, servers, traffic.ports)
        traffic.go()
        time.sleep(2)
        host.run(["kill", "-KILL", str(container_pid(host, "mtproxy_1"))])
        time.sleep(3)
        report = traffic.report()
    finally:
        traffic.kill()
    each = {s["port"]: s for s in report["each"]}
    killed, kept = [each[p] for p in on[1]], [each[p] for p in on[2]]
    print(
        "\nkilled replica:",
        json.dumps(
            {
                "killed_sessions": len(killed),
                "failed": sum(1 for s in killed if s["error"]),
                "reconnected": sum(1 for s in killed if (s["reconnect"] or {}).get("ok")),
                "reconnects": [s["reconnect"] for s in killed],
                "kept_sessions": len(kept),
                "kept_errors": sum(1 for s in kept if s["error"]),
                "packets": report["packets"],
                "mismatches": report["mismatches"],
            }
        ),
    )
    assert report["mismatches"] == 0
    assert [s["error"] for s in kept if s["error"]] == []
    assert all(s["packets"] > 0 for s in kept)
    assert all(s["error"] for s in killed), [s for s in killed if not s["error"]]
    assert all(s["reconnect"] and s["reconnect"]["ok"] and s["reconnect"]["packets"] == 3 for s in killed), killed
    wait_servers_up(host, pillar, replica_names(2), timeout=60)


def test_sessions_outlive_reloads_and_a_scale_up_and_down(standin):
    """5 HAProxy config reloads, then 2 -> 4 -> 2 replicas, while 20 sessions
    exchange packets: no mismatch, no broken session on the kept replicas.
    20 more sessions, opened once there are 4 replicas, land on the ones
    removed next too; they end while those drain (default drain_timeout, 30 s):
    the drains wait for them, and none breaks."""
    host, image, _ = standin
    balances = [traffic_pillar(host, image, haproxy={"balance": b}) for b in ("roundrobin", "leastconn")]
    apply(host, balances[1])
    wait_servers_up(host, balances[1], replica_names(2))
    traffic = Traffic(host, "secure", "--sessions", str(SESSIONS), "--packets", "0", "--interval", "0.1", stdin=True)
    late = None
    reloads = 0
    try:
        traffic.go()
        for i in range(5):
            reloads += "HAProxy reloads gracefully when its config changes" in changed(apply(host, balances[i % 2]))
        four = traffic_pillar(host, image, replicas=4)
        apply(host, four)
        wait_servers_up(host, four, replica_names(4))
        late = Traffic(host, "secure", "--sessions", str(SESSIONS), "--packets", "0", "--interval", "0.1", stdin=True)
        late_on = server_of_client_port(host, four)
        late.go()
        results: list[dict] = []
        scale_down = threading.Thread(
            target=lambda: results.append(apply(host, traffic_pillar(host, image, replicas=2)))
        )
        scale_down.start()
        # The late sessions end once their replicas drain: as a client would, mid-drain.
        wait_status(host, four, "mtproxy_3", "DRAIN", timeout=180)
        time.sleep(1)
        late_report = late.report()
        scale_down.join(timeout=300)
        report = traffic.report()
    finally:
        traffic.kill()
        if late:
            late.kill()
    result = results[0]
    by_id = {v["__id__"]: v for v in result.values()}
    drains = {n: by_id[f"Extra replica {n} is drained"]["changes"] for n in replica_names(4)[2:]}
    on_removed = sum(1 for port in late.ports if late_on.get(port) in drains)
    summary = {k: report[k] for k in ("sessions", "failed", "packets", "mismatches", "seconds")}
    late_summary = {k: late_report[k] for k in ("sessions", "failed", "packets", "mismatches", "seconds")}
    print(
        "\nreloads and scaling:",
        json.dumps(
            {"reloads": reloads, "held": summary, "late": late_summary, "late_on_removed": on_removed, "drains": drains}
        ),
    )
    assert reloads == 5
    assert set(containers(host)) == {*replica_names(2), "mtproxy_haproxy"}
    assert [s["error"] for s in report["each"] if s["error"]] == []
    assert report["mismatches"] == 0 and report["packets"] >= SESSIONS * 10, summary
    # The late sessions: each removed replica had some, none broke, and they
    # ended before their replicas were removed.
    assert all(n in late_on.values() for n in drains), late_on
    assert [s["error"] for s in late_report["each"] if s["error"]] == []
    assert late_report["packets"] >= SESSIONS and late_report["mismatches"] == 0, late_summary
    # The drains run one after the other: the first waits for the late sessions.
    assert drains["mtproxy_3"]["waited"] > 0.5, drains
    for name, drain in drains.items():
        assert drain["state"] == {"old": "ready", "new": "drain"}, (name, drain)
        # Sessions it had at the start of its drain, none left at its end.
        assert drain.get("sessions", {}).get("new", 0) == 0, (name, drain)
