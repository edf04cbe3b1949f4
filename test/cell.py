"""Helpers for tests that deploy a whole cell with the formula into a test host.

They drive the formula the way an operator does (``salt-call --local
state.apply mtproxy`` inside the host) and observe what a user would: which
containers run, what HAProxy reports, and which peer address each replica
sees for connections made from the client namespace.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
import time
from typing import Any

from testhost import TestHost

FRONTEND_PORT = 8443
BASE_PORT = 4431


def cell_pillar(host: TestHost, **overrides: Any) -> dict:
    """Pillar for a cell in ``host``: every file the formula writes stays in the host's workdir."""
    mtproxy: dict[str, Any] = {
        "config_dir": str(host.workdir / "etc-mtproxy"),
        "run_dir": str(host.workdir / "run-mtproxy"),
        "sysctl_config": str(host.workdir / "sysctl.d" / "90-mtproxy.conf"),
        "secret_file": str(host.workdir / "var-lib-mtproxy" / "secret"),
        # The test host runs its own dockerd; an init script must not start another.
        "docker": {"install": False},
        # The boot unit goes to the workdir; no systemd to enable it in a test host.
        "boot": {"unit_dir": str(host.workdir / "systemd"), "enable": False},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(mtproxy.get(key), dict):
            mtproxy[key] = {**mtproxy[key], **value}
        else:
            mtproxy[key] = value
    return {"mtproxy": mtproxy}


def apply(host: TestHost, pillar: dict, sls: str = "mtproxy", test: bool = False, check: bool = True) -> dict:
    """``state.apply`` (syncing our modules first, as the README says); returns the state results."""
    args = ["state.apply", sls, "sync_mods=all"]
    if test:
        args.append("test=True")
    result = host.salt_call(*args, pillar=pillar, check=False)
    if check:
        bad = failed(result)
        assert not bad, "states failed:\n" + json.dumps(bad, indent=1)[:20000]
    return result


def _states(result: Any) -> dict:
    if not isinstance(result, dict):
        raise AssertionError(f"state run returned no state results: {result!r}")
    return result


def failed(result: Any) -> dict:
    return {k: v for k, v in _states(result).items() if v.get("result") is False}


def changed(result: Any) -> dict:
    """The states that changed something (or, under test=True, would)."""
    return {
        v.get("__id__", k): v.get("changes")
        for k, v in _states(result).items()
        if v.get("changes") or v.get("result") is None
    }


def show_stat(host: TestHost, admin_socket: str) -> list[dict]:
    """HAProxy's ``show stat`` through the admin socket, as a list of rows."""
    proc = subprocess.run(
        ["socat", "-t", "5", "-", f"UNIX-CONNECT:{admin_socket}"],
        input="show stat\n",
        capture_output=True,
        text=True,
        timeout=15,
        check=True,
    )
    text = proc.stdout.lstrip("# ")
    return list(csv.DictReader(io.StringIO(text)))


def servers(host: TestHost, pillar: dict) -> dict[str, dict]:
    admin = pillar["mtproxy"]["run_dir"] + "/haproxy/admin.sock"
    return {
        row["svname"]: row
        for row in show_stat(host, admin)
        if row["pxname"] == "mtproxy_replicas" and row["svname"] not in ("FRONTEND", "BACKEND")
    }


def wait_servers_up(host: TestHost, pillar: dict, names: list[str], timeout: float = 60) -> dict[str, dict]:
    """Wait until each named server is UP after a real check (L4OK): HAProxy 3.0
    reports servers UP before their first check."""
    deadline = time.monotonic() + timeout
    last: dict[str, dict] = {}
    while time.monotonic() < deadline:
        try:
            last = servers(host, pillar)
        except (subprocess.SubprocessError, OSError):
            last = {}
        if set(last) == set(names) and all(
            last[n]["status"] == "UP" and last[n]["check_status"] == "L4OK" for n in names
        ):
            return last
        time.sleep(0.3)
    raise AssertionError(
        f"servers {names} not all UP (L4OK) within {timeout} s: "
        + json.dumps({n: (r.get("status"), r.get("check_status")) for n, r in last.items()})
    )


HOLD_CLIENT = r"""
import socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conns, failures = [], 0
for _ in range(count):
    try:
        conns.append(socket.create_connection((host, port), timeout=5))
    except OSError:
        failures += 1
    time.sleep(0.02)
print(f"open {len(conns)} failed {failures}", flush=True)
sys.stdin.read()
"""


def replica_peers(host: TestHost, ports: list[int], connections: int = 20) -> dict[int, list[str]]:
    """Open ``connections`` from the client namespace through the frontend, hold
    them, and return the peer addresses each replica port sees (``ss`` inside
    the test host)."""
    client = subprocess.Popen(
        [
            *host.nsenter(client=True),
            sys.executable,
            "-c",
            HOLD_CLIENT,
            host.address,
            str(FRONTEND_PORT),
            str(connections),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = client.stdout.readline().split()
        assert line[:1] == ["open"], f"client printed {line}"
        opened, failures = int(line[1]), int(line[3])
        assert failures == 0 and opened == connections, f"{failures} of {connections} connections failed"
        peers: dict[int, list[str]] = {port: [] for port in ports}
        # The replicas accept asynchronously: give HAProxy's connects a moment.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            peers = {port: [] for port in ports}
            out = host.run(["ss", "-Htn", "state", "established"]).stdout
            for row in out.splitlines():
                fields = row.split()
                local, peer = fields[-2], fields[-1]
                local_port = int(local.rsplit(":", 1)[1])
                if local_port in peers:
                    peers[local_port].append(peer.rsplit(":", 1)[0])
            if sum(len(v) for v in peers.values()) >= connections:
                break
            time.sleep(0.2)
        return peers
    finally:
        client.stdin.close()
        client.wait(timeout=10)


def containers(host: TestHost) -> dict[str, dict]:
    """Containers in the host's dockerd: name -> {id, state, image}."""
    out = host.docker("ps", "-a", "--format", "{{json .}}").stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    return {r["Names"]: {"id": r["ID"], "state": r["State"], "image": r["Image"]} for r in rows}


def ip_rules(host: TestHost) -> str:
    return host.run(["ip", "rule", "show"]).stdout


def mangle_output(host: TestHost) -> str:
    return host.run(["iptables", "-t", "mangle", "-S", "OUTPUT"]).stdout


def replica_names(count: int) -> list[str]:
    return [f"mtproxy_{i}" for i in range(1, count + 1)]


def assert_cell_serves(host: TestHost, pillar: dict, count: int, connections: int = 20) -> None:
    """`count` replicas run and are UP, share ``connections`` clients from the
    client namespace, and each sees the client's own address (transparent
    mode), never the host's."""
    running = {n for n, c in containers(host).items() if c["state"] == "running"}
    assert set(replica_names(count)) | {"mtproxy_haproxy"} == running
    wait_servers_up(host, pillar, replica_names(count))
    ports = [BASE_PORT + i for i in range(count)]
    peers = replica_peers(host, ports, connections=connections)
    assert sum(len(p) for p in peers.values()) == connections, peers
    for port in ports:
        assert peers[port], f"replica on port {port} got no client: {peers}"
        assert set(peers[port]) == {host.client_address}, peers


def unit_problems(unit, tolerated: str) -> list[str]:
    """What ``systemd-analyze verify`` finds wrong in a unit file ([] when it is
    not installed). Without systemd as PID 1 it still parses the unit; lines
    about the ``tolerated`` unit it refers to (absent here) are left out."""
    if not shutil.which("systemd-analyze"):
        return []
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
    return [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if line.strip() and tolerated not in line and "Failed to " not in line
    ]
