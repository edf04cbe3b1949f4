"""Helpers for tests that deploy a whole cell with the formula into a test host.

They drive the formula the way an operator does (``salt-call --local
state.apply mtproxy`` inside the host) and observe what a user would: which
containers run, what HAProxy reports, and which peer address each replica
sees for connections made from the client namespace.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from testhost import Segment, TestHost

FRONTEND_PORT = 8443
BASE_PORT = 4431
LOADGEN = Path(__file__).resolve().parent / "loadgen.py"
# The load of the zero-drop tests and the benchmarks: new connections/s, long-lived ones,
# and how long a new connection must stay open (longer than HAProxy's 3 retries).
RATE, LONG, HOLD = 20, 40, 4.0


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


def held_clients_pillar(host: TestHost, **overrides: Any) -> dict:
    """:func:`cell_pillar` for connect-only load: the real mtprotoproxy replicas keep
    silent clients for the handshake timeout; removed replicas drain for 5 s."""
    return cell_pillar(host, **{"handshake_timeout": 3600, "drain_timeout": 5, **overrides})


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


def admin_command(socket_path: str, command: str) -> str:
    """HAProxy's answer to ``command`` on its admin socket (a host path)."""
    return subprocess.run(
        ["socat", "-t", "5", "-", f"UNIX-CONNECT:{socket_path}"],
        input=command + "\n",
        capture_output=True,
        text=True,
        timeout=15,
        check=True,
    ).stdout


def show_stat(host: TestHost, admin_socket: str) -> list[dict]:
    """HAProxy's ``show stat`` through the admin socket, as a list of rows."""
    text = admin_command(admin_socket, "show stat").lstrip("# ")
    return list(csv.DictReader(io.StringIO(text)))


def admin_socket(pillar: dict) -> str:
    return pillar["mtproxy"]["run_dir"] + "/haproxy/admin.sock"


