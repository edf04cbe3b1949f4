#!/usr/bin/env python3
"""`make demo`: deploy a 2-replica cell with the formula into a local test host,
then relay real client sessions through it.

The cell runs in an isolated network namespace with its own dockerd (see
test/testhost.py), deployed exactly as an operator would deploy it on a
host: `salt-call --local state.apply mtproxy`. Telegram is unreachable from
there (no route out), so the replicas run a test-only image derived from the
local one whose data-centre list names the test host itself, where a
stand-in data centre (test/standin_dc.py) echoes every byte. Clients in the
client namespace then send packets through HAProxy and a replica to the
stand-in and time each round trip. It all stays up until `make demo-down`,
which ends the stand-in by its PID and tears the host down.

    .venv/bin/python scripts/demo.py up          # deploy, then run the sessions
    .venv/bin/python scripts/demo.py sessions    # run the sessions again
    python3 scripts/demo.py down
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "test"))

from cell import FRONTEND_PORT, apply, cell_pillar, wait_servers_up
from testhost import STATE_ROOT, TestHost, _alive, _terminate

TEST_DIR = Path(__file__).resolve().parent.parent / "test"
NAME = "mtpf-demo"
REPLICAS = 2
TLS_DOMAIN = "tls.example.test"
ROUND_TRIPS = 200
# Telethon's MTProxy transport (a third-party client): sessions x packets.
TELETHON = (10, 20)


def standin_pid(host: TestHost) -> int | None:
    """The PID of the demo's stand-in data centre, if it runs (from its status file)."""
    try:
        pid = json.loads((host.workdir / "standin-dc.json").read_text())["pid"]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError):
        return None
    return pid if _alive(pid) and b"standin_dc.py" in cmdline else None


def ensure_standin(host: TestHost) -> int:
    """Start the stand-in in the test host (once): it outlives this script."""
    pid = standin_pid(host)
    if pid is None:
        from standin_dc import StandIn

        pid = StandIn(host).proc.pid
    return pid


def link_secrets(links: list[dict]) -> dict[str, str]:
    """mode -> the 32 hex digits of the first secret, from the cell's tg:// links."""
    found: dict[str, str] = {}
    for link in links:
        secret = parse_qs(urlparse(link["tg"]).query)["secret"][0]
        found.setdefault(link["mode"], secret[2:34] if link["mode"] in ("secure", "tls") else secret[:32])
    return found


