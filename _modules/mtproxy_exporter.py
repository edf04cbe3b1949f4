"""
The cell exporter: one Prometheus endpoint for a whole MTProxy cell.

It runs on the host as a long-running systemd unit (``mtproxy/exporter``),
beside the containers rather than in one, so it keeps serving while Docker
restarts, and needs no image of its own for any flavor. Every
``exporter:interval`` seconds it reads:

- each replica's local stats on 127.0.0.1, port + 10000: mtprotoproxy's
  per-user counters through the replicas' entry point
  (``mtproxy/files/mtprotoproxy_stats.py``), the official image's stats page,
  mtg's Prometheus endpoint;
- HAProxy's admin socket (replica states, failovers, denied connections)
  and master CLI (reloads), through ``haproxy_runtime`` installed beside it;
- the return path (``tproxy.check`` with return-path.json), in transparent mode.

Secrets appear as their index (0 is ``mtproxy:secret``, then
``mtproxy:extra_secrets``, as in ``mtproxy.links``), never by value. Every
counter is per replica (label ``replica``) and stays monotonic across that
replica's restarts: when a replica's process changes (or, for sources that
do not tell, a counter drops) what the old process had counted is carried
over. Sums over replicas are left to PromQL, e.g.
``sum by (secret) (rate(mtproxy_secret_bytes_total[5m]))``. The cell totals
keep what removed replicas had counted.

Run as a script (what the unit runs)::

    python3 mtproxy_exporter.py --config /etc/mtproxy/exporter.json

As a Salt module it gives ``mtproxy.status`` its per-secret totals
(:py:func:`secrets`) and the exporter its settings (:py:func:`config`).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import importlib.util
import ipaddress
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# _utils: on sys.path under Salt's loader, and beside this file in config_dir/bin.
import mtproxy_common
from mtproxy_common import FRONTEND

__virtualname__ = "mtproxy_exporter"

SOURCE_TIMEOUT = 2.0
# name -> (type, help)
METRICS = {
    "mtproxy_secret_connections": ("gauge", "Client sessions open now, per secret (by index) and replica."),
    "mtproxy_secret_connections_total": ("counter", "Client sessions that completed the handshake, per secret."),
    "mtproxy_secret_bytes_total": ("counter", "Bytes relayed for the secret's clients, both directions."),
    "mtproxy_replica_up": ("gauge", "1 when HAProxy reports the replica UP (it takes clients), else 0."),
    "mtproxy_replica_stats_up": ("gauge", "1 when the replica's own stats answered at the last poll."),
    "mtproxy_replica_restarts_total": ("counter", "Restarts of the replica's process the exporter has seen."),
    "mtproxy_replica_failovers_total": ("counter", "Times HAProxy's checks took the replica out (UP to DOWN)."),
    "mtproxy_cell_replicas": ("gauge", "Replicas the cell is configured with."),
    "mtproxy_cell_replicas_up": ("gauge", "Replicas HAProxy reports UP."),
    "mtproxy_cell_connections": ("gauge", "Client sessions open now, all secrets and replicas."),
    "mtproxy_cell_connections_total": ("counter", "Client sessions of the cell, removed replicas included."),
    "mtproxy_cell_bytes_total": ("counter", "Bytes relayed by the cell, removed replicas included."),
    "mtproxy_haproxy_up": ("gauge", "1 when HAProxy's admin socket answered at the last poll."),
    "mtproxy_haproxy_reloads_total": ("counter", "Graceful HAProxy reloads (its master's count)."),
    "mtproxy_guard_denied_total": (
        "counter",
        "Client connections HAProxy's frontend refused, by the rule stage that refused them.",
    ),
    "mtproxy_guard_table_entries": (
        "gauge",
        "Entries in HAProxy's stick tables (the replay guard's first-packet table, the per-address table).",
    ),
    "mtproxy_guard_table_size": ("gauge", "Capacity of HAProxy's stick tables."),
    "mtproxy_return_path_ok": ("gauge", "1 when every return-path rule and route is in place (transparent mode)."),
    "mtproxy_return_path_missing": ("gauge", "Return-path rules and routes missing now."),
    "mtproxy_exporter_last_poll_timestamp_seconds": ("gauge", "When the exporter's last poll of its sources started."),
}
GUARD_STAGES = {"dcon": "connection", "dses": "session", "dreq": "content"}


def __virtual__():
    return __virtualname__


# -- settings (Salt side) -------------------------------------------------------------


def user_names(count: int) -> list[str]:
    """mtprotoproxy's user names of the cell's secrets, by index (mtproxy_flavor's USERS)."""
    return ["tg" if index == 0 else f"tg{index + 1}" for index in range(count)]


def config(cell: dict) -> dict[str, Any]:
    """
    The exporter's settings for ``cell`` (resolved settings): where it listens,
    the digest of its credentials (never the password), each replica's stats
    URL, HAProxy's sockets and the return path. No secret is in them.

    CLI Example:

    .. code-block:: bash

        salt '*' mtproxy_exporter.config "$(salt-call --out=json mtproxy.settings show_secrets=True)"
    """
    exporter, haproxy = cell["exporter"], cell["haproxy"]
    # Where the flavor serves its stats on 127.0.0.1:stats_port (its record).
    path = __salt__["mtproxy_flavor.record"](cell["flavor"])["stats_path"]
    tproxy = cell["client_ip"] == "tproxy"
    return {
        "bind": exporter["bind"],
        "port": exporter["port"],
        "auth_sha256": hashlib.sha256(exporter["auth"].encode()).hexdigest() if exporter["auth"] else "",
        "interval": exporter["interval"],
        "flavor": cell["flavor"],
        "secrets": len(cell["secrets"]),
        "users": user_names(len(cell["secrets"])),
        "replicas": [
            {"name": r["name"], "stats_url": f"http://127.0.0.1:{r['stats_port']}{path}"} for r in cell["replica_list"]
        ],
        "admin_socket": haproxy["admin_socket"],
        "master_socket": haproxy["master_socket"],
        "backend": haproxy["backend"],
        "frontend": FRONTEND,
        "return_path": mtproxy_common.return_path(cell)["config"] if tproxy else None,
    }


# -- sources ----------------------------------------------------------------------------


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=SOURCE_TIMEOUT) as answer:
        return answer.read().decode("utf-8", "replace")


