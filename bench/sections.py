"""The benchmark sections, each run against a cell deployed by the formula
into one test host. Each returns a JSON-able dict: raw runs plus summaries
(median and min-max over repetitions) and ratios against a baseline measured
in the same run. bench/report.py turns them into results.md and the plot.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cell import (
    BASE_PORT,
    FRONTEND_PORT,
    HOLD,
    Load,
    admin_command,
    admin_socket,
    apply,
    changed,
    held_clients_pillar,
    replica_names,
    servers,
    show_stat,
    vip_addresses,
    vip_move,
    wait_held,
    wait_servers_up,
)
from standin_dc import StandIn, derive_image
from testhost import Segment, TestHost

from bench.stats import ratio, summary

BENCH = Path(__file__).resolve().parent
NETLOAD = BENCH / "netload.py"
BACKEND_IMAGE = "mtproxy-formula/bench-backend:local"
# bench/backend.py also listens here: outside the return-path rules, so a
# client reaches it directly (the data path's baseline).
DIRECT_OFFSET = 1000
# Both variants get the same maxconn (HAProxy's descriptor reservation depends
# on it); below the default, as when this bench first compared splice without
# the formula's maxpipes.
DATAPATH_MAXCONN = 7500
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Plan:
    """How much of everything: ``full`` for `make bench`, ``quick`` for development."""

    reps: int = 3
    datapath_reps: int = 5
    rate_seconds: float = 3.0
    concurrency: int = 32
    latency_rate: float = 200.0
    latency_seconds: float = 3.0
    bulk_bytes: int = 2**30
    held: int = 10_000
    hold_rate: float = 2000.0
    probe_rate: float = 50.0
    probe_seconds: float = 5.0
    kills: int = 5
    reloads: int = 10
    quiet_seconds: float = 10.0
    realpath_reps: int = 5
    realpath_seconds: float = 3.0
    rtt_packets: int = 2000
    guard_open_rate: float = 100.0

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            reps=1,
            datapath_reps=1,
            rate_seconds=2.0,
            latency_seconds=2.0,
            bulk_bytes=2**28,
            held=2000,
            probe_seconds=3.0,
            kills=2,
            reloads=3,
            quiet_seconds=4.0,
            realpath_reps=1,
            realpath_seconds=2.0,
            rtt_packets=500,
        )


# -- processes of a container, from /proc (root PID namespace) --------------------


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the given processes (all their threads)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
    return total


class Cell:
    """One test host and the cell the formula deploys in it."""

    def __init__(self, host: TestHost, plan: Plan, secret: str, log: Callable[[str], None]):
        self.host, self.plan, self.secret, self.log = host, plan, secret, log
        self.frontend = f"{host.address}:{FRONTEND_PORT}"

    def pillar(self, **overrides) -> dict:
        return held_clients_pillar(self.host, secret=self.secret, **overrides)

    def deploy(self, pillar: dict) -> float:
        """Apply ``pillar`` and wait until every replica is UP; the apply's wall time."""
        start = time.monotonic()
        apply(self.host, pillar)
        took = time.monotonic() - start
        wait_servers_up(self.host, pillar, replica_names(pillar["mtproxy"].get("replicas", 2)))
        return took

    def container_pid(self, name: str) -> int:
        return int(self.host.docker("inspect", "--format", "{{.State.Pid}}", name).stdout)

    def haproxy_pids(self) -> list[int]:
        return descendants(self.container_pid("mtproxy_haproxy"))

    def client_cmd(self, script: Path, *args: str) -> list[str]:
        return [*self.host.nsenter(client=True), sys.executable, str(script), *args]

    def netload(self, mode: str, target: str, *args: str, timeout: float = 120) -> dict:
        proc = self.host.client_run([sys.executable, str(NETLOAD), mode, target, *args], timeout=timeout)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def tune_namespaces(self) -> None:
        """Many short connections leave TIME_WAIT sockets; in our own namespaces
        only, let connect() reuse them and, in the client's, widen the ephemeral
        port range (the test host keeps its own: the formula refuses replica
        ports inside it)."""
        self.host.run(["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"])
        self.host.client_run(
            ["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65000", "net.ipv4.tcp_tw_reuse=1"]
        )


def load_summary(report: dict) -> dict:
    """What sections 3 and 4 keep of a loadgen report."""
    new, long = report["new"], report["long"]
    return {
        "new_attempted": new["attempted"],
        "new_failed": new["failed"],
        "new_errors": new["errors"],
        "new_rate": new["rate"],
        "long_opened": long["opened"],
        "long_survived": long["survived"],
        "client": report.get("client", {}),
    }


# -- 1. data path -------------------------------------------------------------------


