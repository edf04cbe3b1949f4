"""Changes a reload cannot apply, under load on a 3-replica cell (issue 16):
a new port or address replaces the replicas one at a time through the drain,
with the return path covering old and new ports meanwhile; a replica that
does not serve after its replacement stops the rollout there, the others
untouched, until a fixed pillar finishes it.

Load: test/cell.py ``Load`` (20 new connections/s plus 40 long-lived ones)
from the client namespace. The failed-connection counts are printed (run
with ``-s``).
"""

from __future__ import annotations

import json
import time

import pytest
from cell import (
    HOLD,
    Load,
    apply,
    assert_cell_serves,
    changed,
    containers,
    failed,
    held_clients_pillar,
    mangle_output,
    replica_names,
    servers,
    wait_servers_up,
)

pytestmark = pytest.mark.integration

NAMES = replica_names(3)
BROKEN_IMAGE = "mtproxy-formula/broken:local"
BREAK_PYTHON = r"""rm /usr/bin/python3
printf '#!/bin/sh\necho replica cannot start: test image >&2\nexit 3\n' > /usr/bin/python3
chmod 755 /usr/bin/python3"""


@pytest.fixture(scope="module")
def cell(testhost):
    pillar = held_clients_pillar(testhost, replicas=3)
    apply(testhost, pillar)
    wait_servers_up(testhost, pillar, NAMES)
    return testhost


def listening_ports(host) -> set[int]:
    out = host.run(["ss", "-Htln"]).stdout
    return {int(row.split()[3].rsplit(":", 1)[1]) for row in out.splitlines() if row.strip()}


def under_load(host, pillar: dict, check: bool = True) -> tuple[dict, dict]:
    """Apply ``pillar`` while the load runs; the state results and the load's report."""
    load = Load(host)
    try:
        time.sleep(1)
        result = apply(host, pillar, check=check)
        time.sleep(HOLD)
    finally:
        report = load.stop() if load.proc.poll() is None else {}
        load.kill()
    return result, report


def assert_cell_on(host, pillar: dict, address: str, base_port: int) -> None:
    """Replicas listen on the new ports, HAProxy sends there, the return path
    covers exactly those ports, and clients keep their own address."""
    ports = [base_port + i for i in range(3)]
    listening = listening_ports(host)
    assert set(ports) <= listening, listening
    rows = servers(host, pillar)
    assert {name: rows[name]["addr"] for name in NAMES} == {
        name: f"{address}:{port}" for name, port in zip(NAMES, ports, strict=True)
    }
    mangle = mangle_output(host)
    assert f"--sports {ports[0]}:{ports[-1]} " in mangle, mangle
    assert mangle.count("--sports") == 1, mangle
    assert_cell_serves(host, pillar, 3, base_port=base_port)


def rollout(host, before: dict, after: dict, address: str, base_port: int, label: str) -> dict:
    apply(host, before)
    wait_servers_up(host, before, NAMES)
    ids = {name: containers(host)[name]["id"] for name in NAMES}
    result, report = under_load(host, after)
    print(f"\n{label}:", json.dumps({"new": report["new"], "long": report["long"]}))
    assert report["new"]["attempted"] > 0
    assert report["new"]["failed"] == 0, report["new"]
    # Each replica was drained, replaced, then taken back, one after the other.
    by_id = {v["__id__"]: v for v in result.values()}
    for name in NAMES:
        assert by_id[f"Replica {name} is drained before it is replaced"]["changes"], name
        assert containers(host)[name]["id"] != ids[name]
    assert_cell_on(host, after, address, base_port)
    assert changed(apply(host, after)) == {}
    return by_id


def test_a_base_port_change_rolls_replicas_to_the_new_ports_without_a_failed_connection(cell):
    host = cell
    before = held_clients_pillar(host, replicas=3)
    after = held_clients_pillar(host, replicas=3, base_port=6101)
    rollout(host, before, after, host.address, 6101, "base_port 4431 -> 6101")
    # Back, and a shift that overlaps the ports in use (4431 -> 4432 would
    # take mtproxy_2's port): the rollout goes from the last replica down.
    shifted = held_clients_pillar(host, replicas=3, base_port=4432)
    by_id = rollout(host, before, shifted, host.address, 4432, "base_port 4431 -> 4432")
    drained = [by_id[f"Replica {name} is drained before it is replaced"]["__run_num__"] for name in NAMES]
    assert drained == sorted(drained, reverse=True)


def test_a_backend_address_change_rolls_replicas_to_the_new_address_without_a_failed_connection(cell):
    host = cell
    second = host.address.rsplit(".", 1)[0] + ".3"
    if second not in host.run(["ip", "-4", "-o", "addr", "show", "dev", host.host_if]).stdout:
        host.run(["ip", "addr", "add", f"{second}/24", "dev", host.host_if])
    before = held_clients_pillar(host, replicas=3, backend_address=host.address)
    after = held_clients_pillar(host, replicas=3, backend_address=second)
    rollout(host, before, after, second, 4431, f"backend_address {host.address} -> {second}")


def test_a_replica_that_does_not_start_stops_the_rollout_with_the_others_serving(cell):
    host = cell
    good = held_clients_pillar(host, replicas=3)
    apply(host, good)
    wait_servers_up(host, good, NAMES)
    # An image whose replica exits at once, saying why. The formula names the
    # entry point (python3 and our stats entry point), so python3 is what breaks.
    host.docker("rm", "-f", "broken-source", check=False)
    host.docker(
        "run",
        "--name",
        "broken-source",
        "--entrypoint",
        "/bin/sh",
        "mtproxy-formula/mtprotoproxy:local",
        "-c",
        BREAK_PYTHON,
    )
    host.docker("commit", "broken-source", BROKEN_IMAGE)
    host.docker("rm", "broken-source")
    ids = {name: info["id"] for name, info in containers(host).items()}
    broken = held_clients_pillar(host, replicas=3, image=BROKEN_IMAGE)
    result, report = under_load(host, broken, check=False)
    print("\nbroken image:", json.dumps({"new": report["new"], "long": report["long"]}))
    bad = {v["__id__"]: v for v in failed(result).values()}
    serving = bad["Replica mtproxy_1 accepts connections on port 4431"]["comment"]
    assert "mtproxy_1 does not accept connections" in serving
    assert "replica cannot start: test image" in serving
    # Exactly one replica was replaced: the others are the same containers, serving.
    after = containers(host)
    assert after["mtproxy_1"]["id"] != ids["mtproxy_1"] and after["mtproxy_1"]["image"] == BROKEN_IMAGE
    for name in ("mtproxy_2", "mtproxy_3", "mtproxy_haproxy"):
        assert after[name]["id"] == ids[name] and after[name]["state"] == "running", after
    assert "Replica mtproxy_2 is running on port 4432" in bad
    rows = servers(host, good)
    assert [rows[n]["status"] for n in ("mtproxy_2", "mtproxy_3")] == ["UP", "UP"], rows
    assert not rows["mtproxy_1"]["status"].startswith("UP"), rows["mtproxy_1"]
    # It was drained before its replacement: no new client was sent to it.
    assert report["new"]["attempted"] > 0
    assert report["new"]["failed"] == 0, report["new"]
    # The operator fixes the pillar: the re-apply finishes the rollout.
    result, report = under_load(host, good)
    print("\nfixed image:", json.dumps({"new": report["new"], "long": report["long"]}))
    assert report["new"]["failed"] == 0, report["new"]
    assert_cell_serves(host, good, 3)
    assert containers(host)["mtproxy_1"]["image"] != BROKEN_IMAGE
    assert changed(apply(host, good)) == {}