def _empty() -> dict[str, int]:
    return {"connections": 0, "connections_total": 0, "bytes_total": 0}


def parse_mtprotoproxy(text: str, users: list[str]) -> dict[str, Any]:
    """Our entry point's JSON: per-user counters, by secret index (users the cell no longer has are left out)."""
    data = json.loads(text)
    secrets: dict[int, dict[str, int]] = {}
    for index, name in enumerate(users):
        counts = data.get("users", {}).get(name)
        if counts is not None:
            secrets[index] = {
                "connections": int(counts.get("curr_connects", 0)),
                "connections_total": int(counts.get("connects", 0)),
                "bytes_total": int(counts.get("octets", 0)),
            }
    return {"process": data.get("process"), "secrets": secrets}


def parse_official(text: str, secret_count: int) -> dict[str, Any]:
    """mtproto-proxy's stats page (``key<TAB>value`` lines): current client
    connections only, and for one secret only (it does not count per secret)."""
    values = dict(line.split("\t", 1) for line in text.splitlines() if "\t" in line)
    current = int(values.get("total_special_connections", "0").strip() or 0)
    secrets = {0: {"connections": current}} if secret_count == 1 else {}
    return {"process": values.get("pid", "").strip() or None, "secrets": secrets}


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_mtg(text: str) -> dict[str, Any]:
    """mtg's Prometheus text: its client connections and Telegram traffic
    (one secret per instance). mtg counts no sessions in total."""
    sums = {"mtg_client_connections": 0.0, "mtg_telegram_traffic": 0.0}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match.group(1) in sums:
            sums[match.group(1)] += float(match.group(3))
    counts = {"connections": int(sums["mtg_client_connections"]), "bytes_total": int(sums["mtg_telegram_traffic"])}
    return {"process": None, "secrets": {0: counts}}


def read_replica(settings: dict, replica: dict) -> dict[str, Any]:
    """One replica's counters by secret index, and its process identity (None: not told)."""
    text = _get(replica["stats_url"])
    flavor = settings["flavor"]
    if flavor == "mtprotoproxy":
        return parse_mtprotoproxy(text, settings["users"])
    if flavor == "official":
        return parse_official(text, settings["secrets"])
    return parse_mtg(text)