def make_backend_image(host: TestHost) -> None:
    """The mtprotoproxy image with bench/backend.py as entry point (no builder needed)."""
    if host.docker("image", "inspect", BACKEND_IMAGE, check=False).returncode == 0:
        return
    image = "mtproxy-formula/mtprotoproxy:local"
    host.docker("create", "--name", "bench-backend-build", image)
    try:
        host.docker("cp", str(BENCH / "backend.py"), "bench-backend-build:/usr/local/bin/bench-backend.py")
        # The formula runs the replica through its stats hook (python3 stats.py
        # PORT /usr/local/bin/mtprotoproxy CONFIG), not the image's entry point:
        # the backend takes mtprotoproxy's place there too.
        host.docker("cp", str(BENCH / "backend.py"), "bench-backend-build:/usr/local/bin/mtprotoproxy")
        entry = '["python3", "/usr/local/bin/bench-backend.py"]'
        host.docker("commit", "--change", f"ENTRYPOINT {entry}", "bench-backend-build", BACKEND_IMAGE)
    finally:
        host.docker("rm", "-f", "bench-backend-build", check=False)


DATAPATH_VARIANTS = {"no splice": False, "splice": True}


def measure_paths(cell: Cell, targets: dict[str, str], runs: dict) -> None:
    """One repetition: each measurement direct, then through the cell, so both see the same machine."""
    plan = cell.plan
    args = {
        "rate": [f"--duration={plan.rate_seconds}", f"--concurrency={plan.concurrency}"],
        "latency": [f"--rate={plan.latency_rate}", f"--duration={plan.latency_seconds}"],
        "bulk": [f"--bytes={plan.bulk_bytes}"],
    }
    for mode, mode_args in args.items():
        for path, target in targets.items():
            pids = cell.haproxy_pids()
            before = cpu_seconds(pids)
            result = cell.netload(mode, target, *mode_args)
            result["haproxy_cpu_s"] = round(cpu_seconds(pids) - before, 3)
            runs[path][mode].append(result)


def datapath(cell: Cell) -> dict:
    plan = cell.plan
    make_backend_image(cell.host)
    cell.tune_namespaces()
    targets = {"direct": f"{cell.host.address}:{BASE_PORT + DIRECT_OFFSET}", "cell": cell.frontend}
    runs = {v: {path: {"rate": [], "latency": [], "bulk": []} for path in targets} for v in DATAPATH_VARIANTS}
    current = None
    for rep in range(plan.datapath_reps):
        # The variants alternate (ABBA...): each repetition compares them a few seconds apart.
        order = list(DATAPATH_VARIANTS) if rep % 2 == 0 else list(reversed(DATAPATH_VARIANTS))
        for variant in order:
            if variant != current:
                # The replay guard off: this backend speaks first and the client
                # waits for it, so the guard would hold every connection for its
                # inspect delay. Section replay_guard measures it with real clients.
                haproxy = {
                    "splice": DATAPATH_VARIANTS[variant],
                    "maxconn": DATAPATH_MAXCONN,
                    "replay_guard": {"enabled": False},
                }
                cell.deploy(cell.pillar(image=BACKEND_IMAGE, haproxy=haproxy))
                current = variant
            cell.log(f"data path: {variant}, repetition {rep + 1}/{plan.datapath_reps}")
            measure_paths(cell, targets, runs[variant])
    variants = {v: {"splice": s, "runs": runs[v], **datapath_summary(runs[v])} for v, s in DATAPATH_VARIANTS.items()}
    return {
        "targets": targets,
        "maxconn": DATAPATH_MAXCONN,
        "variants": variants,
        "verdict": splice_verdict(runs["splice"]["cell"], runs["no splice"]["cell"]),
    }


def datapath_summary(runs: dict) -> dict:
    """Per path (direct, cell): medians with spread; per metric: cell/direct
    ratios of each repetition (paired), summarised."""
    paths = {}
    for path, kinds in runs.items():
        gib = [b["bytes"] / 2**30 for b in kinds["bulk"]]
        paths[path] = {
            "conn_per_s": summary(r["per_s"] for r in kinds["rate"]),
            "p50_ms": summary(r["latency_ms"]["p50"] for r in kinds["latency"]),
            "p99_ms": summary(r["latency_ms"]["p99"] for r in kinds["latency"]),
            "mib_per_s": summary(b["mib_per_s"] for b in kinds["bulk"]),
            "haproxy_cpu_s_per_gib": summary(b["haproxy_cpu_s"] / g for b, g in zip(kinds["bulk"], gib, strict=True)),
            "haproxy_cpu_ms_per_1000_conn": summary(r["haproxy_cpu_s"] * 1e6 / max(r["ok"], 1) for r in kinds["rate"]),
            "failed": sum(r["failed"] for r in kinds["rate"] + kinds["latency"])
            + sum(not b["complete"] for b in kinds["bulk"]),
            "client_cpu_percent_max": max(r["client"]["cpu_percent"] for k in kinds.values() for r in k),
            "client_saturated_runs": sum(r["client"]["saturated"] for k in kinds.values() for r in k),
            "latency_achieved_rate": summary(r["achieved_rate"] for r in kinds["latency"]),
            "latency_schedule_lag_max_ms": max(r["client"]["schedule_lag_max_s"] for r in kinds["latency"]) * 1000,
        }

    cell, direct = runs["cell"], runs["direct"]
    ratios = {
        "conn_per_s": paired(cell["rate"], direct["rate"], lambda r: r["per_s"]),
        "p50_ms": paired(cell["latency"], direct["latency"], lambda r: r["latency_ms"]["p50"]),
        "p99_ms": paired(cell["latency"], direct["latency"], lambda r: r["latency_ms"]["p99"]),
        "mib_per_s": paired(cell["bulk"], direct["bulk"], lambda r: r["mib_per_s"]),
    }
    return {"paths": paths, "ratios": ratios}


