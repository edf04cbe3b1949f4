"""client_ip: proxy_protocol end to end: a transparent-mode cell switched to
the PROXY protocol loses every kernel rule of ours, yet its mtprotoproxy
replicas still learn the client namespace's address, now from HAProxy's PROXY
v2 header; HAProxy's health checks carry the header too, so no replica takes
them for bad clients. The replicas listen on loopback only, so no client can
send them a PROXY header of its own.

How a replica's view of the client is observed: mtprotoproxy logs no
connection, but it logs a replayed handshake with the client's address
(``Active fingerprinting detected from <address>``). The test sends one valid
handshake for the cell's secret several times from the client namespace."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from cell import (
    BASE_PORT,
    FRONTEND_PORT,
    apply,
    assert_cell_serves,
    cell_pillar,
    changed,
    failed,
    ip_rules,
    mangle_output,
    replays_detected,
    replica_logs,
    replica_names,
    send_replayed_handshake,
    table_routes,
    wait_servers_up,
)

pytestmark = pytest.mark.integration

SECRET = "6c2f9a41d0b83e57a4c19f0e2d7b6a35"
SECOND = "91d3e07b5a2c48f6e1b09a7d3c5f2e84"
UNKNOWN = "2b7e0c94f1a6d35e8c40b92f7a1d6e53"


SEND_SPOOFED = """
import socket, struct, sys
sys.path.insert(0, sys.argv[4])
from mtproto import handshake
# A PROXY v2 header (TCP over IPv4) that claims the client is sys.argv[3].
header = b"\\r\\n\\r\\n\\x00\\r\\nQUIT\\n" + bytes([0x21, 0x11]) + struct.pack(
    "!H4s4sHH", 12, socket.inet_aton(sys.argv[3]), socket.inet_aton(sys.argv[1]), 40000, int(sys.argv[2])
)
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as conn:
        conn.sendall(header + handshake(sys.argv[5]))
        print("accepted")
except ConnectionRefusedError:
    print("refused")
"""
SPOOFED_CLIENT = "203.0.113.77"


def our_rules(host) -> list[str]:
    rules = [line for line in ip_rules(host).splitlines() if "proto 201" in line or "lookup 100" in line]
    rules += [line for line in mangle_output(host).splitlines() if "mtproxy" in line]
    rules += table_routes(host).splitlines()
    return rules


def detected_after(host, sent_at: float, wait: float = 5) -> set[str]:
    return replays_detected(host, 2, sent_at, wait)


@pytest.fixture(scope="module")
def switched(testhost):
    """A transparent cell first (rules in place), then the same cell on the PROXY protocol."""
    tproxy_pillar = cell_pillar(testhost, secret=SECRET, extra_secrets=[SECOND])
    assert not failed(apply(testhost, tproxy_pillar))
    assert_cell_serves(testhost, tproxy_pillar, 2)
    rules_before = our_rules(testhost)
    pillar = cell_pillar(testhost, secret=SECRET, extra_secrets=[SECOND], client_ip="proxy_protocol")
    # Refused on a live cell (test_bad_input) unless an interruption is accepted:
    # new connections fail until the last replica and HAProxy are switched.
    pillar["mtproxy"]["haproxy"] = {"allow_restart": True}
    result = apply(testhost, pillar)
    return testhost, pillar, result, rules_before, time.time()


def test_switching_to_proxy_protocol_removes_every_kernel_rule(switched):
    host, _, result, rules_before, _ = switched
    assert not failed(result)
    assert rules_before, "the transparent cell had no rules to remove: the test proves nothing"
    assert our_rules(host) == []
    assert "Return-path rules and routes are removed" in changed(result)
    assert not (host.workdir / "systemd" / "mtproxy-return-path.service").exists()
    assert not (host.workdir / "systemd" / "mtproxy-return-path-watchdog.service").exists()


def test_replicas_learn_the_client_address_from_the_header(switched):
    host, pillar, _, _, _ = switched
    wait_servers_up(host, pillar, replica_names(2))
    sent_at = time.time()
    send_replayed_handshake(host, FRONTEND_PORT, 8, SECRET)
    seen = detected_after(host, sent_at, wait=10)
    # The TCP peer of every replica connection is HAProxy on the host's own
    # address; only the PROXY header carries the client namespace's one.
    assert seen == {host.client_address}, seen


def test_every_secret_is_served_and_no_other(switched):
    """A replica remembers a handshake (and so logs its replay) only when it
    matched one of its secrets: the extra secret does, an unknown one not."""
    host, pillar, _, _, _ = switched
    wait_servers_up(host, pillar, replica_names(2))
    sent_at = time.time()
    send_replayed_handshake(host, FRONTEND_PORT, 8, UNKNOWN)
    assert detected_after(host, sent_at) == set()
    sent_at = time.time()
    send_replayed_handshake(host, FRONTEND_PORT, 8, SECOND)
    assert detected_after(host, sent_at, wait=10) == {host.client_address}


def test_health_checks_are_not_bad_clients_but_bare_connections_are(switched):
    host, _, _, _, switched_at = switched
    time.sleep(3)  # a few check rounds (inter 1s) since the switch
    assert "sent bad proxy protocol headers" not in replica_logs(host, 2, switched_at)
    # Control: a connection without the header, straight to a replica (on
    # loopback, inside the host), is one.
    sent_at = time.time()
    send_replayed_handshake(host, BASE_PORT, 1, SECRET, client=False, address="127.0.0.1")
    deadline = time.monotonic() + 10
    while "sent bad proxy protocol headers" not in replica_logs(host, 2, sent_at) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "Client from 127.0.0.1 sent bad proxy protocol headers" in replica_logs(host, 2, sent_at)


def test_a_client_cannot_send_a_replica_a_spoofed_header(switched):
    """The replicas trust any PROXY header, so only HAProxy may reach them: they
    listen on loopback. A header claiming another client, sent straight to a
    replica port from the client namespace, is refused; through HAProxy the
    client's real address still arrives."""
    host, pillar, _, _, _ = switched
    listening = host.run(["ss", "-Hltn"]).stdout.split()
    for port in (BASE_PORT, BASE_PORT + 1):
        assert f"127.0.0.1:{port}" in listening
        assert not [word for word in listening if word.endswith(f":{port}") and word != f"127.0.0.1:{port}"]
    test_dir = str(Path(__file__).resolve().parents[1])
    sent_at = time.time()
    for port in (BASE_PORT, BASE_PORT + 1):
        args = [sys.executable, "-c", SEND_SPOOFED, host.address, str(port), SPOOFED_CLIENT, test_dir, SECRET]
        assert host.client_run(args, timeout=30).stdout.split() == ["refused"], port
    wait_servers_up(host, pillar, replica_names(2))
    send_replayed_handshake(host, FRONTEND_PORT, 8, SECRET)
    assert detected_after(host, sent_at, wait=10) == {host.client_address}


def test_status_and_a_second_apply(switched):
    host, pillar, _, _, _ = switched
    assert changed(apply(host, pillar)) == {}
    host.write_pillar(pillar)
    status = host.salt_call("mtproxy.status")
    assert status["return_path"] == {"ok": None, "used": False, "client_ip": "proxy_protocol"}
    assert {r["haproxy"] for r in status["replicas"]} == {"UP"}
    # What replica 2 runs, for an operator: its config, the secret masked.
    spec = host.salt_call("mtproxy_flavor.show", "2")
    assert "PROXY_PROTOCOL = True" in spec["config"] and "PORT = 4432" in spec["config"]
    assert SECRET not in str(spec) and SECRET[:4] in spec["config"]
