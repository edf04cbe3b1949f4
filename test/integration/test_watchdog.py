"""The return path stays up (issue 12): the watchdog unit restores a lost mangle
rule, ip rule or table-100 route within seconds while a client loop runs, and
touches nothing that is not ours; mtproxy.status reports the return path.

Systemd is not PID 1 in a test host: the tests parse the watchdog unit's
ExecStart from the unit file the formula installed and run it themselves in
the test host's namespace, ending it by PID. Repair times are measured with
the test's own clock and printed (run with ``-s``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest
from cell import (
    FRONTEND_PORT,
    apply,
    assert_cell_serves,
    cell_pillar,
    ip_rules,
    mangle_output,
    table_routes,
    unit_command,
    unit_problems,
)

pytestmark = pytest.mark.integration

BOUND = 10.0  # seconds the issue allows; the interval is 3 s
PATH = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
WATCHDOG_UNIT = "mtproxy-return-path-watchdog.service"
CONNECT_TIMEOUT = "500ms"
HOLD = 3.0

# Every 0.2 s a new connection through the frontend that must stay open and
# silent for HOLD s (the replicas wait for a handshake; HAProxy closes the
# client side once its connects to the replicas failed: 4 tries of
# CONNECT_TIMEOUT, so HOLD is longer). One JSON line per attempt.
CLIENT_LOOP = r"""
import json, socket, sys, threading, time
host, port, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
lock = threading.Lock()
def attempt(started):
    ok = False
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.settimeout(hold)
            try:
                ok = sock.recv(1) != b""
            except socket.timeout:
                ok = True
    except OSError:
        pass
    with lock:
        print(json.dumps({"t": started, "ok": ok}), flush=True)
while True:
    threading.Thread(target=attempt, args=(time.time(),), daemon=True).start()
    time.sleep(0.2)
"""


class ClientLoop:
    def __init__(self, host):
        self.proc = subprocess.Popen(
            [
                *host.nsenter(client=True),
                sys.executable,
                "-c",
                CLIENT_LOOP,
                host.address,
                str(FRONTEND_PORT),
                str(HOLD),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.results: list[dict] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.results.append(json.loads(line))

    def wait_ok(self, since: float, count: int = 5, timeout: float = 20) -> None:
        """``count`` successful attempts started after ``since`` (time.time())."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(1 for r in list(self.results) if r["t"] >= since and r["ok"]) >= count:
                return
            time.sleep(0.2)
        recent = [r for r in self.results if r["t"] >= since]
        raise AssertionError(f"client loop: not {count} successes since {since}: {recent[-20:]}")

    def failures_between(self, start: float, end: float) -> int:
        return sum(1 for r in list(self.results) if start <= r["t"] <= end and not r["ok"])

    def stop(self) -> None:
        """End the loop; its connections are gone when this returns (a replica sees only later ones)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)
            time.sleep(1.5)


def watchdog_pillar(host, **overrides) -> dict:
    return cell_pillar(host, haproxy={"timeout_connect": CONNECT_TIMEOUT}, **overrides)


class Watchdog:
    """The watchdog unit's ExecStart, run in the test host (no systemd there), logging to a file."""

    def __init__(self, host):
        self.argv = unit_command(host, WATCHDOG_UNIT)
        self.status_file = self.argv[self.argv.index("--status") + 1]
        self.log = host.workdir / "watchdog.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [*host.nsenter(), *self.argv], stdout=out, stderr=subprocess.STDOUT, env=host.env(PATH)
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and "checking" not in self.log.read_text():
            time.sleep(0.1)
        assert "checking" in self.log.read_text(), self.log.read_text()

    def status(self) -> dict:
        with open(self.status_file) as handle:
            return json.load(handle)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # by PID: nsenter execs the Python, no fork
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise AssertionError("watchdog ignored SIGTERM") from None
        assert self.proc.returncode == 0, self.log.read_text()
        assert "tproxy watch: stopped" in self.log.read_text()