def paired(ours: list[dict], base: list[dict], value: Callable[[dict], float]) -> dict:
    """Summary of ``value(ours[i]) / value(base[i])`` over the repetitions (measured close in time)."""
    return summary((ratio(value(a), value(b), digits=4) for a, b in zip(ours, base, strict=True)), digits=2)


def splice_verdict(splice: dict, plain: dict) -> dict:
    """Through the cell, splice against no splice, repetition by repetition.

    Splice wins when it moves bulk data faster (median +5 %) with less HAProxy
    CPU per GiB (median), and costs no new-connection rate or latency: a cost
    counts only when every repetition shows it (10 % or more), as noise on two
    shared cores easily moves one repetition by that much.
    """
    ratios = {
        "mib_per_s": paired(splice["bulk"], plain["bulk"], lambda r: r["mib_per_s"]),
        "haproxy_cpu_per_gib": paired(splice["bulk"], plain["bulk"], lambda r: r["haproxy_cpu_s"] / r["bytes"]),
        "conn_per_s": paired(splice["rate"], plain["rate"], lambda r: r["per_s"]),
        "p50_ms": paired(splice["latency"], plain["latency"], lambda r: r["latency_ms"]["p50"]),
    }
    wins = (
        ratios["mib_per_s"]["median"] >= 1.05
        and ratios["haproxy_cpu_per_gib"]["median"] < 1
        and ratios["conn_per_s"]["max"] >= 0.9
        and ratios["p50_ms"]["min"] <= 1.1
    )
    return {"splice_vs_plain": ratios, "splice_wins": wins}


# -- 2. concurrency -----------------------------------------------------------------


# Descriptors HAProxy keeps beside its connections: listeners, sockets, checks, logs.
FD_RESERVE = 100


def open_files_limit(pid: int) -> int:
    """The soft open-files limit of a process (a container's: dockerd's)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise RuntimeError(f"no open-files limit for {pid}")


def frontend_sessions(cell: Cell, pillar: dict) -> int:
    rows = show_stat(cell.host, admin_socket(pillar))
    return next(int(r["scur"]) for r in rows if r["pxname"] == "mtproxy" and r["svname"] == "FRONTEND")


def probe_summary(runs: list[dict]) -> dict:
    """Latency probes repeated: p50 and p99 of each, summarised; what the prober achieved."""
    return {
        "p50_ms": summary(r["latency_ms"]["p50"] for r in runs if r["latency_ms"]),
        "p99_ms": summary(r["latency_ms"]["p99"] for r in runs if r["latency_ms"]),
        "achieved_rate": summary(r["achieved_rate"] for r in runs),
        "target_rate": runs[0]["target_rate"],
        "failed": sum(r["failed"] for r in runs),
        "client_cpu_percent_max": max(r["client"]["cpu_percent"] for r in runs),
    }


def concurrency(cell: Cell) -> dict:
    plan = cell.plan
    cell.tune_namespaces()
    # HAProxy takes two descriptors per connection and refuses a maxconn its
    # open-files limit (dockerd's, inherited) cannot hold: fit both to it.
    limit = open_files_limit(cell.host.dockerd_pid)
    maxconn = min(plan.held + 2000, (limit - FD_RESERVE) // 2)
    held_wanted = min(plan.held, maxconn - 50)
    # Idle connections hold no pipe; without splice HAProxy reserves none, so
    # its descriptors all go to connections.
    pillar = cell.pillar(haproxy={"maxconn": maxconn, "splice": False})
    cell.deploy(pillar)

    def probe() -> dict:
        return cell.netload(
            "latency",
            cell.frontend,
            f"--rate={plan.probe_rate}",
            f"--duration={plan.probe_seconds}",
            f"--handshake={cell.secret}",
        )

    pids = cell.haproxy_pids()
    haproxy_limit = open_files_limit(pids[0])
    idle_rss = rss_bytes(pids)
    cell.log("concurrency: baseline probes")
    baseline = [probe() for _ in range(plan.reps)]
    cell.log(f"concurrency: opening {held_wanted} idle connections (maxconn {maxconn}, fd limit {limit})")
    holder = subprocess.Popen(
        cell.client_cmd(NETLOAD, "hold", cell.frontend, f"--count={held_wanted}", f"--rate={plan.hold_rate}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = json.loads(holder.stderr.readline() or "{}")
        deadline = time.monotonic() + 30
        sessions = 0
        while time.monotonic() < deadline and sessions < ready.get("open", 0):
            sessions = frontend_sessions(cell, pillar)
            time.sleep(0.5)
        time.sleep(1)
        pids = cell.haproxy_pids()
        held_rss = rss_bytes(pids)
        sessions = frontend_sessions(cell, pillar)
        cell.log(f"concurrency: {sessions} sessions held, probing")
        loaded = [probe() for _ in range(plan.reps)]
    finally:
        if holder.poll() is None:
            holder.send_signal(signal.SIGTERM)
        out, _ = holder.communicate(timeout=60)
    held = json.loads(out.strip().splitlines()[-1])
    out = {
        "wanted": plan.held,
        "open_files_limit": {"dockerd": limit, "haproxy": haproxy_limit},
        "maxconn": maxconn,
        "held": held,
        "haproxy_sessions": sessions,
        "haproxy_rss_idle_mib": round(idle_rss / 2**20, 1),
        "haproxy_rss_held_mib": round(held_rss / 2**20, 1),
        "rss_kib_per_connection": round((held_rss - idle_rss) / 1024 / max(sessions, 1), 2),
        "baseline": probe_summary(baseline),
        "loaded": probe_summary(loaded),
        "probes": {"baseline": baseline, "loaded": loaded},
    }
    for key in ("p50_ms", "p99_ms"):
        out[key.replace("_ms", "_ratio")] = ratio(out["loaded"][key].get("median"), out["baseline"][key].get("median"))
    return out


# -- 3. failover --------------------------------------------------------------------


# Longer than the original profile's worst case: fall 2 x inter 3s, plus a check in flight.
DOWN_WAIT = 8.0


def seen_down(cell: Cell, pillar: dict, name: str, timeout: float) -> float | None:
    """Poll HAProxy's admin socket until it reports ``name`` DOWN; when (monotonic), or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            row = servers(cell.host, pillar).get(name)
        except (subprocess.SubprocessError, OSError):
            row = None  # the socket is busy or reloading: try again
        if row and row["status"].startswith("DOWN"):
            return time.monotonic()
        time.sleep(0.02)
    return None