def secrets(cell: dict) -> list[dict[str, Any]]:
    """
    Per secret (by index): the sessions open now and, since each replica's
    process started, the sessions and bytes, summed over the replicas that
    answered (``replicas``: what each counted; ``unreachable``: the names of
    the replicas whose stats did not answer). Read from the replicas now, not
    from the exporter: these counts restart with a replica (the exporter's
    do not).

    CLI Example (``mtproxy.status`` shows them):

    .. code-block:: bash

        salt '*' mtproxy.status
    """
    settings = config(cell)
    totals = [{"secret": index, **_empty(), "replicas": {}} for index in range(settings["secrets"])]
    unreachable = []
    for replica in settings["replicas"]:
        try:
            found = read_replica(settings, replica)
        except (OSError, ValueError):
            unreachable.append(replica["name"])
            continue
        for index, counts in found["secrets"].items():
            for key, value in counts.items():
                totals[index][key] += value
            totals[index]["replicas"][replica["name"]] = counts
    for total in totals:
        total["unreachable"] = unreachable
    return totals


# -- monotonic counters -------------------------------------------------------------------


class Monotonic:
    """Per key, a counter that never goes backwards across its source's restarts."""

    def __init__(self) -> None:
        self._state: dict[tuple, list] = {}  # key -> [process, last raw value, offset]

    def update(self, key: tuple, process: Any, value: float) -> tuple[float, bool]:
        """The carried-over value of ``key`` and whether its source restarted:
        its ``process`` changed, or the value dropped (a counter only drops when
        its process is new, even one that reuses the id: HAProxy's master is
        PID 1 in every new container)."""
        state = self._state.get(key)
        if state is None:
            self._state[key] = [process, value, 0]
            return value, False
        restarted = (process is not None and process != state[0]) or value < state[1]
        if restarted:
            state[2] += state[1]
        state[0], state[1] = process, value
        return value + state[2], restarted

    def last(self, key: tuple) -> float | None:
        state = self._state.get(key)
        return None if state is None else state[1] + state[2]

    def forget(self, match) -> dict[tuple, float]:
        """Drop the keys ``match`` accepts; their last carried-over values."""
        gone = {key: state[1] + state[2] for key, state in self._state.items() if match(key)}
        for key in gone:
            del self._state[key]
        return gone


# -- the exporter ---------------------------------------------------------------------------


def _load_beside(name: str):
    """A module installed beside this script (config_dir/bin), or None."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location(f"mtproxy_exporter_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _labels(labels: dict[str, Any]) -> str:
    if not labels:
        return ""
    escaped = (
        f'{key}="{str(value).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34)).replace(chr(10), " ")}"'
        for key, value in labels.items()
    )
    return "{" + ",".join(escaped) + "}"


def _number(value: float) -> str:
    """Every digit of a counter (``%g`` would round a byte count to 6 digits)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def render(samples: list[tuple[str, dict, float]]) -> str:
    """Prometheus text format: each metric's HELP and TYPE once, then its samples."""
    by_name: dict[str, list[tuple[dict, float]]] = {}
    for name, labels, value in samples:
        by_name.setdefault(name, []).append((labels, value))
    lines = []
    for name, (kind, text) in METRICS.items():
        if name not in by_name:
            continue
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{_labels(labels)} {_number(value)}" for labels, value in by_name[name]]
    return "\n".join(lines) + "\n"