def our_rules(host) -> list[str]:
    return [line for line in ip_rules(host).splitlines() if line.startswith("100:") and "proto 201" in line]


def salt_status(host, pillar) -> dict:
    host.write_pillar(pillar)
    host.salt_call("saltutil.sync_all")
    return host.salt_call("mtproxy.status")["return_path"]


def measure_repair(host, loop, break_it, is_back, what: str) -> float:
    """Break the return path, time (test clock) until the watchdog has it back; the clients succeed again."""
    broken = time.time()
    break_it()
    assert not is_back(), f"{what}: still present right after breaking it"
    start = time.monotonic()
    while not is_back():
        assert time.monotonic() - start < BOUND + 5, f"{what}: not back after {BOUND + 5} s"
        time.sleep(0.05)
    elapsed = time.monotonic() - start
    back = time.time()
    failed = loop.failures_between(broken, back)
    print(f"\nwatchdog repair ({what}): {elapsed:.2f} s; client attempts failed meanwhile: {failed}")
    assert elapsed < BOUND, f"{what}: back only after {elapsed:.2f} s"
    # The client loop is a real probe: without the return path its connections fail.
    assert failed > 0, f"{what}: no client attempt failed while the return path was broken"
    loop.wait_ok(since=back + 0.5)
    loop.stop()  # assert_cell_serves counts the replicas' connections
    return broken


def assert_logged_and_recorded(watchdog, since: float, needle: str) -> None:
    lines = [line for line in watchdog.log.read_text().splitlines() if line.startswith("tproxy watch: restored")]
    assert any(needle in line for line in lines), watchdog.log.read_text()
    deadline = time.monotonic() + 10
    status: dict = {}
    while time.monotonic() < deadline:
        status = watchdog.status()
        if status.get("ok") and status.get("last_repair"):
            break
        time.sleep(0.2)
    assert status["ok"] is True and status["error"] is None, status
    assert datetime.fromisoformat(status["last_repair"]).timestamp() >= since - 1, status
    assert any(needle in item for item in status["repaired"]), status


@pytest.fixture(scope="module")
def mark_cell(testhost):
    host = testhost
    pillar = watchdog_pillar(host)
    apply(host, pillar)
    assert_cell_serves(host, pillar, 2)
    return host, pillar


@pytest.fixture
def client_loop(mark_cell):
    loop = ClientLoop(mark_cell[0])
    loop.wait_ok(since=0)
    yield loop
    loop.stop()


@pytest.fixture
def watchdog(mark_cell):
    dog = Watchdog(mark_cell[0])
    yield dog
    dog.stop()


def test_watchdog_unit(mark_cell):
    host, pillar = mark_cell
    text = (host.workdir / "systemd" / WATCHDOG_UNIT).read_text()
    for line in ("Type=simple", "Restart=always", "After=mtproxy-return-path.service", "WantedBy=multi-user.target"):
        assert line in text.splitlines(), text
    argv = unit_command(host, WATCHDOG_UNIT)
    boot = unit_command(host, "mtproxy-return-path.service")
    config = pillar["mtproxy"]["config_dir"] + "/return-path.json"
    status = pillar["mtproxy"]["run_dir"] + "/return-path.status"
    assert argv == [*boot[:2], "watch", "--config", config, "--interval", "3", "--status", status]
    # Only the boot unit it comes after is absent here.
    assert unit_problems(host.workdir / "systemd" / WATCHDOG_UNIT, "mtproxy-return-path.service") == []


def test_status_reports_missing_rules_without_watchdog(mark_cell):
    host, pillar = mark_cell
    healthy = salt_status(host, pillar)
    assert healthy["ok"] is True and healthy["missing"] == [] and healthy["watchdog"] is None, healthy
    host.run(["ip", "route", "del", "local", "0.0.0.0/0", "dev", "lo", "table", "100"])
    try:
        broken = salt_status(host, pillar)
        assert broken["ok"] is False, broken
        assert broken["missing"] == ["ip route local 0.0.0.0/0 dev lo table 100 proto 201"], broken
    finally:
        host.run(unit_command(host, "mtproxy-return-path.service"), env=PATH)
    assert salt_status(host, pillar)["ok"] is True