def kill_replica(cell: Cell, pillar: dict, victim: str, restart: bool) -> dict:
    """SIGKILL a replica (a crash; `docker kill` would count as a manual stop,
    see test_zero_drop) and time HAProxy's DOWN. With ``restart`` Docker's
    restart policy brings it back at once; without, it stays dead until DOWN
    (or :data:`DOWN_WAIT`) and is then started by hand."""
    if not restart:
        cell.host.docker("update", "--restart", "no", victim)
    pid = cell.container_pid(victim)
    killed_wall, killed = time.time(), time.monotonic()
    os.kill(pid, signal.SIGKILL)
    # Restarted before two failed checks (original profile), a replica is never marked DOWN.
    down_at = seen_down(cell, pillar, victim, DOWN_WAIT)
    if not restart:
        cell.host.docker("start", victim)
        cell.host.docker("update", "--restart", "always", victim)
    wait_servers_up(cell.host, pillar, replica_names(2), timeout=60)
    return {
        "victim": victim,
        "restart_policy": restart,
        "killed_wall": killed_wall,
        "down_s": round(down_at - killed, 3) if down_at else None,
        "up_again_s": round(time.monotonic() - killed, 2),
    }


def attribute_failures(kills: list[dict], started: list[float], failed_at: list[float]) -> None:
    """Sort the failed new connections (wall-clock start and failure) by kill.

    ``cut``: open when the kill came (started before it, failed after it): held
    on the victim and cut with it. ``failed_new``: started after the kill (and
    before the next one) and failed before the next kill: refused or closed
    for want of a live replica.
    """
    for i, kill in enumerate(kills):
        end = kills[i + 1]["killed_wall"] if i + 1 < len(kills) else float("inf")
        pairs = list(zip(started, failed_at, strict=True))
        kill["failed_new"] = sum(kill["killed_wall"] <= s < end and f < end for s, f in pairs)
        kill["cut"] = sum(s < kill["killed_wall"] <= f < end for s, f in pairs)


FAILOVER_PROFILES = {
    "original": {"health_check": {"profile": "original"}, "redispatch": False},
    "ours": {"health_check": {"profile": "fast"}, "redispatch": True},
}
KILL_KINDS = {"restarted by Docker": True, "stays down until DOWN": False}