class Exporter:
    """Polls the cell's sources and keeps the latest scrape text."""

    def __init__(self, config_path: str) -> None:
        self.config_path = config_path
        self.settings: dict = {}
        self.mtime: float | None = None
        self.counters = Monotonic()
        self.restarts: dict[str, int] = {}
        self.retired = {"connections_total": 0.0, "bytes_total": 0.0}
        self.text = render([])
        self.notes: set[str] = set()  # problems logged at the last poll
        self.seen: set[str] = set()
        self.haproxy = _load_beside("haproxy_runtime")
        self.tproxy = _load_beside("tproxy")

    def load(self) -> dict:
        """Re-read the settings when the file changed (an apply scaled the cell): no restart, no reset."""
        mtime = os.stat(self.config_path).st_mtime
        if mtime != self.mtime:
            with open(self.config_path) as handle:
                self.settings = json.load(handle)
            self.mtime = mtime
        return self.settings

    def _replicas(self, settings: dict, samples: list) -> dict[str, float]:
        cell = {"connections": 0.0, "connections_total": 0.0, "bytes_total": 0.0}
        names = {r["name"] for r in settings["replicas"]}
        # A replica the cell no longer has: its counts stay in the cell totals.
        for key, last in self.counters.forget(lambda k: k[0] == "replica" and k[1] not in names).items():
            self.retired[key[2]] += last
        for replica in settings["replicas"]:
            name = replica["name"]
            try:
                found = read_replica(settings, replica)
            except (OSError, ValueError) as exc:
                samples.append(("mtproxy_replica_stats_up", {"replica": name}, 0))
                self._note(f"{name}: stats unavailable: {exc}")
                found = None
            if found is not None:
                samples.append(("mtproxy_replica_stats_up", {"replica": name}, 1))
                restarted = False
                for index, counts in sorted(found["secrets"].items()):
                    labels = {"secret": str(index), "replica": name}
                    for key, value in counts.items():
                        if key == "connections":
                            samples.append(("mtproxy_secret_connections", labels, value))
                            cell["connections"] += value
                            continue
                        total, reset = self.counters.update(("replica", name, key, index), found["process"], value)
                        restarted |= reset
                        samples.append((f"mtproxy_secret_{key}", labels, total))
                self.restarts[name] = self.restarts.get(name, 0) + int(restarted)
            else:
                # Down: its counters keep their last values (no gap, no reset).
                for key in ("connections_total", "bytes_total"):
                    for index in range(settings["secrets"]):
                        last = self.counters.last(("replica", name, key, index))
                        if last is not None:
                            labels = {"secret": str(index), "replica": name}
                            samples.append((f"mtproxy_secret_{key}", labels, last))
            samples.append(("mtproxy_replica_restarts_total", {"replica": name}, self.restarts.get(name, 0)))
            for key in ("connections_total", "bytes_total"):
                cell[key] += sum(
                    self.counters.last(("replica", name, key, index)) or 0 for index in range(settings["secrets"])
                )
        return cell

    def _haproxy(self, settings: dict, samples: list) -> int:
        """Replica states, failovers, reloads and denied connections; the number of replicas UP."""
        up_count = 0
        names = [r["name"] for r in settings["replicas"]]
        if self.haproxy is None:
            return 0
        try:
            text = self.haproxy._send(settings["admin_socket"], "show stat", timeout=SOURCE_TIMEOUT)
            rows = self.haproxy._parse_stat(text)
            worker = self.haproxy.info(admin_socket=settings["admin_socket"])["pid"]
        except (OSError, ValueError, KeyError, self.haproxy.CommandExecutionError) as exc:
            self._note(f"HAProxy: {exc}")
            rows, worker = None, None
        samples.append(("mtproxy_haproxy_up", {}, int(rows is not None)))
        by_name = {row.get("svname"): row for row in rows or [] if row.get("pxname") == settings["backend"]}
        for name in names:
            row = by_name.get(name, {})
            up = int(row.get("status", "").startswith("UP"))
            up_count += up
            samples.append(("mtproxy_replica_up", {"replica": name}, up))
            if row.get("chkdown", "").isdigit():
                total, _ = self.counters.update(("haproxy", name, "chkdown"), worker, int(row["chkdown"]))
            else:
                total = self.counters.last(("haproxy", name, "chkdown")) or 0
            samples.append(("mtproxy_replica_failovers_total", {"replica": name}, total))
        frontend = next(
            (r for r in rows or [] if r.get("pxname") == settings["frontend"] and r.get("svname") == "FRONTEND"), None
        )
        for field, stage in GUARD_STAGES.items():
            key = ("haproxy", "frontend", field)
            if frontend is not None and (frontend.get(field) or "0").isdigit():
                total, _ = self.counters.update(key, worker, int(frontend.get(field) or 0))
            else:
                total = self.counters.last(key) or 0
            samples.append(("mtproxy_guard_denied_total", {"stage": stage}, total))
        try:
            # The headers only: no key (a client's first bytes, its address) is read.
            tables = self.haproxy._parse_table(self.haproxy._send(settings["admin_socket"], "show table"))
        except (OSError, ValueError):
            tables = {}
        for name, table in sorted(tables.items()):
            samples.append(("mtproxy_guard_table_entries", {"table": name}, table["used"]))
            samples.append(("mtproxy_guard_table_size", {"table": name}, table["size"]))
        try:
            master = self.haproxy.show_proc(settings["master_socket"])["master"]
            total, _ = self.counters.update(("haproxy", "master", "reloads"), master["pid"], master["reloads"] or 0)
        except (OSError, ValueError, KeyError, self.haproxy.CommandExecutionError):
            total = self.counters.last(("haproxy", "master", "reloads")) or 0
        samples.append(("mtproxy_haproxy_reloads_total", {}, total))
        return up_count

    def _return_path(self, settings: dict, samples: list) -> None:
        if not settings.get("return_path"):
            return
        try:
            if self.tproxy is None:
                raise OSError("tproxy.py is not installed beside the exporter")
            with open(settings["return_path"]) as handle:
                result = self.tproxy.check(**json.load(handle))
            ok, missing = result["ok"], len(result["missing"])
        except Exception as exc:  # pyroute2 or netlink errors too: report, keep serving
            self._note(f"return path: {exc}")
            ok, missing = False, 0
        samples.append(("mtproxy_return_path_ok", {}, int(ok)))
        samples.append(("mtproxy_return_path_missing", {}, missing))

    def _note(self, message: str) -> None:
        """Log a problem once, not once per poll."""
        if message not in self.notes:
            print(f"mtproxy exporter: {message}", file=sys.stderr, flush=True)
        self.seen.add(message)

    def poll(self) -> str:
        self.seen = set()
        started = time.time()
        settings = self.load()
        samples: list[tuple[str, dict, float]] = []
        cell = self._replicas(settings, samples)
        up = self._haproxy(settings, samples)
        self._return_path(settings, samples)
        samples += [
            ("mtproxy_cell_replicas", {}, len(settings["replicas"])),
            ("mtproxy_cell_replicas_up", {}, up),
            ("mtproxy_cell_connections", {}, cell["connections"]),
            ("mtproxy_cell_connections_total", {}, cell["connections_total"] + self.retired["connections_total"]),
            ("mtproxy_cell_bytes_total", {}, cell["bytes_total"] + self.retired["bytes_total"]),
            ("mtproxy_exporter_last_poll_timestamp_seconds", {}, round(started, 3)),
        ]
        self.notes = self.seen
        self.text = render(samples)
        return self.text

    def run(self, stop: threading.Event, listening: tuple[str, int], moved) -> None:
        """Poll every interval until ``stop``; call ``moved`` when the settings
        name another address or port (the unit's Restart= then binds it)."""
        while not stop.is_set():
            try:
                self.poll()
            except (OSError, ValueError, KeyError) as exc:  # a bad settings file: say so, keep the last scrape
                self._note(f"poll failed: {exc}")
            if (self.settings.get("bind"), int(self.settings.get("port", 0))) != listening:
                print("mtproxy exporter: the address changed; exiting to listen there", flush=True)
                moved()
                return
            stop.wait(float(self.settings.get("interval") or 5))