def servers(host: TestHost, pillar: dict) -> dict[str, dict]:
    return {
        row["svname"]: row
        for row in show_stat(host, admin_socket(pillar))
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
    return peers_through(host, ports, host.nsenter(client=True), host.address, connections)


def peers_through(
    host: TestHost, ports: list[int], prefix: list[str], address: str, connections: int = 20
) -> dict[int, list[str]]:
    """:func:`replica_peers` for a client run with the command ``prefix``
    (e.g. another namespace's nsenter) connecting to ``address`` (e.g. a
    floating address that ``host`` holds)."""
    client = subprocess.Popen(
        [
            *prefix,
            sys.executable,
            "-c",
            HOLD_CLIENT,
            address,
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


def table_routes(host: TestHost, table: int = 100) -> str:
    """Routes of policy-routing ``table`` ("" when it is empty or does not exist)."""
    proc = host.run(["ip", "route", "show", "table", str(table)], check=False)
    if proc.returncode and "does not exist" not in proc.stderr:
        raise AssertionError(f"ip route show table {table}: {proc.stderr}")
    return proc.stdout


def wait_status(host: TestHost, pillar: dict, name: str, prefix: str, timeout: float = 30) -> str:
    """Poll HAProxy until server ``name``'s status starts with ``prefix``; that status."""
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        with_name = servers(host, pillar).get(name)
        status = with_name["status"] if with_name else "(absent)"
        if status.startswith(prefix):
            return status
        time.sleep(0.05)
    raise AssertionError(f"{name} not {prefix} within {timeout} s: {status}")


def mangle_output(host: TestHost) -> str:
    return host.run(["iptables", "-t", "mangle", "-S", "OUTPUT"]).stdout


def replica_names(count: int) -> list[str]:
    return [f"mtproxy_{i}" for i in range(1, count + 1)]


def assert_cell_serves(
    host: TestHost, pillar: dict, count: int, connections: int = 20, base_port: int = BASE_PORT
) -> None:
    """`count` replicas run and are UP, share ``connections`` clients from the
    client namespace, and each sees the client's own address (transparent
    mode), never the host's."""
    wait_servers_up(host, pillar, replica_names(count))
    running = {n for n, c in containers(host).items() if c["state"] == "running"}
    assert set(replica_names(count)) | {"mtproxy_haproxy"} == running
    ports = [base_port + i for i in range(count)]
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


class Load:
    """test/loadgen.py in the client namespace, connect-only (the replicas are
    real mtprotoproxy processes that wait silently for a handshake), against
    the cell's frontend until :meth:`stop`; the report is its JSON."""

    def __init__(self, host: TestHost, rate: float = RATE, long: int = LONG, hold: float = HOLD):
        args = ["--rate", str(rate), "--long", str(long), "--no-echo", "--hold", str(hold), "--timeout", "5"]
        target = f"{host.address}:{FRONTEND_PORT}"
        self.proc = subprocess.Popen(
            [*host.nsenter(client=True), sys.executable, str(LOADGEN), target, *args, "--duration", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if long:
            line = self.proc.stderr.readline()
            if '"ready"' not in line or json.loads(line)["long_open"] != long:
                self.kill()
                raise RuntimeError(f"loadgen did not get {long} long-lived connections ready: {line!r}")

    def stop(self, settle: float = 0.0) -> dict:
        """Stop it after ``settle`` seconds (for the last new connections to fail or not) and return its report."""
        time.sleep(settle)
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=60)
        if self.proc.returncode != 0:
            raise RuntimeError(f"loadgen exited {self.proc.returncode}: {err[-2000:]}")
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def host_snapshot(host: TestHost, pillar: dict) -> dict:
    """What an apply could change on ``host``: containers (ids, state, image), every
    file and folder under the pillar's config_dir and run_dir (mode and SHA-256;
    sockets by mode only), the ip rules, the routes of the tproxy table and the
    mangle rules."""
    settings = pillar["mtproxy"]
    files = {}
    for root in (settings["config_dir"], settings["run_dir"]):
        for path in sorted(Path(root).rglob("*")):
            info = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            files[str(path)] = (oct(info.st_mode), digest)
    table = settings.get("tproxy", {}).get("table", 100)
    return {
        "containers": containers(host),
        "rules": ip_rules(host),
        "routes": table_routes(host, table),
        "mangle": mangle_output(host),
        "files": files,
    }


def unit_command(host: TestHost, unit: str) -> list[str]:
    """The ExecStart of ``unit`` as the formula installed it in the host's unit
    folder (cell_pillar's boot:unit_dir): tests run it themselves, as no
    systemd runs in a test host."""
    text = (host.workdir / "systemd" / unit).read_text()
    line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


# -- replayed handshakes: what a censor's active probe looks like ------------------

# mtprotoproxy logs a handshake it has seen before, with the client's address.
DETECTED = re.compile(r"Active fingerprinting detected from (\S+?),")
_SEND_REPEATED = """
import socket, sys, time
sys.path.insert(0, sys.argv[4])
from mtproto import handshake
first = handshake(sys.argv[3])
for _ in range(int(sys.argv[5])):
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as conn:
        conn.sendall(first)
        time.sleep(0.3)
"""


def send_replayed_handshake(
    host: TestHost, port: int, times: int, secret: str, client: bool = True, address: str | None = None
) -> None:
    """The same valid handshake for ``secret`` ``times`` times to ``address:port`` (default
    the host's own address; from the client namespace unless ``client`` is false)."""
    test_dir = str(Path(__file__).resolve().parent)
    runner = host.client_run if client else host.run
    target = address or host.address
    runner([sys.executable, "-c", _SEND_REPEATED, target, str(port), secret, test_dir, str(times)], timeout=60)


def replica_logs(host: TestHost, count: int, since: float = 0) -> str:
    """What replicas mtproxy_1..``count`` printed since the Unix time ``since``."""
    logs = (host.docker("logs", "--since", f"{since:.3f}", name) for name in replica_names(count))
    return "".join(proc.stdout + proc.stderr for proc in logs)


def replays_detected(host: TestHost, count: int, since: float, wait: float = 5) -> set[str]:
    """The addresses replicas mtproxy_1..``count`` logged a replayed handshake from since ``since``
    (waiting up to ``wait`` s for the first)."""
    deadline = time.monotonic() + wait
    while True:
        seen = set(DETECTED.findall(replica_logs(host, count, since)))
        if seen or time.monotonic() > deadline:
            return seen
        time.sleep(0.3)


# -- floating addresses (mtproxy.vip) -------------------------------------------

KEEPALIVED = "mtproxy_keepalived"
# keepalived logs every state change of a VRRP instance (one per address).
VRRP_STATE = re.compile(r"\((mtproxy_[0-9]+)\) Entering (MASTER|BACKUP|FAULT) STATE")


def vip_pillar(host: TestHost, interface: str, addresses: list[dict], **overrides: Any) -> dict:
    """:func:`cell_pillar` with mtproxy.vip on ``interface`` for ``addresses``
    ({address, router_id, owner}; the same list for every host)."""
    vip = {"enabled": True, "interface": interface, "addresses": addresses, **overrides.pop("vip", {})}
    return cell_pillar(host, vip=vip, **overrides)


def holds(host: TestHost, address: str) -> bool:
    """Whether ``address`` is on one of ``host``'s interfaces."""
    return bool(host.run(["ip", "-o", "-4", "addr", "show", "to", f"{address}/32"]).stdout.strip())


def wait_held(host: TestHost, address: str, held: bool = True, timeout: float = 60) -> float:
    """Wait until ``host`` holds ``address`` (or, ``held`` false, no longer does); the seconds it took."""
    start = time.monotonic()
    while holds(host, address) != held:
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{host.name} {'never took' if held else 'kept'} {address} within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


def vrrp_transitions(host: TestHost, since: float = 0) -> list[tuple[str, str]]:
    """(instance, state) for each VRRP state change keepalived logged since the Unix time ``since``."""
    logs = host.docker("logs", "--since", f"{since:.3f}", KEEPALIVED)
    return VRRP_STATE.findall(logs.stdout + logs.stderr)


_PROBE = r"""
import json, socket, sys, time, threading
address, port, interval, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
attempts, stop = [], threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
while not stop.is_set():
    started = time.time()
    try:
        socket.create_connection((address, port), timeout=timeout).close()
        attempts.append([started, True])
    except OSError:
        attempts.append([started, False])
    time.sleep(max(0.0, interval - (time.time() - started)))
print(json.dumps(attempts), flush=True)
"""


class Prober:
    """New connections to ``address``:frontend, one every ``interval`` s (each
    given ``timeout`` s), from a client run with the command ``prefix`` until
    :meth:`stop`, which returns [(Unix start time, connected)] per attempt."""

    def __init__(self, prefix: list[str], address: str, interval: float = 0.05, timeout: float = 0.5):
        args = [address, str(FRONTEND_PORT), str(interval), str(timeout)]
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", _PROBE, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def stop(self) -> list[tuple[float, bool]]:
        out, _ = self.proc.communicate(input="", timeout=30)
        return [(started, ok) for started, ok in json.loads(out)]


def outage(attempts: list[tuple[float, bool]], since: float) -> dict:
    """From the Unix time ``since``: how many new connections failed, and the
    seconds until the first that succeeded after the last failure (0 when none failed)."""
    after = [(t, ok) for t, ok in attempts if t >= since]
    failed = [t for t, ok in after if not ok]
    back = next((t for t, ok in after if ok and failed and t > failed[-1]), None)
    return {
        "failed": len(failed),
        "attempts": len(after),
        "seconds": round(back - since, 2) if back is not None else (0.0 if not failed else None),
    }


def vip_addresses(segment: Segment, owners: list[TestHost], first_router_id: int = 51) -> list[dict]:
    """One floating address per host of ``owners`` on ``segment`` (.201, .202, ...)."""
    return [
        {"address": segment.address(201 + i), "router_id": first_router_id + i, "owner": host.name}
        for i, host in enumerate(owners)
    ]


def vip_move(
    a: TestHost,
    b: TestHost,
    prefix: list[str],
    address: str,
    cut: Callable[[], Any],
    restore: Callable[[], Any],
    while_moved: Callable[[], Any] = lambda: None,
    timeout: float = 30.0,
) -> dict:
    """``cut`` host A (its cell or its link), wait until B holds A's ``address``,
    run ``while_moved``, ``restore`` A and wait until A holds its address again,
    while a client (command ``prefix``) opens new connections to it. The figures:
    seconds until B held it and until clients connected again, failed new
    connections, seconds until A held it again, and the VRRP state changes each
    host logged after the restore."""
    prober = Prober(prefix, address)
    try:
        time.sleep(1.0)
        cut_at = time.time()
        cut()
        moved_s = wait_held(b, address, timeout=timeout)
        wait_held(a, address, held=False, timeout=timeout)
        while_moved()
        restored_at = time.time()
        restore()
        back_s = wait_held(a, address, timeout=timeout * 2)
        wait_held(b, address, held=False, timeout=timeout)
        time.sleep(3.0)  # a flap would show within a few adverts
    finally:
        attempts = prober.stop()
    moved, returned = outage(attempts, cut_at), outage(attempts, restored_at)
    return {
        "address_moved_s": round(moved_s, 2),
        "clients_back_s": moved["seconds"],
        "failed_new": moved["failed"],
        "address_back_s": round(back_s, 2),
        "failed_new_on_return": returned["failed"],
        "transitions_on_return": {host.name: vrrp_transitions(host, since=restored_at) for host in (a, b)},
    }


def timed(label: str, func, *args, **kwargs):
    """Call ``func`` and print its wall time (shown with ``-s``; never asserted)."""
    start = time.monotonic()
    out = func(*args, **kwargs)
    print(f"\n[wall time] {label}: {time.monotonic() - start:.1f} s")
    return out