def failover(cell: Cell) -> dict:
    out: dict = {}
    names = replica_names(2)
    for name, haproxy in FAILOVER_PROFILES.items():
        pillar = cell.pillar(haproxy=haproxy)
        cell.deploy(pillar)
        kills = []
        load = Load(cell.host)
        try:
            for kind, restart in KILL_KINDS.items():
                for i in range(cell.plan.kills):
                    time.sleep(1.5)  # leastconn spreads the long-lived clients again
                    kills.append({"kind": kind, **kill_replica(cell, pillar, names[i % 2], restart)})
                    cell.log(f"failover {name}, {kind}: kill {i + 1}: DOWN after {kills[-1]['down_s']} s")
            # The last new connections get HOLD s to fail (or not) before the report.
            report = load.stop(settle=HOLD + 0.5)
        finally:
            load.kill()
        attribute_failures(kills, report["new"]["failed_started"], report["new"]["failed_at"])
        out[name] = {"server_options": haproxy, "kills": kills, "load": load_summary(report), "kinds": {}}
        for kind in KILL_KINDS:
            these = [k for k in kills if k["kind"] == kind]
            out[name]["kinds"][kind] = {
                "kills": len(these),
                "down_detected": sum(k["down_s"] is not None for k in these),
                "down_s": summary(k["down_s"] for k in these if k["down_s"] is not None),
                "failed_new_per_kill": summary(k["failed_new"] for k in these),
                "failed_new_total": sum(k["failed_new"] for k in these),
                "cut_total": sum(k["cut"] for k in these),
            }
    stays = "stays down until DOWN"
    out["down_ratio"] = ratio(
        out["ours"]["kinds"][stays]["down_s"].get("median"), out["original"]["kinds"][stays]["down_s"].get("median")
    )
    return out


# -- 4. operations under load ---------------------------------------------------------


def operations(cell: Cell) -> dict:
    plan = cell.plan
    pillars = [cell.pillar(haproxy={"balance": b}) for b in ("roundrobin", "leastconn")]
    cell.deploy(pillars[1])
    out = {}

    def under_load(label: str, action: Callable[[], dict]) -> None:
        cell.log(f"operations: {label}")
        load = Load(cell.host)
        try:
            start = time.monotonic()
            detail = action()
            took = time.monotonic() - start
            # The last new connections get HOLD s to fail (or not) before the report.
            report = load.stop(settle=HOLD + 0.5)
        finally:
            load.kill()
        out[label] = {"seconds": round(took, 1), **detail, **load_summary(report)}

    def quiet() -> dict:
        time.sleep(plan.quiet_seconds)
        return {}

    def reloads() -> dict:
        applies, done = [], 0
        for i in range(plan.reloads):
            start = time.monotonic()
            result = apply(cell.host, pillars[i % 2])
            applies.append(time.monotonic() - start)
            done += "HAProxy reloads gracefully when its config changes" in changed(result)
        return {"reloads": done, "apply_s": summary(applies)}

    def scale() -> dict:
        steps = {}
        for count in (4, 2):
            steps[f"to_{count}_s"] = round(
                cell.deploy(cell.pillar(replicas=count, haproxy={"balance": "leastconn"})), 1
            )
        return steps

    under_load("no operation", quiet)
    under_load(f"{plan.reloads} config reloads", reloads)
    under_load("scale 2 → 4 → 2", scale)
    return out


# -- 5. Salt ----------------------------------------------------------------------------


def salt(cell: Cell) -> dict:
    pillar = cell.pillar()
    scaled = cell.pillar(replicas=3)
    times: dict[str, list[float]] = {
        "test.ping": [],
        "first": [],
        "no change": [],
        "replicas 2 → 3": [],
        "replicas 3 → 2": [],
    }
    changes_in_no_change = []

    def timed(key: str, pillar: dict) -> dict:
        start = time.monotonic()
        result = apply(cell.host, pillar)
        times[key].append(round(time.monotonic() - start, 2))
        return result

    for rep in range(cell.plan.reps):
        cell.log(f"salt: repetition {rep + 1}/{cell.plan.reps}")
        if rep:
            apply(cell.host, pillar, sls="mtproxy.clean")
        start = time.monotonic()
        cell.host.salt_call("test.ping")
        times["test.ping"].append(round(time.monotonic() - start, 2))
        timed("first", pillar)
        wait_servers_up(cell.host, pillar, replica_names(2))
        changes_in_no_change.append(len(changed(timed("no change", pillar))))
        timed("replicas 2 → 3", scaled)
        timed("replicas 3 → 2", pillar)
    baseline = summary(times["test.ping"])["median"]
    return {
        "times": times,
        "summary": {k: summary(v) for k, v in times.items()},
        "vs_test_ping": {k: ratio(summary(v)["median"], baseline) for k, v in times.items()},
        "no_change_changed_states": changes_in_no_change,
    }


# -- 6. real data path: real replicas relaying MTProto to the stand-in data centre -----------

MTLOAD = BENCH / "mtload.py"
DIRECT_REPLICA = "bench_direct_replica"
# The cell's HAProxy backend (mtproxy.settings).
BACKEND = "mtproxy_replicas"
REALPATH_SETUPS = ("direct", "cell, 1 replica", "cell, 2 replicas")
PARALLEL = 16