def test_watchdog_restores_flushed_mangle_rules(mark_cell, client_loop, watchdog):
    host, pillar = mark_cell
    since = measure_repair(
        host,
        client_loop,
        lambda: host.run(["iptables", "-t", "mangle", "-F", "OUTPUT"]),
        lambda: "mtproxy-formula tproxy: mtproxy" in mangle_output(host),
        "mark: mangle OUTPUT flushed",
    )
    assert_logged_and_recorded(watchdog, since, "iptables -t mangle -A OUTPUT")
    assert_cell_serves(host, pillar, 2)
    report = salt_status(host, pillar)
    assert report["ok"] is True and report["missing"] == [], report
    assert report["watchdog"]["last_repair"] and report["watchdog"]["repaired"], report


def test_watchdog_restores_the_route_and_leaves_foreign_rules(mark_cell, client_loop, watchdog):
    host, pillar = mark_cell
    foreign_rule = ["pref", "150", "fwmark", "0x7", "lookup", "100"]
    foreign_mangle = ["-p", "udp", "--dport", "9", "-j", "MARK", "--set-mark", "7"]
    host.run(["ip", "rule", "add", *foreign_rule])
    host.run(["iptables", "-t", "mangle", "-A", "OUTPUT", *foreign_mangle])
    try:
        since = measure_repair(
            host,
            client_loop,
            lambda: host.run(["ip", "route", "del", "local", "0.0.0.0/0", "dev", "lo", "table", "100"]),
            lambda: "local default dev lo" in table_routes(host),
            "table-100 route deleted",
        )
        assert_logged_and_recorded(watchdog, since, "ip route local 0.0.0.0/0 dev lo table 100")
        assert_cell_serves(host, pillar, 2)
        # Ours only: the foreign rule (even in our table) and mangle rule survive.
        assert "150:\tfrom all fwmark 0x7 lookup 100" in ip_rules(host), ip_rules(host)
        assert "-A OUTPUT -p udp -m udp --dport 9 -j MARK --set-xmark 0x7/0xffffffff" in mangle_output(host)
    finally:
        host.run(["ip", "rule", "del", *foreign_rule], check=False)
        host.run(["iptables", "-t", "mangle", "-D", "OUTPUT", *foreign_mangle], check=False)


def test_watchdog_restores_the_sport_rule(mark_cell, client_loop):
    host, _ = mark_cell
    pillar = watchdog_pillar(host, tproxy={"method": "sport"})
    apply(host, pillar)
    assert "mtproxy" not in mangle_output(host)
    rules = our_rules(host)
    assert len(rules) == 1 and "ipproto tcp sport 4431-4432 lookup 100" in rules[0], ip_rules(host)
    client_loop.wait_ok(since=time.time())
    dog = Watchdog(host)
    try:
        # `ip rule del pref 100 ...` with the selector read back from `ip rule`.
        selector = rules[0].split(":", 1)[1].split()
        since = measure_repair(
            host,
            client_loop,
            lambda: host.run(["ip", "rule", "del", "pref", "100", *selector]),
            lambda: our_rules(host) == rules,
            "sport: ip rule deleted",
        )
        assert_logged_and_recorded(dog, since, "ipproto tcp sport 4431-4432")
        assert_cell_serves(host, pillar, 2)
        assert salt_status(host, pillar)["ok"] is True
    finally:
        dog.stop()


def test_clean_removes_the_watchdog_unit(mark_cell):
    host, _ = mark_cell
    pillar = watchdog_pillar(host, tproxy={"method": "sport"})
    unit = host.workdir / "systemd" / WATCHDOG_UNIT
    assert unit.exists()
    apply(host, pillar, sls="mtproxy.clean")
    assert not unit.exists()
    assert not our_rules(host) and "local" not in table_routes(host)
