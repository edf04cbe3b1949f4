#!/usr/bin/env python3
"""`make demo`: deploy a 2-replica cell with the formula into a local test host.

The cell runs in an isolated network namespace with its own dockerd (see
test/testhost.py), deployed exactly as an operator would deploy it on a
host: `salt-call --local state.apply mtproxy`. It stays up until
`make demo-down`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "test"))

from cell import apply, cell_pillar, wait_servers_up
from testhost import STATE_ROOT, TestHost

NAME = "mtpf-demo"
REPLICAS = 2


def up() -> int:
    if (STATE_ROOT / NAME / "state.json").exists():
        print(f"A demo cell exists already; `make demo-down` removes it. Redeploying into {NAME}.")
        host = TestHost.load(NAME)
    else:
        host = TestHost.create(NAME)
        host.owner_pid = 0  # kept until `make demo-down`
        host.start()
    pillar = cell_pillar(host, replicas=REPLICAS)
    host.write_pillar(pillar)
    started = time.monotonic()
    apply(host, pillar)
    took = time.monotonic() - started
    wait_servers_up(host, pillar, [f"mtproxy_{i}" for i in range(1, REPLICAS + 1)])
    links = host.salt_call("mtproxy.links")
    status = host.salt_call("mtproxy.status")

    print(
        f"\nDeployed a {REPLICAS}-replica MTProxy cell with `salt-call --local state.apply mtproxy` "
        f"in {took:.0f} s,\ninside the test host {NAME} (network namespace, own dockerd, no route out).\n"
    )
    print("Connect (from the demo's client namespace; the links are what a Telegram client takes):")
    for link in links:
        print(f"  {link['mode']:9} {link['tg']}")
        print(f"  {'':9} {link['https']}")
    print(f"\nStats: {status['haproxy']['stats_url']} (inside the test host):")
    print(f"  python3 test/testhost.py run {NAME} -- curl -s '{status['haproxy']['stats_url']};csv'")
    print("\nStatus:")
    print(f"  {'replica':12} {'port':>5}  {'container':10} {'haproxy':8} {'sessions':>8}  check")
    for replica in status["replicas"]:
        print(
            f"  {replica['name']:12} {replica['port']:>5}  {replica['container']:10} {replica['haproxy']:8} "
            f"{replica['sessions']:>8}  {replica['check']}"
        )
    print(f"  {'haproxy':12} {'':>5}  {status['haproxy']['container']:10}")
    print(
        f"\nTry a client:  python3 test/testhost.py run --client {NAME} -- "
        f"python3 -c \"import socket; socket.create_connection(('{host.address}', 8443)); print('connected')\""
    )
    print(
        f"Salt inside:   python3 test/testhost.py run {NAME} -- .venv/bin/salt-call "
        f"--local --config-dir {host.salt_dir / 'etc'} mtproxy.status"
    )
    print("Stop it:       make demo-down")
    return 0


def down() -> int:
    if (STATE_ROOT / NAME / "state.json").exists():
        TestHost.load(NAME).stop()
        print(f"Demo cell {NAME} removed.")
    else:
        print("No demo cell is running.")
    return 0


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "up"
    sys.exit({"up": up, "down": down}[command]())