def start_direct_replica(cell: Cell, like: str = "mtproxy_1") -> str:
    """A replica like ``like`` (same image, config and limits) on a port outside
    the return-path rules, so a client reaches it directly: the baseline. Its
    address."""
    host = cell.host
    info = json.loads(host.docker("inspect", like).stdout)[0]
    config_dir, mount, _ = info["HostConfig"]["Binds"][0].split(":")
    copy = host.workdir / "bench-direct-replica"
    subprocess.run(["rm", "-rf", str(copy)], check=True)
    subprocess.run(["cp", "-a", config_dir, str(copy)], check=True)
    port = BASE_PORT + DIRECT_OFFSET
    config = copy / "config.py"
    text, count = re.subn(r"(?m)^PORT = \d+$", f"PORT = {port}", config.read_text())
    if count != 1:
        raise RuntimeError(f"no PORT line in {config}")
    config.write_text(text)
    # The command names the stats port of our entry point: another one.
    command = [str(int(a) + DIRECT_OFFSET) if a.isdigit() else a for a in info["Config"]["Cmd"]]
    hc = info["HostConfig"]
    nofile = next((u["Soft"] for u in hc.get("Ulimits") or [] if u["Name"] == "nofile"), 65536)
    host.docker("rm", "-f", DIRECT_REPLICA, check=False)
    host.docker(
        "run", "-d", "--name", DIRECT_REPLICA, "--network", "host",
        "--memory", str(hc["Memory"] or 0), "--ulimit", f"nofile={nofile}:{nofile}",
        "-v", f"{copy}:{mount}:ro", "--entrypoint", info["Config"]["Entrypoint"][0],
        info["Config"]["Image"], *command,
    )  # fmt: skip
    target = f"{host.address}:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if host.run(["ss", "-Hltn", f"sport = :{port}"]).stdout.strip():
            return target
        time.sleep(0.3)
    raise RuntimeError(f"the direct replica does not listen on {target}: {host.docker('logs', DIRECT_REPLICA)}")


