"""The cell exporter (issue 19): one Prometheus endpoint with per-secret
sessions and bytes of every replica, fed by real MTProto sessions.

A 2-replica mtprotoproxy cell with two secrets, the test-only image pointing
at the stand-in data centre (test/standin_dc.py), clients from the client
namespace (test/traffic.py). The stand-in counts every byte it receives and
echoes: mtprotoproxy counts both directions of what it relays, so each
secret's bytes must equal what the stand-in saw for its sessions, exactly.

Systemd is not PID 1 in a test host: the exporter unit's ExecStart, as the
formula installed it, runs in the test host's namespace and is ended by PID.
Every scrape is checked for the secrets (hex either case, base64).
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cell import FRONTEND_PORT, apply, cell_pillar, changed, containers, replica_names, unit_command, wait_servers_up
from standin_dc import StandIn, derive_image
from testhost import stop_process

pytestmark = pytest.mark.integration

SECRETS = ("6b1d9e0c4f2a83b7d5e91c0a7f3b2d48", "c83e1f5a0d7b9264e1a3c5f7092b4d6e")
UNIT = "mtproxy-exporter.service"
PORT = 9848
INTERVAL = 2
TRAFFIC = Path(__file__).resolve().parents[1] / "traffic.py"
DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "mtproxy-cell.json"
COUNTERS = ("mtproxy_secret_connections_total", "mtproxy_secret_bytes_total")
SAMPLE = re.compile(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'(\w+)="([^"]*)"')
FETCH = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"


def forbidden() -> list[str]:
    """Every form a secret could take in text."""
    forms = []
    for secret in SECRETS:
        raw = bytes.fromhex(secret)
        forms += [secret, secret.upper(), base64.b64encode(raw).decode().rstrip("=")]
        forms.append(base64.urlsafe_b64encode(raw).decode().rstrip("="))
    return forms


def assert_no_secret(text: str, where: str) -> None:
    found = [form for form in forbidden() if form in text]
    assert not found, f"a secret appears in {where}"


def parse(text: str) -> dict[tuple, float]:
    """Samples as {(name, (label, value), ...): value}."""
    samples = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            labels = tuple(sorted(LABEL.findall(match.group(2) or "")))
            samples[(match.group(1), *labels)] = float(match.group(3))
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, *sorted(labels.items()))]


def per_secret(samples: dict, name: str, secret: int) -> float:
    """The sum over replicas, as PromQL's sum by (secret) would give it."""
    return sum(v for key, v in samples.items() if key[0] == name and ("secret", str(secret)) in key[1:])


class Exporter:
    """The unit's command in the test host; every scrape is kept for the monotonic check."""

    def __init__(self, host) -> None:
        self.host = host
        self.log = host.workdir / "exporter.log"
        with open(self.log, "w") as out:
            # nsenter execs the Python: the PID is the exporter's own.
            self.proc = subprocess.Popen(
                [*host.nsenter(), *unit_command(host, UNIT)], stdout=out, stderr=subprocess.STDOUT
            )
        self.scrapes: list[dict] = []
        deadline = time.monotonic() + 20
        while "serving" not in self.log.read_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def scrape(self) -> dict[tuple, float]:
        text = self.host.run([sys.executable, "-c", FETCH, f"http://127.0.0.1:{PORT}/metrics"], timeout=20).stdout
        assert_no_secret(text, "the scrape")
        self.text = text
        samples = parse(text)
        self.scrapes.append(samples)
        return samples

    def wait(self, done, timeout: float = 4 * INTERVAL + 10) -> dict:
        """Scrape until ``done(samples)``; the last scrape."""
        deadline = time.monotonic() + timeout
        while True:
            samples = self.scrape()
            if done(samples) or time.monotonic() > deadline:
                return samples
            time.sleep(0.5)

    def fresh(self) -> dict:
        """A scrape of a poll that started after this call (the one served may be up to an interval old)."""
        since = time.time()
        return self.wait(lambda s: s.get(("mtproxy_exporter_last_poll_timestamp_seconds",), 0) > since)

    def assert_monotonic(self) -> None:
        """No counter of any replica's series ever went backwards, over every scrape so far."""
        last: dict[tuple, float] = {}
        for samples in self.scrapes:
            for key, number in samples.items():
                if key[0].endswith("_total"):
                    assert number >= last.get(key, 0), f"{key} went from {last[key]} to {number}"
                    last[key] = number

    def stop(self) -> None:
        stop_process(self.proc)