def up() -> int:
    if (STATE_ROOT / NAME / "state.json").exists():
        print(f"A demo cell exists already; `make demo-down` removes it. Redeploying into {NAME}.")
        host = TestHost.load(NAME)
    else:
        host = TestHost.create(NAME)
        host.owner_pid = 0  # kept until `make demo-down`
        host.start()
    from standin_dc import derive_image

    image = derive_image(host)
    standin = ensure_standin(host)
    pillar = cell_pillar(host, replicas=REPLICAS, image=image, tls_domain=TLS_DOMAIN)
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
    print(
        f"TEST-ONLY: the replicas run {image}, derived from the local image with its\n"
        f"data-centre list pointing at the test host itself ({host.address}:443), where a stand-in\n"
        f"data centre (test/standin_dc.py, PID {standin}) echoes every byte. They talk to the\n"
        "stand-in, not to Telegram. An operator deploys mtproxy-formula/mtprotoproxy:local.\n"
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
    print()
    relayed = sessions(host, links)
    print("\nAgain:         .venv/bin/python scripts/demo.py sessions")
    print(
        f"Salt inside:   python3 test/testhost.py run {NAME} -- .venv/bin/salt-call "
        f"--local --config-dir {host.salt_dir / 'etc'} mtproxy.status"
    )
    print("Stop it:       make demo-down")
    return relayed


def sessions(host: TestHost | None = None, links: list[dict] | None = None) -> int:
    """Real client sessions from the client namespace through the cell to the stand-in."""
    if host is None:
        if not (STATE_ROOT / NAME / "state.json").exists():
            print("No demo cell is running: `make demo` starts one.")
            return 1
        host = TestHost.load(NAME)
        if standin_pid(host) is None:
            print("The demo's stand-in data centre is not running: `make demo` starts it again.")
            return 1
    links = links if links is not None else host.salt_call("mtproxy.links")
    secrets = link_secrets(links)
    status_file = host.workdir / "standin-dc.json"
    before = json.loads(status_file.read_text())
    print(
        f"Real client sessions from the client namespace ({host.client_address}) through the cell "
        f"({host.address}:{FRONTEND_PORT}),\nrelayed by the replicas to the stand-in data centre (not Telegram), "
        "which echoes each packet back:"
    )
    args = [host.address, str(FRONTEND_PORT), secrets.get("secure", ""), secrets.get("tls", ""), TLS_DOMAIN]
    ours = host.client_run([sys.executable, __file__, "round-trips", *args], check=False, timeout=300)
    if ours.returncode != 0:
        print(f"  the client failed (exit {ours.returncode}):\n{ours.stderr[-3000:]}")
        return 1
    ok = True
    for row in json.loads(ours.stdout):
        ok = ok and row["mismatches"] == 0 and row["packets"] == ROUND_TRIPS
        print(
            f"  {row['label']:36} {row['packets']:>4} round trips, p50 {row['p50_ms']:.2f} ms, "
            f"p99 {row['p99_ms']:.2f} ms, {row['mismatches']} mismatches"
        )
    if "secure" in secrets:
        count, packets = TELETHON
        telethon = host.client_run(
            [
                sys.executable,
                str(TEST_DIR / "traffic.py"),
                host.address,
                str(FRONTEND_PORT),
                secrets["secure"],
                "--transport",
                "secure",
                "--sessions",
                str(count),
                "--packets",
                str(packets),
            ],
            check=False,
            timeout=300,
        )
        if telethon.returncode != 0:
            print(f"  Telethon failed (exit {telethon.returncode}):\n{telethon.stderr[-3000:]}")
            return 1
        report = json.loads(telethon.stdout.strip().splitlines()[-1])
        ok = ok and report["failed"] == 0 and report["mismatches"] == 0 and report["packets"] == count * packets
        print(
            f"  {f'secure (dd), Telethon, {count} sessions':36} {report['packets']:>4} round trips in "
            f"{report['seconds']:.2f} s, {report['failed']} failed, {report['mismatches']} mismatches"
        )
    # The stand-in's counters settle once the replicas close their side.
    time.sleep(0.5)
    after = json.loads(status_file.read_text())
    print(
        f"  stand-in data centre: {after['sessions'] - before['sessions']} sessions from the replicas, "
        f"{(after['bytes_in'] - before['bytes_in']) / 1024:.0f} KiB echoed"
    )
    print("  every packet came back byte-identical" if ok else "  SOME PACKETS DID NOT COME BACK INTACT")
    # Per secret, summed over the replicas (the cell exporter serves them per replica on :9848).
    for entry in host.salt_call("mtproxy.status")["secrets"]:
        print(
            f"  secret {entry['secret']}: {entry['connections_total']} sessions, "
            f"{entry['bytes_total'] / 1024:.0f} KiB relayed since the replicas started, {entry['connections']} open"
        )
    return 0 if ok else 1


def round_trips(address: str, port: str, secure: str, tls: str, domain: str) -> int:
    """In the client namespace: one session per mode (our raw client), timing each round trip."""
    import asyncio

    from mtproto import Session

    async def one(secret: str, tls_domain: str) -> dict:
        session = await Session.open(address, int(port), secret, tls_domain=tls_domain)
        times, mismatches = [], 0
        try:
            for _ in range(ROUND_TRIPS):
                payload = os.urandom(4 * (16 + os.urandom(1)[0]))
                started = time.perf_counter()
                await session.send(payload)
                got = await asyncio.wait_for(session.recv(), 10)
                times.append((time.perf_counter() - started) * 1000)
                mismatches += got != payload
        finally:
            await session.close()
        cuts = statistics.quantiles(times, n=100)
        return {"packets": len(times), "mismatches": mismatches, "p50_ms": cuts[49], "p99_ms": cuts[98]}

    rows = []
    for label, secret, tls_domain in (
        ("secure (dd), our raw client", secure, ""),
        ("tls (ee), our fake-TLS client", tls, domain),
    ):
        if secret:
            rows.append({"label": label, **asyncio.run(one(secret, tls_domain))})
    print(json.dumps(rows))
    return 0


def down() -> int:
    if (STATE_ROOT / NAME / "state.json").exists():
        host = TestHost.load(NAME)
        pid = standin_pid(host)
        if pid is not None:
            _terminate([pid], timeout=10)
            print(f"Stand-in data centre (PID {pid}) stopped.")
        host.stop()
        print(f"Demo cell {NAME} removed.")
    else:
        print("No demo cell is running.")
    return 0


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "up"
    if command == "round-trips":
        sys.exit(round_trips(*sys.argv[2:7]))
    sys.exit({"up": up, "down": down, "sessions": sessions}[command]())