class CpuGroups:
    """CPU seconds (utime+stime, all threads) of the processes a run involves, by group."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.start = {name: cpu_seconds(pids) for name, pids in groups.items()}

    def used(self) -> dict[str, float]:
        return {name: round(cpu_seconds(pids) - self.start[name], 3) for name, pids in self.groups.items()}


def set_replica_state(cell: Cell, pillar: dict, name: str, state: str) -> None:
    admin_command(admin_socket(pillar), f"set server {BACKEND}/{name} state {state}")


def mtload(cell: Cell, mode: str, target: str, *args: str, groups: dict[str, list[int]] | None = None) -> dict:
    """bench/mtload.py in the client namespace; with ``groups``, their CPU use during the run."""
    cpu = CpuGroups(groups or {})
    proc = cell.host.client_run([sys.executable, str(MTLOAD), mode, target, cell.secret, *args], timeout=180)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["cpu_s"] = {"client": result["client"]["cpu_s"], **cpu.used()}
    return result


def realpath(cell: Cell) -> dict:
    """Real mtprotoproxy replicas (the test-only image) relaying MTProto to the
    stand-in data centre: (a) a replica reached directly, the cell with (b) 1 and
    (c) 2 replicas (the second in maintenance for b: one deploy, no redeploy
    between setups). Setups rotate within each repetition; ratios are paired
    by repetition."""
    plan, host = cell.plan, cell.host
    image = derive_image(host)
    dc = StandIn(host)
    try:
        cell.tune_namespaces()
        pillar = cell.pillar(image=image, replicas=2)
        cell.deploy(pillar)
        direct = start_direct_replica(cell)
        container_pids = {
            "direct": descendants(cell.container_pid(DIRECT_REPLICA)),
            "cell": [p for n in replica_names(2) for p in descendants(cell.container_pid(n))],
        }
        seconds = f"--duration={plan.realpath_seconds}"
        kinds = {
            "throughput_1": ("throughput", "--sessions=1", seconds),
            f"throughput_{PARALLEL}": ("throughput", f"--sessions={PARALLEL}", seconds),
            "sessions": ("sessions", f"--concurrency={PARALLEL}", seconds),
            "rtt": ("rtt", f"--count={plan.rtt_packets}", "--size=64"),
        }
        runs: dict = {s: {k: [] for k in kinds} for s in REALPATH_SETUPS}
        for rep in range(plan.realpath_reps):
            cell.log(f"real data path: repetition {rep + 1}/{plan.realpath_reps}")
            for kind, (mode, *args) in kinds.items():
                # Rotated, so that no setup always runs first (or right after a busy one).
                order = REALPATH_SETUPS[rep % 3 :] + REALPATH_SETUPS[: rep % 3]
                for setup in order:
                    if setup != "direct":
                        set_replica_state(cell, pillar, "mtproxy_2", "ready" if "2" in setup else "maint")
                    groups = {
                        "HAProxy": cell.haproxy_pids(),
                        "replicas": container_pids["direct" if setup == "direct" else "cell"],
                        "stand-in": [dc.proc.pid],
                    }
                    target = direct if setup == "direct" else cell.frontend
                    runs[setup][kind].append(mtload(cell, mode, target, *args, groups=groups))
        set_replica_state(cell, pillar, "mtproxy_2", "ready")
        dc_status = dc.wait_idle()
    finally:
        host.docker("rm", "-f", DIRECT_REPLICA, check=False)
        dc.stop()
    return {"image": image, "direct": direct, "runs": runs, "standin": dc_status, **realpath_summary(runs)}


def cpu_per_gib(run: dict) -> dict[str, float]:
    gib = run["bytes"] / 2**30
    per = {name: s / gib for name, s in run["cpu_s"].items()}
    # The relay: what the cell adds between client and data centre.
    per["relay"] = per["HAProxy"] + per["replicas"]
    return per


def realpath_summary(runs: dict) -> dict:
    setups = {}
    for setup, kinds in runs.items():
        out: dict = {}
        for kind in ("throughput_1", f"throughput_{PARALLEL}"):
            out[kind] = {
                "mib_per_s": summary(r["mib_per_s"] for r in kinds[kind]),
                "cpu_s_per_gib": {
                    name: summary((cpu_per_gib(r)[name] for r in kinds[kind]), digits=3)
                    for name in ("client", "HAProxy", "replicas", "stand-in", "relay")
                },
                "mismatches": sum(r["mismatches"] for r in kinds[kind]),
            }
        out["sessions_per_s"] = summary(r["per_s"] for r in kinds["sessions"])
        out["sessions_failed"] = sum(r["failed"] for r in kinds["sessions"])
        out["rtt_p50_ms"] = summary((r["rtt_ms"]["p50"] for r in kinds["rtt"]), digits=3)
        out["rtt_p99_ms"] = summary((r["rtt_ms"]["p99"] for r in kinds["rtt"]), digits=3)
        out["rtt_mismatches"] = sum(r["mismatches"] for r in kinds["rtt"])
        everything = [r for k in kinds.values() for r in k]
        out["client_cpu_percent_max"] = max(r["client"]["cpu_percent"] for r in everything)
        out["client_saturated_runs"] = sum(r["client"]["saturated"] for r in everything)
        setups[setup] = out

    def ratios(ours: dict, base: dict) -> dict:
        out = {}
        for kind in ("throughput_1", f"throughput_{PARALLEL}"):
            out[f"{kind}_mib_per_s"] = paired(ours[kind], base[kind], lambda r: r["mib_per_s"])
            out[f"{kind}_relay_cpu_per_gib"] = paired(ours[kind], base[kind], lambda r: cpu_per_gib(r)["relay"])
        out["sessions_per_s"] = paired(ours["sessions"], base["sessions"], lambda r: r["per_s"])
        out["rtt_p50_ms"] = paired(ours["rtt"], base["rtt"], lambda r: r["rtt_ms"]["p50"])
        out["rtt_p99_ms"] = paired(ours["rtt"], base["rtt"], lambda r: r["rtt_ms"]["p99"])
        return out

    direct, one, two = (runs[s] for s in REALPATH_SETUPS)
    return {
        "setups": setups,
        "ratios": {
            "cell 1 ÷ direct": ratios(one, direct),
            "cell 2 ÷ cell 1": ratios(two, one),
            "cell 2 ÷ direct": ratios(two, direct),
        },
    }


# -- 7. replay guard: leastconn alone against leastconn with the replay guard -----------------

GUARD_VARIANTS = {"leastconn": False, "leastconn + replay guard": True}
GUARD_REPLICAS = 3


def server_totals(cell: Cell, pillar: dict) -> dict[str, int]:
    """Sessions each replica has had (HAProxy's stot)."""
    return {name: int(row["stot"]) for name, row in servers(cell.host, pillar).items()}


def replay_guard(cell: Cell) -> dict:
    """New sessions/s (closed loop) and connect → first echo latency (open loop),
    the clients sending handshake and first packet at once; spread over 3
    replicas from HAProxy's per-server session counts. Variants alternate
    (ABBA), each a redeploy (a reload)."""
    plan, host = cell.plan, cell.host
    image = derive_image(host)
    dc = StandIn(host)
    runs: dict = {v: {"sessions": [], "open": [], "spread": []} for v in GUARD_VARIANTS}
    try:
        cell.tune_namespaces()
        current = None
        for rep in range(plan.datapath_reps):
            order = list(GUARD_VARIANTS) if rep % 2 == 0 else list(reversed(GUARD_VARIANTS))
            for variant in order:
                pillar = cell.pillar(
                    image=image, replicas=GUARD_REPLICAS, haproxy={"replay_guard": {"enabled": GUARD_VARIANTS[variant]}}
                )
                if variant != current:
                    cell.deploy(pillar)
                    current = variant
                cell.log(f"replay guard: {variant}, repetition {rep + 1}/{plan.datapath_reps}")
                before = server_totals(cell, pillar)
                groups = {"HAProxy": cell.haproxy_pids()}
                runs[variant]["sessions"].append(
                    mtload(
                        cell,
                        "sessions",
                        cell.frontend,
                        f"--concurrency={PARALLEL}",
                        f"--duration={plan.rate_seconds}",
                        groups=groups,
                    )
                )
                runs[variant]["open"].append(
                    mtload(
                        cell,
                        "open",
                        cell.frontend,
                        f"--rate={plan.guard_open_rate}",
                        f"--duration={plan.latency_seconds}",
                    )
                )
                after = server_totals(cell, pillar)
                runs[variant]["spread"].append({n: after[n] - before.get(n, 0) for n in sorted(after)})
        dc_status = dc.wait_idle()
    finally:
        dc.stop()
    variants = {}
    for variant, r in runs.items():
        shares = [share_deviation(s) for s in r["spread"]]
        variants[variant] = {
            "sessions_per_s": summary(x["per_s"] for x in r["sessions"]),
            "haproxy_cpu_ms_per_session": summary(
                x["cpu_s"]["HAProxy"] * 1000 / max(x["ok"], 1) for x in r["sessions"]
            ),
            "p50_ms": summary((x["latency_ms"]["p50"] for x in r["open"] if x["latency_ms"]), digits=3),
            "p99_ms": summary((x["latency_ms"]["p99"] for x in r["open"] if x["latency_ms"]), digits=3),
            "achieved_rate": summary(x["achieved_rate"] for x in r["open"]),
            "failed": sum(x["failed"] for x in r["sessions"] + r["open"]),
            "max_deviation_pct": summary(shares),
            "client_cpu_percent_max": max(x["client"]["cpu_percent"] for x in r["sessions"] + r["open"]),
        }
    guard, plain = runs["leastconn + replay guard"], runs["leastconn"]
    return {
        "replicas": GUARD_REPLICAS,
        "runs": runs,
        "variants": variants,
        "standin": dc_status,
        "guard_vs_leastconn": {
            "sessions_per_s": paired(guard["sessions"], plain["sessions"], lambda x: x["per_s"]),
            "p50_ms": paired(guard["open"], plain["open"], lambda x: x["latency_ms"]["p50"]),
            "p99_ms": paired(guard["open"], plain["open"], lambda x: x["latency_ms"]["p99"]),
        },
    }


def share_deviation(counts: dict[str, int]) -> float:
    """The largest distance of one replica's share from an even one, in % of even."""
    total = sum(counts.values())
    if not total:
        return 0.0
    even = total / len(counts)
    return round(max(abs(c - even) for c in counts.values()) * 100 / even, 1)


# -- 8. floating addresses (mtproxy.vip) ------------------------------------------------


def vip_runs(cell: Cell, b: TestHost, segment: Segment, address: str) -> dict[str, list[dict]]:
    """Host A's address moves to B and back, ``plan.reps`` times per way of losing A."""
    a = cell.host
    cases = {
        "cell stopped": (lambda: a.docker("stop", "mtproxy_haproxy"), lambda: a.docker("start", "mtproxy_haproxy")),
        "link cut": (lambda: segment.set_link(a, up=False), lambda: segment.set_link(a, up=True)),
    }
    runs: dict[str, list[dict]] = {}
    for case, (cut, restore) in cases.items():
        for i in range(cell.plan.reps):
            run = vip_move(a, b, segment.switch.nsenter(client=True), address, cut, restore)
            run["masters_on_return"] = sum(
                state == "MASTER" for moves in run.pop("transitions_on_return").values() for _, state in moves
            )
            runs.setdefault(case, []).append(run)
            cell.log(f"vip {case} {i + 1}: moved in {run['address_moved_s']} s, clients back {run['clients_back_s']} s")
    return runs


def vip(cell: Cell) -> dict:
    """The bench's host (A) and a second one (B), each with a cell and keepalived,
    and a client on one segment; A owns one floating address, B another."""
    a = cell.host
    b, switch = TestHost.create(f"{a.name}-b"), TestHost.create(f"{a.name}-s")
    try:
        b.start()
        switch.start(docker=False)
        segment = Segment(switch)
        for host in (a, b):
            segment.join(host)
        addresses = vip_addresses(segment, [a, b])
        settings = {"enabled": True, "interface": segment.ifname, "addresses": addresses}
        pillars = [cell.pillar(vip=settings), held_clients_pillar(b, secret=cell.secret, vip=settings)]
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(apply, (a, b), pillars))
        wait_held(a, addresses[0]["address"])
        runs = vip_runs(cell, b, segment, addresses[0]["address"])
    finally:
        apply(a, cell.pillar(), sls="mtproxy.vip", check=False)  # vip off: keepalived goes
        b.stop()
        switch.stop()
    keys = ("address_moved_s", "clients_back_s", "failed_new", "address_back_s", "failed_new_on_return")
    keys += ("masters_on_return",)
    summaries = {case: {k: summary(r[k] for r in rs if r[k] is not None) for k in keys} for case, rs in runs.items()}
    return {"runs": runs, "summary": summaries}


SECTIONS: dict[str, Callable[[Cell], dict]] = {
    "salt": salt,
    "failover": failover,
    "operations": operations,
    "concurrency": concurrency,
    "datapath": datapath,
    "realpath": realpath,
    "replay_guard": replay_guard,
    "vip": vip,
}