def traffic(host, secret: str, sessions: int, packets: int, hold=None) -> dict:
    """test/traffic.py sessions (``dd`` secret) from the client namespace; with
    ``hold``, called once every session is open, before any packet."""
    cmd = [sys.executable, str(TRAFFIC), host.address, str(FRONTEND_PORT), secret, "--transport", "secure"]
    cmd += ["--sessions", str(sessions), "--packets", str(packets), "--stdin"]
    proc = subprocess.Popen(
        [*host.nsenter(client=True), *cmd],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stderr.readline()
        assert '"ready"' in line, line + proc.stderr.read()[-2000:]
        if hold:
            hold()
        out, err = proc.communicate("go\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, err[-2000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["failed"] == 0 and report["mismatches"] == 0, {k: v for k, v in report.items() if k != "each"}
    return report


@pytest.fixture(scope="module")
def cell(testhost):
    image = derive_image(testhost)
    dc = StandIn(testhost)
    pillar = cell_pillar(
        testhost,
        image=image,
        secret=SECRETS[0],
        extra_secrets=[SECRETS[1]],
        exporter={"interval": INTERVAL},
    )
    apply(testhost, pillar)
    wait_servers_up(testhost, pillar, replica_names(2))
    exporter = Exporter(testhost)
    yield testhost, pillar, dc, exporter
    exporter.stop()
    dc.stop()


def stats_up(samples: dict, names=("mtproxy_1", "mtproxy_2")) -> bool:
    return all(samples.get(("mtproxy_replica_stats_up", ("replica", n))) == 1 for n in names)


def test_known_sessions_and_bytes_are_counted_per_secret_summed_over_replicas(cell):
    """Each secret's sessions (open now, and in total) and bytes, summed over
    the 2 replicas, are exactly what the clients opened and the stand-in
    relayed, within one stats period of the sessions' end. Both replicas
    served some; the cell totals are the sums."""
    host, _, dc, exporter = cell
    exporter.wait(stats_up)
    before = exporter.fresh()
    assert stats_up(before), before
    plan = {0: (12, 30), 1: (6, 20)}  # secret -> sessions, packets each
    relayed, held = {}, {}
    for index, (sessions, packets) in plan.items():
        start = dc.wait_idle()

        def while_open(index=index, sessions=sessions):
            # Open and idle: every session counts as open on some replica within one period.
            held[index] = exporter.wait(lambda s: per_secret(s, "mtproxy_secret_connections", index) == sessions)

        traffic(host, SECRETS[index], sessions, packets, hold=while_open)
        end = dc.wait_idle()
        relayed[index] = end["bytes_in"] - start["bytes_in"] + end["bytes_out"] - start["bytes_out"]
    after = exporter.wait(
        lambda s: all(
            per_secret(s, "mtproxy_secret_bytes_total", i) - per_secret(before, "mtproxy_secret_bytes_total", i)
            == relayed[i]
            for i in plan
        ),
        timeout=INTERVAL + 5,
    )
    counted = {}
    for index in plan:
        counted[index] = {
            "open_while_held": per_secret(held[index], "mtproxy_secret_connections", index),
            "sessions": per_secret(after, "mtproxy_secret_connections_total", index)
            - per_secret(before, "mtproxy_secret_connections_total", index),
            "bytes": per_secret(after, "mtproxy_secret_bytes_total", index)
            - per_secret(before, "mtproxy_secret_bytes_total", index),
            "relayed_by_standin": relayed[index],
            "by_replica": {
                name: value(after, "mtproxy_secret_connections_total", secret=str(index), replica=name)
                - before.get(("mtproxy_secret_connections_total", ("replica", name), ("secret", str(index))), 0)
                for name in replica_names(2)
            },
        }
    print("\nexporter, known traffic:", json.dumps(counted))
    for index, (sessions, _) in plan.items():
        assert counted[index]["open_while_held"] == sessions, counted
        assert counted[index]["sessions"] == sessions, counted
        assert counted[index]["bytes"] == relayed[index] > 0, counted
    # leastconn spread the sessions of the larger run over both replicas.
    assert all(n > 0 for n in counted[0]["by_replica"].values()), counted
    assert per_secret(after, "mtproxy_secret_connections", 0) == 0
    for cell_name, name in (
        ("mtproxy_cell_bytes_total", "mtproxy_secret_bytes_total"),
        ("mtproxy_cell_connections_total", "mtproxy_secret_connections_total"),
    ):
        assert value(after, cell_name) == sum(per_secret(after, name, i) for i in plan)
    assert value(after, "mtproxy_cell_replicas") == 2 and value(after, "mtproxy_cell_replicas_up") == 2
    assert value(after, "mtproxy_return_path_ok") == 1 and value(after, "mtproxy_haproxy_up") == 1
    # mtproxy.status: the same totals (no replica restarted yet).
    host.write_pillar(cell[1])
    host.salt_call("saltutil.sync_all")
    status = host.salt_call("mtproxy.status")
    assert_no_secret(json.dumps(status), "mtproxy.status")
    for entry in status["secrets"]:
        assert entry["connections_total"] == per_secret(after, "mtproxy_secret_connections_total", entry["secret"])
        assert entry["bytes_total"] == per_secret(after, "mtproxy_secret_bytes_total", entry["secret"])
    exporter.assert_monotonic()


def test_every_metric_of_the_dashboard_is_in_a_live_scrape(cell):
    _, _, _, exporter = cell
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    names = set()
    for expr in exprs:
        # Leave out label matchers, ranges and grouping clauses; what is left that is not a function is a metric.
        bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(by|without)\s*\([^)]*\)", " ", expr)
        names |= {m for m in re.findall(r"\b([a-z_][a-z0-9_]*)\b(?!\s*\()", bare)} - {"by", "without", "and", "or"}
    scraped = {key[0] for key in exporter.scrape()}
    print("\nsample scrape:\n" + exporter.text)
    assert names and exprs
    assert sorted(names - scraped) == [], f"the dashboard queries metrics the scrape lacks: {sorted(names - scraped)}"


def test_a_replica_restart_never_moves_a_counter_backwards(cell):
    """A restarted replica starts counting from 0; its series carries on from
    where it was, and the new process's sessions add to it."""
    host, _, _, exporter = cell
    exporter.wait(stats_up)
    before = exporter.fresh()
    restarts = value(before, "mtproxy_replica_restarts_total", replica="mtproxy_1")
    host.docker("restart", "-t", "2", "mtproxy_1")
    after = exporter.wait(
        lambda s: stats_up(s) and value(s, "mtproxy_replica_restarts_total", replica="mtproxy_1") > restarts
    )
    assert value(after, "mtproxy_replica_restarts_total", replica="mtproxy_1") == restarts + 1
    for name in COUNTERS:
        for index in (0, 1):
            key = {"secret": str(index), "replica": "mtproxy_1"}
            assert value(after, name, **key) == value(before, name, **key), (name, key)
    wait_servers_up(host, cell[1], replica_names(2))
    # New sessions on the new process add to the carried-over counts.
    traffic(host, SECRETS[0], 8, 5)
    later = exporter.wait(
        lambda s: per_secret(s, "mtproxy_secret_connections_total", 0)
        == per_secret(after, "mtproxy_secret_connections_total", 0) + 8
    )
    assert (
        per_secret(later, "mtproxy_secret_connections_total", 0)
        == per_secret(after, "mtproxy_secret_connections_total", 0) + 8
    )
    exporter.assert_monotonic()


def test_the_exporter_serves_while_a_replica_is_down_and_through_a_dockerd_restart(cell):
    host, pillar, _, exporter = cell
    exporter.wait(stats_up)
    before = exporter.fresh()
    host.docker("stop", "-t", "2", "mtproxy_2")
    try:
        down = exporter.wait(
            lambda s: value(s, "mtproxy_replica_stats_up", replica="mtproxy_2") == 0
            and value(s, "mtproxy_replica_up", replica="mtproxy_2") == 0
        )
        assert value(down, "mtproxy_replica_stats_up", replica="mtproxy_2") == 0
        assert value(down, "mtproxy_replica_up", replica="mtproxy_2") == 0
        assert value(down, "mtproxy_cell_replicas_up") == 1
        # A down replica keeps its counters where they were.
        for name in COUNTERS:
            key = {"secret": "0", "replica": "mtproxy_2"}
            assert value(down, name, **key) == value(before, name, **key)
    finally:
        host.docker("start", "mtproxy_2")
    exporter.wait(stats_up)

    # Scrape all through a dockerd restart (its containers go down and come back).
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def scrape_loop() -> None:
        while not stop.is_set():
            try:
                exporter.scrape()
                answered[0] += 1
            except Exception as exc:  # any failure to answer counts
                failures.append(repr(exc)[:300])
            time.sleep(0.3)

    loop = threading.Thread(target=scrape_loop, daemon=True)
    loop.start()
    try:
        host.restart_dockerd()
        wait_servers_up(host, pillar, replica_names(2), timeout=90)
        back = exporter.wait(stats_up, timeout=60)
    finally:
        stop.set()
        loop.join(timeout=30)
    print(f"\nexporter through a dockerd restart: {answered[0]} scrapes answered, {len(failures)} failed")
    assert failures == [], failures[:5]
    assert exporter.proc.poll() is None
    assert stats_up(back) and value(back, "mtproxy_haproxy_up") == 1
    # The replicas restarted with dockerd: new processes, counters carried over.
    exporter.assert_monotonic()


def test_no_secret_in_the_exporter_files_or_its_log(cell):
    host, pillar, _, exporter = cell
    config = Path(pillar["mtproxy"]["config_dir"])
    assert_no_secret((config / "exporter.json").read_text(), "exporter.json")
    assert_no_secret(exporter.log.read_text(), "the exporter's log")
    # The replicas' own stats answer (what the exporter reads) names users, not secrets.
    answer = host.run([sys.executable, "-c", FETCH, "http://127.0.0.1:14431/stats"]).stdout
    assert_no_secret(answer, "a replica's stats")
    assert set(json.loads(answer)["users"]) == {"tg", "tg2"}


def test_a_second_apply_changes_nothing_and_clean_removes_the_exporter(cell):
    host, pillar, _, exporter = cell
    # (HAProxy restarted with dockerd: the first apply reloads it once.)
    apply(host, pillar)
    assert changed(apply(host, pillar)) == {}
    unit = host.workdir / "systemd" / UNIT
    config = Path(pillar["mtproxy"]["config_dir"])
    assert unit.exists() and (config / "exporter.json").exists() and (config / "bin" / "mtproxy_exporter.py").exists()
    exporter.stop()
    apply(host, pillar, sls="mtproxy.clean")
    assert not unit.exists() and not config.exists()
    assert containers(host) == {}