def authorized(header: str | None, digest: str) -> bool:
    """HTTP basic credentials against the SHA-256 of ``user:password`` (no digest: open)."""
    if not digest:
        return True
    if not header or not header.startswith("Basic "):
        return False
    try:
        given = base64.b64decode(header[6:], validate=True)
    except ValueError:
        return False
    return hmac.compare_digest(hashlib.sha256(given).hexdigest(), digest)


def make_server(exporter: Exporter) -> ThreadingHTTPServer:
    settings = exporter.settings

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if not authorized(self.headers.get("Authorization"), exporter.settings.get("auth_sha256", "")):
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="mtproxy exporter"')
                self.end_headers()
                return
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            body = exporter.text.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    family = socket.AF_INET6 if ipaddress.ip_address(settings["bind"]).version == 6 else socket.AF_INET
    server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})
    return server_class((settings["bind"], int(settings["port"])), Handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prometheus endpoint of an MTProxy cell (mtproxy-formula).")
    parser.add_argument("--config", required=True, help="JSON settings written by the formula (exporter.json)")
    args = parser.parse_args(argv)
    exporter = Exporter(args.config)
    exporter.load()
    exporter.poll()
    server = make_server(exporter)
    stop = threading.Event()

    def shut(*_: Any) -> None:
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, shut)
    settings = exporter.settings
    listening = (settings["bind"], int(settings["port"]))
    poller = threading.Thread(target=exporter.run, args=(stop, listening, shut), daemon=True)
    poller.start()
    print(f"mtproxy exporter: serving http://{settings['bind']}:{settings['port']}/metrics", flush=True)
    server.serve_forever()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
